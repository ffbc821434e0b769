"""A replica on its own NATS with a bus and its flow events, for rules and intercept tests
(the policy bucket is shared by every replica on a server, so each test gets its own)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from libs.common import subjects
from libs.common.bus import Bus
from libs.common.natsserver import EmbeddedNats
from tests.integration.conftest import MakeProxy
from tests.integration.harness import FlowEvents, ProxyUnderTest


@dataclass
class Fleet:
    proxy: ProxyUnderTest
    bus: Bus
    flows: FlowEvents

    async def put_policy(self, rules: list[dict[str, Any]] | bytes) -> int:
        """Write a policy revision; returns it once the replica has settled on it."""
        kv = await self.bus.policy_kv()
        raw = rules if isinstance(rules, bytes) else orjson.dumps({"rules": rules})
        revision = await kv.put(subjects.POLICY_KEY, raw)
        control = self.proxy.replica.control
        assert control is not None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            error = control.policy_error or ""
            if self.proxy.ctx.policy.revision == revision or f"revision {revision} " in error:
                return revision
            await asyncio.sleep(0.02)
        raise AssertionError(f"policy revision {revision} not settled")

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(proxy=self.proxy.url, timeout=10, **kw)


@contextlib.asynccontextmanager
async def start_fleet(nats: EmbeddedNats, make_proxy: MakeProxy) -> AsyncIterator[Fleet]:
    url = nats.url
    proxy = await make_proxy(nats_url=url)
    bus = await Bus.connect(url, "test", 5)
    flows = FlowEvents()
    await flows.start(url, proxy.id)
    try:
        yield Fleet(proxy, bus, flows)
    finally:
        await flows.stop()
        await bus.close()


def rule(rule_id: str, flt: str, action: dict[str, Any], **extra: Any) -> dict[str, Any]:
    phase = extra.pop("phase", "request")
    return {"id": rule_id, "match": {"filter": flt, "phase": phase}, "action": action, **extra}


def matched(event: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m["rule"], m["action"]) for m in event["policy"]["matched"]]
