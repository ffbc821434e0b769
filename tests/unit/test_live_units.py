"""Pieces of the event log and the live streams that need no NATS."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import orjson
import pytest

from libs.common import events
from libs.common.models import FlowQuery
from services.api.streams import FlowFilter, Item, Subscriber, format_id, parse_id, summary


def flow(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event": "completed",
        "id": "f1",
        "replica": "r1",
        "state": "completed",
        "method": "GET",
        "host": "api.example.com",
        "request": {"headers": [], "size": 3, "truncated": False, "body_b64": "YWJj"},
        "response": {"status": 503, "headers": [], "size": 0, "body_b64": ""},
    }
    base.update(fields)
    return base


def test_sse_ids_round_trip() -> None:
    assert parse_id("12:3") == (12, 3) and format_id((12, 3)) == "12:3"
    bare = parse_id("12")
    assert bare is not None and bare > (12, 10_000) and format_id(bare) == "12"
    for bad in ("", "x", "1:x", "-1:0", "1:-1", "1:2:3"):
        assert parse_id(bad) is None, bad


@pytest.mark.parametrize(
    ("query", "matches"),
    [
        ({}, True),
        ({"host": "api.example.com"}, True),
        ({"host": "*.example.com"}, True),
        ({"host": "example.com"}, False),
        ({"host": "*.other.com"}, False),
        ({"method": "get"}, True),
        ({"method": "POST"}, False),
        ({"status": 503}, True),
        ({"status": 200}, False),
        ({"min_status": 500}, True),
        ({"max_status": 499}, False),
        ({"state": "completed", "replica": "r1"}, True),
        ({"replica": "r2"}, False),
    ],
)
def test_flow_filter(query: dict[str, Any], matches: bool) -> None:
    assert FlowFilter.of(FlowQuery(**query)).matches(flow()) is matches


def test_status_filters_skip_events_without_a_response() -> None:
    started = flow(event="started", state="active", response=None)
    assert not FlowFilter(min_status=100).matches(started)
    assert FlowFilter(state="active").matches(started)


def test_summary_has_no_bodies() -> None:
    out = orjson.loads(summary(flow()))
    assert "body_b64" not in out["request"] and "body_b64" not in out["response"]
    assert out["request"]["size"] == 3 and out["response"]["status"] == 503


async def test_a_subscriber_over_its_bound_is_dropped() -> None:
    sub = Subscriber(FlowFilter(), bound=2)
    dropped: list[Subscriber] = []
    sub.on_drop = dropped.append
    sub.offer([Item((1, 0), flow()), Item((1, 1), flow())])
    assert len(sub.queue) == 2 and sub.dropped is None and sub.wake.is_set()
    sub.offer([Item((2, 0), flow())])
    assert sub.dropped is not None and "reads too slowly" in sub.dropped
    assert not sub.queue and dropped == [sub]
    sub.after = (5, 0)
    sub.offer([Item((6, 0), flow())])  # a dropped subscriber takes nothing more
    assert not sub.queue


async def test_emit_never_raises() -> None:
    assert await events.emit(None, "r1", events.REPLICA_STARTED) is None

    class Broken:
        connected = True

        async def js_publish(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("no stream")

    assert await events.emit(Broken(), "r1", events.REPLICA_STARTED) is None  # type: ignore[arg-type]
    task = events.emit_soon(Broken(), "a.b*", "x y")  # type: ignore[arg-type]
    assert task is not None and await task is None
    assert events.token("a.b*") == "a_b_"


async def test_emit_publishes_one_event_with_a_message_id() -> None:
    sent: list[tuple[str, bytes, str | None]] = []

    class Bus:
        connected = True

        async def js_publish(
            self, subject: str, payload: bytes, msg_id: str | None = None, timeout: float = 5
        ) -> None:
            sent.append((subject, payload, msg_id))

    ev = await events.emit(Bus(), "r1", events.FLOW_KILLED, {"flow_id": "f"}, replica="r1")  # type: ignore[arg-type]
    assert ev is not None
    ((subject, payload, msg_id),) = sent
    assert subject == "fleet.events.r1.flow_killed" and msg_id == ev.id
    body = orjson.loads(payload)
    assert body["type"] == "flow_killed" and body["data"] == {"flow_id": "f"}
    assert body["severity"] == "info" and body["replica"] == "r1"
    await events.emit(Bus(), "r1", events.REPLICA_GONE, msg_id="gone-r1-7")  # type: ignore[arg-type]
    assert sent[-1][2] == "gone-r1-7"


def test_throttle() -> None:
    t = events.Throttle(interval=60)
    assert t.allow("a") == 0
    assert t.allow("a") is None and t.allow("a") is None
    assert t.allow("b") == 0
    t._last["a"] -= 120
    assert t.allow("a") == 2


def test_event_loop_free_emit_soon_is_a_no_op() -> None:
    assert events.emit_soon(None, "r", "x") is None
    asyncio.run(asyncio.sleep(0))


def test_q_on_the_stream_matches_with_the_filter_language() -> None:
    flt = FlowFilter.of(FlowQuery(q="~d api & ~c 503 & ~bq abc", path="/v1"))
    assert flt.matches(flow(path="/v1/x"))
    assert not flt.matches(flow(path="/v2/x"))  # the path prefix
    assert not flt.matches(flow(path="/v1/x", host="www.example.com"))


def test_a_filter_that_backtracks_badly_drops_the_subscriber_with_the_reason() -> None:
    """Never a silent gap: the client hears why its stream ended, and the API's event loop
    is held for one search timeout at most."""
    sub = Subscriber(FlowFilter.of(FlowQuery(q="~bq 'foo.*bar'")), bound=10)
    hostile = flow(request={"headers": [], "body_b64": base64.b64encode(b"foo" * 300_000).decode()})
    sub.offer([Item((1, 0), flow()), Item((1, 1), hostile), Item((1, 2), flow())])
    assert sub.dropped is not None and "backtracks" in sub.dropped
    assert not sub.queue  # dropped: nothing more is delivered
