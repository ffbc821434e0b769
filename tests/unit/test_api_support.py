"""Shared pieces of the API tests (no tests here): settings, a client, fake NATS peers.

The API tests run against a NATS of their own (``restartable_nats``), never the
session's shared one: ``PUT /api/config`` rewrites the document every replica
started later would load, and fleet-wide assertions need a registry that only
the test's own replicas write to.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from libs.common import subjects
from libs.common.bus import barrier
from libs.common.models import CommandReply, ReplicaStatus
from libs.common.settings import ApiSettings
from services.api.app import create_app

ADMIN_KEY = "admin-secret-0123456789"
READ_KEY = "read-secret-0123456789"
ADMIN = {"X-API-Key": ADMIN_KEY}
READ = {"X-API-Key": READ_KEY}


def api_settings(nats_url: str, data_dir: Path, **overrides: Any) -> ApiSettings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "data_dir": data_dir,
        "replica_id": "api-test",
        "api_keys": f"ops:admin:{ADMIN_KEY},viewer:read:{READ_KEY}",
        "api_command_timeout": 2.0,
        "api_store_timeout": 2.0,
        "api_config_apply_wait": 0.3,
        "nats_connect_timeout": 5.0,
    }
    values.update(overrides)
    return ApiSettings(**values)


@contextlib.asynccontextmanager
async def api_client(
    settings: ApiSettings, lifespan: bool = True, raise_app_exceptions: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on ``create_app(settings)`` in process, its lifespan running."""
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    async with contextlib.AsyncExitStack() as stack:
        if lifespan:
            await stack.enter_async_context(app.router.lifespan_context(app))
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://api.test")
        )
        client.app = app  # type: ignore[attr-defined]
        yield client


Handler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any] | None]]


class CannedStore:
    """A stand-in for the flow store on ``fleet.store.*``: records queries, answers them.

    ``handler(verb, body)`` returns the reply object, or None to stay silent.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._nc: NATS | None = None

    async def start(self, nats_url: str) -> CannedStore:
        self._nc = await nats.connect(nats_url)

        async def on_msg(msg: Msg) -> None:
            verb = msg.subject.rsplit(".", 1)[-1]
            body = orjson.loads(msg.data)
            self.requests.append((verb, body))
            reply = await self.handler(verb, body)
            if reply is not None:
                await msg.respond(orjson.dumps(reply))

        await self._nc.subscribe(subjects.store_subject("*"), queue="store", cb=on_msg)
        await barrier(self._nc)
        return self

    async def stop(self) -> None:
        if self._nc is not None:
            await self._nc.close()


def replica_status(replica_id: str, state: str = "running", **fields: Any) -> ReplicaStatus:
    now = time.time()
    values: dict[str, Any] = {
        "id": replica_id,
        "state": state,
        "listen": "127.0.0.1:9",
        "mode": "regular",
        "started_at": now - 5,
        "updated_at": now,
    }
    values.update(fields)
    return ReplicaStatus(**values)


class FakeReplica:
    """A replica without a proxy: a registry entry and a command responder.

    ``answer`` decides the reply to each command (None: stay silent).
    """

    def __init__(
        self,
        status: ReplicaStatus,
        answer: Callable[[str, dict[str, Any]], CommandReply | None] | None = None,
    ) -> None:
        self.status = status
        self.answer = answer or self._default
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.delay = 0.0  # seconds before answering (a stop that drains)
        self._nc: NATS | None = None

    def _default(self, verb: str, body: dict[str, Any]) -> CommandReply | None:
        if verb == "start":
            self.status = self.status.model_copy(update={"state": "running"})
        elif verb == "stop":
            self.status = self.status.model_copy(update={"state": "stopped"})
        elif verb == "kill":
            return CommandReply(
                replica=self.status.id, ok=False, code="FLOW_NOT_ACTIVE", message="not here"
            )
        return CommandReply(replica=self.status.id, ok=True, status=self.status)

    async def start(self, nats_url: str, ttl: float = 30.0) -> FakeReplica:
        self._nc = await nats.connect(nats_url)
        self.kv = await self._registry(ttl)

        async def on_msg(msg: Msg) -> None:
            verb = msg.subject.rsplit(".", 1)[-1]
            body = orjson.loads(msg.data) if msg.data else {}
            self.commands.append((verb, body))
            reply = self.answer(verb, body)
            if self.delay:
                await asyncio.sleep(self.delay)
            await self.publish()
            if reply is not None and msg.reply:
                await msg.respond(reply.model_dump_json().encode())

        for target in (self.status.id, subjects.CMD_ALL):
            await self._nc.subscribe(subjects.command_wildcard(target), cb=on_msg)
        await barrier(self._nc)
        await self.publish()
        return self

    async def _registry(self, ttl: float) -> Any:
        from nats.js.api import KeyValueConfig

        assert self._nc is not None
        js = self._nc.jetstream()
        with contextlib.suppress(Exception):
            return await js.key_value(subjects.REPLICAS_BUCKET)
        return await js.create_key_value(
            KeyValueConfig(bucket=subjects.REPLICAS_BUCKET, history=1, ttl=ttl)
        )

    async def publish(self) -> None:
        self.status = self.status.model_copy(update={"updated_at": time.time()})
        await self.kv.put(self.status.id, self.status.model_dump_json().encode())

    async def stop(self, deregister: bool = True) -> None:
        if deregister:
            with contextlib.suppress(Exception):
                await self.kv.delete(self.status.id)
        if self._nc is not None:
            await self._nc.close()


async def eventually(
    probe: Callable[[], Awaitable[Any]], timeout: float = 5.0, what: str = "condition"
) -> Any:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    last: Any = None
    while loop.time() < end:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")
