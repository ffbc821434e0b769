"""Intercept rules on a real replica: exchanges held while real clients wait, freed by a
decision sent over NATS (the ``decide`` command of ``libs.common.approvals``), by their
timeout, by a kill or by the client leaving; cached approvals let exchanges pass.

The management API's approvals routes drive these same commands; here the replica's
side of the contract is checked on its own: what the client got, what the upstream
got, what was recorded and which events were published.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import orjson
import pytest

from libs.common import subjects
from libs.common.approvals import CachedApproval
from libs.common.bus import barrier
from libs.common.natsserver import EmbeddedNats
from services.proxy import intercepts
from tests.integration.conftest import MakeProxy
from tests.integration.harness import RawClient, Upstream
from tests.integration.rules_harness import Fleet, rule, start_fleet

pytestmark = pytest.mark.timeout(60)


class Events:
    """System events of the intercept kinds, as the replica publishes them."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.nc: Any = None

    async def start(self, url: str) -> None:
        self.nc = await nats.connect(url)

        async def on_msg(msg: Any) -> None:
            event = orjson.loads(msg.data)
            self.seen.append((event["type"], event["data"]))

        await self.nc.subscribe(subjects.events_filter(), cb=on_msg)
        await barrier(self.nc)

    async def wait(self, type: str, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, data in self.seen:
                if t == type:
                    return data
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {type} event; saw {[t for t, _ in self.seen]}")


@pytest.fixture
async def fleet(restartable_nats: EmbeddedNats, make_proxy: MakeProxy) -> AsyncIterator[Fleet]:
    async with start_fleet(restartable_nats, make_proxy) as f:
        yield f


@pytest.fixture
async def events(restartable_nats: EmbeddedNats) -> AsyncIterator[Events]:
    e = Events()
    await e.start(restartable_nats.url)
    try:
        yield e
    finally:
        await e.nc.close()


async def command(fleet: Fleet, verb: str, body: dict[str, Any]) -> dict[str, Any]:
    msg = await fleet.bus.request(
        subjects.command_subject(fleet.proxy.id, verb), orjson.dumps(body), timeout=5
    )
    reply: dict[str, Any] = orjson.loads(msg.data)
    return reply


async def pending(fleet: Fleet, n: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = await command(fleet, "intercepts", {})
        if len(reply["data"]["pending"]) >= n:
            found: list[dict[str, Any]] = reply["data"]["pending"]
            return found
        await asyncio.sleep(0.02)
    raise AssertionError("nothing held")


def intercept(rule_id: str, flt: str, phase: str = "request", **spec: Any) -> dict[str, Any]:
    return rule(rule_id, flt, {"type": "intercept", **spec}, phase=phase)


async def test_a_held_request_waits_then_an_allow_once_lets_it_through(
    fleet: Fleet, upstream: Upstream, events: Events
) -> None:
    await fleet.put_policy([intercept("hitl", "~u /echo/pay")])
    async with fleet.client() as client:
        call = asyncio.create_task(
            client.post(
                f"{upstream.http}/echo/pay",
                content=b"amount=5",
                headers={"Authorization": "Bearer secret-token"},
            )
        )
        [held] = await pending(fleet)
        assert not call.done()  # the client is still waiting
        assert held["phase"] == "request"
        assert held["rule"] == "hitl"
        assert held["request"]["method"] == "POST"
        assert held["request"]["url"].endswith("/echo/pay")
        assert held["request"]["body_size"] == 8
        headers = dict(held["request"]["headers"])
        assert headers["Authorization"] == "<redacted>"  # secrets do not leave the replica
        created = await events.wait("intercept_created")
        assert created["approval"]["id"] == held["id"]
        assert fleet.proxy.replica.control.status().intercepts_pending == 1  # type: ignore[union-attr]

        reply = await command(
            fleet, "decide", {"id": held["id"], "decision": "allow_once", "by": "key-1"}
        )
        assert reply["ok"] is True
        assert reply["data"]["approval"]["id"] == held["id"]
        resp = await call
    assert resp.status_code == 200
    assert resp.json()["body"] == "amount=5"
    event = await fleet.flows.final_for("/echo/pay")
    assert event["intercept"]["outcome"] == "allowed_once"
    assert event["intercept"]["by"] == "key-1"
    assert event["intercept"]["held_ms"] > 0
    assert event["policy"]["matched"] == [
        {"rule": "hitl", "phase": "request", "action": "intercept", "note": "allowed_once"}
    ]
    resolved = await events.wait("intercept_resolved")
    assert resolved == {
        "id": held["id"],
        "flow_id": event["id"],
        "decision": "allow_once",
        "by": "key-1",
    }
    # a second decision on the same exchange is told it was decided
    again = await command(fleet, "decide", {"id": held["id"], "decision": "deny"})
    assert (again["ok"], again["code"]) == (False, "APPROVAL_DECIDED")
    unknown = await command(fleet, "decide", {"id": "nope-request", "decision": "deny"})
    assert (unknown["ok"], unknown["code"]) == (False, "APPROVAL_NOT_FOUND")


async def test_deny_answers_and_nothing_goes_upstream(fleet: Fleet, upstream: Upstream) -> None:
    await fleet.put_policy([intercept("hitl", "~u /echo/deny")])
    async with fleet.client() as client:
        call = asyncio.create_task(client.get(f"{upstream.http}/echo/deny"))
        [held] = await pending(fleet)
        await command(
            fleet,
            "decide",
            {"id": held["id"], "decision": "deny", "status": 451, "body": "not today"},
        )
        resp = await call
    assert (resp.status_code, resp.text) == (451, "not today")
    event = await fleet.flows.final_for("/echo/deny")
    assert event["server"] is None
    assert event["intercept"]["outcome"] == "denied"


async def test_modify_edits_the_held_request(fleet: Fleet, upstream: Upstream) -> None:
    await fleet.put_policy([intercept("hitl", "~u /echo/mod")])
    async with fleet.client() as client:
        call = asyncio.create_task(
            client.post(
                f"{upstream.http}/echo/mod",
                content=b"original body",
                headers={"Authorization": "Bearer keep-me", "X-Drop": "1"},
            )
        )
        [held] = await pending(fleet)
        headers = [[n, v] for n, v in held["request"]["headers"] if n.lower() != "x-drop"]
        headers.append(["X-Added", "yes"])
        reply = await command(
            fleet,
            "decide",
            {
                "id": held["id"],
                "decision": "modify",
                "request": {
                    "method": "PUT",
                    "url": f"{upstream.http}/echo/modified?x=1",
                    "headers": headers,
                    "body": "edited body",
                },
            },
        )
        assert reply["ok"] is True, reply
        resp = await call
    seen = resp.json()
    assert seen["method"] == "PUT"
    assert seen["path"] == "/echo/modified?x=1"
    assert seen["body"] == "edited body"
    got = {k.lower(): v for k, v in seen["headers"]}
    assert got["authorization"] == "Bearer keep-me"  # sent back masked: the original kept
    assert got["x-added"] == "yes"
    assert "x-drop" not in got
    event = await fleet.flows.final_for("/echo/modified?x=1")
    assert event["intercept"]["outcome"] == "modified"
    assert event["intercept"]["modified"] == ["url", "method", "headers", "body"]


async def test_modify_with_the_other_phases_edit_is_refused(
    fleet: Fleet, upstream: Upstream
) -> None:
    await fleet.put_policy([intercept("hitl", "~u /echo/ph")])
    async with fleet.client() as client:
        call = asyncio.create_task(client.get(f"{upstream.http}/echo/ph"))
        [held] = await pending(fleet)
        reply = await command(
            fleet, "decide", {"id": held["id"], "decision": "modify", "response": {"status": 500}}
        )
        assert (reply["ok"], reply["code"]) == (False, "APPROVAL_PHASE_MISMATCH")
        await command(fleet, "decide", {"id": held["id"], "decision": "approve"})
        assert (await call).status_code == 200


async def test_a_held_response_is_modified_before_the_client_sees_it(
    fleet: Fleet, upstream: Upstream
) -> None:
    await fleet.put_policy([intercept("hitl", "~c 200 & ~u /echo/resp", phase="response")])
    async with fleet.client() as client:
        call = asyncio.create_task(client.get(f"{upstream.http}/echo/resp"))
        [held] = await pending(fleet)
        assert held["phase"] == "response"
        assert held["response"]["status"] == 200
        headers = [*held["response"]["headers"], ["X-Reviewed", "1"]]
        await command(
            fleet,
            "decide",
            {
                "id": held["id"],
                "decision": "modify",
                "response": {"status": 202, "headers": headers},
            },
        )
        resp = await call
        assert resp.status_code == 202
        assert resp.headers["x-reviewed"] == "1"
        assert resp.json()["path"] == "/echo/resp"  # the upstream's body, untouched

        call = asyncio.create_task(client.get(f"{upstream.http}/echo/resp"))
        [held] = await pending(fleet)
        await command(
            fleet,
            "decide",
            {"id": held["id"], "decision": "modify", "response": {"body": "replaced"}},
        )
        resp = await call
        assert (resp.status_code, resp.text) == (200, "replaced")


@pytest.mark.parametrize("on_timeout", ["allow", "deny"])
async def test_no_decision_in_time(
    fleet: Fleet, upstream: Upstream, events: Events, on_timeout: str
) -> None:
    await fleet.put_policy([intercept("hitl", "~u /echo/t", timeout_s=0.3, on_timeout=on_timeout)])
    async with fleet.client() as client:
        resp = await client.get(f"{upstream.http}/echo/t")
    assert resp.status_code == (200 if on_timeout == "allow" else 504)
    event = await fleet.flows.final_for("/echo/t")
    assert event["intercept"]["outcome"] == f"timeout_{on_timeout}ed".replace("denyed", "denied")
    data = await events.wait("intercept_timeout")
    assert data["on_timeout"] == on_timeout


async def test_killing_a_held_exchange_closes_the_client_at_once(
    fleet: Fleet, upstream: Upstream, events: Events
) -> None:
    """mitmproxy leaves such a client hanging (mitmproxy#8045); here it is cut."""
    await fleet.put_policy([intercept("hitl", "~u /echo/kill")])
    async with await RawClient.connect(fleet.proxy.port) as client:
        await client.send(f"GET {upstream.http}/echo/kill HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        [held] = await pending(fleet)
        t0 = time.monotonic()
        assert fleet.proxy.ctx.kill(held["flow_id"])
        assert await client.read_until_eof(timeout=3) == b""
        assert time.monotonic() - t0 < 0.5
    event = await fleet.flows.final_for("/echo/kill")
    assert event["state"] == "killed"
    assert event["intercept"]["outcome"] == "killed"
    resolved = await events.wait("intercept_resolved")
    assert resolved["decision"] == "killed"
    assert (await command(fleet, "intercepts", {}))["data"]["pending"] == []
    late = await command(fleet, "decide", {"id": held["id"], "decision": "approve"})
    assert late["code"] == "APPROVAL_DECIDED"


async def test_a_client_that_leaves_frees_its_held_exchange(
    fleet: Fleet, upstream: Upstream
) -> None:
    await fleet.put_policy([intercept("hitl", "~u /echo/gone")])
    async with await RawClient.connect(fleet.proxy.port) as client:
        await client.send(f"GET {upstream.http}/echo/gone HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        [held] = await pending(fleet)
    event = await fleet.flows.final_for("/echo/gone")
    assert event["state"] == "error"
    assert event["intercept"]["outcome"] == "client_gone"
    late = await command(fleet, "decide", {"id": held["id"], "decision": "approve"})
    assert late["code"] == "APPROVAL_DECIDED"


async def test_a_cached_approval_lets_matching_requests_pass(
    fleet: Fleet, upstream: Upstream
) -> None:
    await fleet.put_policy([intercept("hitl", "~u /echo/cached")])
    url = f"{upstream.http}/echo/cached"
    now = time.time()
    entry = CachedApproval(
        rule="hitl", method="GET", url=url, by="key-1", created_at=now, expires_at=now + 60
    )
    kv = await fleet.bus.approvals_kv()
    await kv.put(entry.key(), entry.model_dump_json().encode())
    # an entry whose key does not name what it approves is ignored
    other = entry.model_copy(update={"url": f"{upstream.http}/echo/other"})
    await kv.put(entry.key()[:-1] + "0", other.model_dump_json().encode())
    deadline = time.monotonic() + 5
    while entry.key() not in fleet.proxy.ctx.intercepts.cache and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    async with fleet.client() as client:
        resp = await client.get(url + "?any=query")  # the query is not part of the entry
    assert resp.status_code == 200
    event = await fleet.flows.final_for("/echo/cached?any=query")
    assert event["intercept"]["outcome"] == "cached"
    assert len(fleet.proxy.ctx.intercepts.cache) == 1

    await kv.delete(entry.key())
    while fleet.proxy.ctx.intercepts.cache and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    async with fleet.client() as client:
        call = asyncio.create_task(client.get(url))
        [held] = await pending(fleet)
        await command(fleet, "decide", {"id": held["id"], "decision": "allow_once"})
        assert (await call).status_code == 200


async def test_malformed_decisions_are_refused_and_hold_nothing_up(fleet: Fleet) -> None:
    for body in (
        {"decision": "approve"},
        {"id": "x", "decision": "maybe"},
        {"id": "x", "decision": "deny", "status": 99},
        {"id": "x", "decision": "modify", "request": {"headers": [["X-A", "a\r\nb"]]}},
        {"id": "x", "decision": "modify", "request": {"headers": [["Bad Name", "1"]]}},
        {"id": "x" * 200, "decision": "deny"},
    ):
        reply = await command(fleet, "decide", body)
        assert (reply["ok"], reply["code"]) == (False, "BAD_COMMAND"), body
    assert (await command(fleet, "status", {}))["ok"] is True


async def test_past_the_hold_limit_on_timeout_applies_at_once(
    fleet: Fleet, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client flooding an intercept rule cannot make a replica hold without bound."""
    monkeypatch.setattr(intercepts, "MAX_HELD", 1)
    await fleet.put_policy([intercept("hitl", "~u /echo/flood")])
    async with fleet.client() as client:
        first = asyncio.create_task(client.get(f"{upstream.http}/echo/flood/1"))
        [held] = await pending(fleet)
        second = await client.get(f"{upstream.http}/echo/flood/2")
        assert second.status_code == 503
        await command(fleet, "decide", {"id": held["id"], "decision": "allow_once"})
        assert (await first).status_code == 200
    event = await fleet.flows.final_for("/echo/flood/2")
    assert event["intercept"]["outcome"] == "timeout_denied"
    assert event["server"] is None
