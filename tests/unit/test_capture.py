"""Capture queue: coalescing, bounded drops, batch limits, retries (fake publisher)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
from typing import Any

import nats.errors
import nats.js.errors
import orjson

from services.proxy.capture import Capture, flow_event
from services.proxy.flow import COMPLETED, Flow


class FakeBus:
    def __init__(self, max_payload: int = 1 << 20, fail: int = 0) -> None:
        self.connected = True
        self.max_payload = max_payload
        self.fail = fail
        self.sent: list[tuple[str, bytes, str | None]] = []

    async def js_publish(self, subject: str, payload: bytes, msg_id: str | None = None) -> Any:
        if self.fail:
            self.fail -= 1
            raise TimeoutError("no ack")
        self.sent.append((subject, payload, msg_id))

    def events(self) -> list[dict[str, Any]]:
        return [e for _, p, _ in self.sent for e in orjson.loads(p)]


def _flow(path: bytes = b"/") -> Flow:
    f = Flow(("127.0.0.1", 5555))
    f.method, f.host, f.port, f.path = b"GET", "example.test", 80, path
    f.req_headers = [(b"Host", b"example.test"), (b"X-Dup", b"1"), (b"X-Dup", b"2")]
    return f


async def test_flow_finished_before_drain_is_sent_once_as_completed() -> None:
    bus = FakeBus()
    cap = Capture("r1", bus, linger=0)
    f = _flow()
    cap.emit(f)  # started
    f.status = 200
    f.finish(COMPLETED)
    cap.emit(f)  # completed
    await cap.flush(timeout=1)
    events = bus.events()
    assert [e["event"] for e in events] == ["completed"]
    assert events[0]["request"]["headers"] == [
        ["Host", "example.test"],
        ["X-Dup", "1"],
        ["X-Dup", "2"],
    ]


async def test_active_flow_is_sent_as_started_then_completed() -> None:
    bus = FakeBus()
    cap = Capture("r1", bus, linger=0)
    f = _flow()
    cap.emit(f)
    await cap.flush(timeout=1)
    f.finish(COMPLETED)
    cap.emit(f)
    await cap.flush(timeout=1)
    assert [e["event"] for e in bus.events()] == ["started", "completed"]


async def test_queue_bound_drops_and_counts() -> None:
    cap = Capture("r1", FakeBus(), queue_size=3)
    for _ in range(10):
        cap.emit(_flow())
    assert cap.pending == 3
    assert cap.dropped == 7


async def test_batches_respect_count_and_carry_unique_msg_ids() -> None:
    bus = FakeBus()
    cap = Capture("r1", bus, batch_max=4, linger=0)
    for i in range(10):
        f = _flow(b"/%d" % i)
        f.finish(COMPLETED)
        cap.emit(f)
    await cap.flush(timeout=1)
    assert [len(orjson.loads(p)) for _, p, _ in bus.sent] == [4, 4, 2]
    assert len({m for _, _, m in bus.sent}) == 3
    assert {s for s, _, _ in bus.sent} == {"fleet.flows.r1.batch"}


async def test_failed_publish_is_retried_with_the_same_msg_id() -> None:
    bus = FakeBus(fail=2)
    cap = Capture("r1", bus, linger=0)
    f = _flow()
    f.finish(COMPLETED)
    cap.emit(f)
    task = asyncio.create_task(cap.run())
    for _ in range(100):
        if bus.sent:
            break
        await asyncio.sleep(0.05)
    task.cancel()
    assert len(bus.sent) == 1 and cap.published == 1 and cap.batches == 1


async def test_oversized_event_is_trimmed_to_fit_and_marked_truncated() -> None:
    bus = FakeBus(max_payload=200_000)
    cap = Capture("r1", bus, linger=0)
    f = _flow()
    f.resp_body = [b"z" * 500_000]
    f.resp_size = 500_000
    f.status = 200
    f.finish(COMPLETED)
    cap.emit(f)
    await cap.flush(timeout=1)
    ((_, payload, _),) = bus.sent
    assert len(payload) < 200_000
    (event,) = orjson.loads(payload)
    assert event["response"]["truncated"] is True
    assert event["response"]["size"] == 500_000


def test_flow_event_fields() -> None:
    f = _flow(b"/a?b=1")
    f.req_body = [b"hello"]
    f.req_size = 5
    f.status, f.reason = 201, b"Created"
    f.finish(COMPLETED)
    e = flow_event(f, "r9")
    assert e["id"] == f.id and e["replica"] == "r9" and e["state"] == "completed"
    assert e["path"] == "/a?b=1" and e["client"] == ["127.0.0.1", 5555]
    assert e["request"]["body_b64"] == "aGVsbG8="
    assert e["response"]["status"] == 201 and e["response"]["reason"] == "Created"
    assert e["timings"]["start"] <= e["timings"]["end"]


# -- item 1: every message fits max_payload; permanent errors are dropped and counted -------
class ScriptedBus(FakeBus):
    """A FakeBus whose publishes fail with the exceptions ``errors(payload)`` returns."""

    def __init__(self, max_payload: int, errors: Any) -> None:
        super().__init__(max_payload)
        self.errors = errors
        self.attempts: list[tuple[int, str | None]] = []

    async def js_publish(self, subject: str, payload: bytes, msg_id: str | None = None) -> Any:
        self.attempts.append((len(payload), msg_id))
        exc = self.errors(payload)
        if exc is not None:
            raise exc
        if len(payload) > self.max_payload:
            raise nats.errors.MaxPayloadError
        self.sent.append((subject, payload, msg_id))


def _done(path: bytes = b"/", body: int = 0, header: int = 0) -> Flow:
    f = _flow(path)
    f.status, f.reason = 200, b"OK"
    if body:
        f.resp_body, f.resp_size = [b"b" * body], body
    if header:
        f.resp_headers = [(b"X-Big", b"h" * header), (b"Content-Type", b"text/plain")]
    f.finish(COMPLETED)
    return f


async def _run_until(cap: Capture, done: Any) -> None:
    task = asyncio.create_task(cap.run())
    try:
        for _ in range(200):
            if done():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("publisher did not get there")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_batch_budget_holds_across_slices() -> None:
    """Many events that each fit, taken in several slices: no batch exceeds max_payload
    (a later slice used to take its first event whatever was left of the budget)."""
    bus = FakeBus(max_payload=300_000)
    cap = Capture("r1", bus, linger=0)
    flows = [_done(b"/%d" % i, body=60_000) for i in range(80)]  # ~80 KB each as base64
    for f in flows:
        cap.emit(f)
    await _run_until(cap, lambda: cap.published == 80)
    sizes = [len(p) for _, p, _ in bus.sent]
    assert max(sizes) <= 300_000
    assert len(bus.sent) > 1
    assert {e["path"] for e in bus.events()} == {f"/{i}" for i in range(80)}
    assert cap.queued_bytes == 0 and cap.undeliverable == 0


async def test_huge_header_is_trimmed_and_marked() -> None:
    bus = FakeBus(max_payload=200_000)
    cap = Capture("r1", bus, linger=0)
    cap.emit(_done(b"/big", header=1_500_000))
    cap.emit(_done(b"/after"))
    await cap.flush(timeout=1)
    assert all(len(p) <= 200_000 for _, p, _ in bus.sent)
    by_path = {e["path"]: e for e in bus.events()}
    big = by_path["/big"]["response"]
    assert big["truncated"] is True and big["headers_truncated"] is True
    assert big["headers"][0][0] == "X-Big" and 0 < len(big["headers"][0][1]) < 200_000
    assert by_path["/after"]["response"]["truncated"] is False
    assert cap.truncated == 1


async def test_big_body_keeps_as_much_as_fits() -> None:
    bus = FakeBus(max_payload=200_000)
    cap = Capture("r1", bus, linger=0)
    cap.emit(_done(b"/b", body=1_000_000))
    await cap.flush(timeout=1)
    ((_, payload, _),) = bus.sent
    (event,) = orjson.loads(payload)
    kept = len(base64.b64decode(event["response"]["body_b64"]))
    assert 100_000 < kept < 200_000  # the room one message leaves, not a fixed fraction
    assert event["response"]["truncated"] is True and event["response"]["size"] == 1_000_000


async def test_max_payload_error_splits_the_batch_then_drops_one_event_alone() -> None:
    """A server whose limit is lower than we thought (here: any payload over 50 KB is
    refused as too large): batches are split, a lone event over it is dropped, counted."""
    too_big = 50_000

    def errors(payload: bytes) -> Exception | None:
        return nats.errors.MaxPayloadError() if len(payload) > too_big else None

    bus = ScriptedBus(1 << 20, errors)
    cap = Capture("r1", bus, linger=0)
    for i in range(6):
        cap.emit(_done(b"/s%d" % i, body=20_000))  # ~27 KB each: pairs are too big
    cap.emit(_done(b"/huge", body=100_000))
    cap.emit(_done(b"/last"))
    await _run_until(cap, lambda: cap.published + cap.undeliverable == 8)
    paths = {e["path"] for e in bus.events()}
    assert paths == {f"/s{i}" for i in range(6)} | {"/last"}
    assert cap.undeliverable == 1 and cap.undeliverable_final == 1
    assert all(len(p) <= too_big for _, p, _ in bus.sent)


async def test_refused_batch_is_dropped_and_counted_not_retried() -> None:
    calls = []

    def errors(payload: bytes) -> Exception | None:
        calls.append(payload)
        if b"/bad" in payload:
            return nats.js.errors.BadRequestError(code=400, description="bad message")
        return None

    bus = ScriptedBus(1 << 20, errors)
    cap = Capture("r1", bus, linger=0)
    cap.emit(_done(b"/bad"))
    await _run_until(cap, lambda: cap.undeliverable == 1)
    cap.emit(_done(b"/good"))
    await _run_until(cap, lambda: cap.published == 1)
    assert [e["path"] for e in bus.events()] == ["/good"]
    assert sum(b"/bad" in p for p in calls) == 1  # tried once, never again


async def test_transient_errors_are_retried_with_the_same_id() -> None:
    fails = [nats.errors.TimeoutError(), nats.errors.NoRespondersError(), None]

    def errors(payload: bytes) -> Exception | None:
        return fails.pop(0) if fails else None

    bus = ScriptedBus(1 << 20, errors)
    cap = Capture("r1", bus, linger=0)
    cap.emit(_done(b"/t"))
    await _run_until(cap, lambda: cap.published == 1)
    assert len(bus.attempts) == 3 and len({m for _, m in bus.attempts}) == 1
    assert cap.undeliverable == 0


def test_publish_verdicts() -> None:
    from services.proxy.capture import publish_verdict

    assert publish_verdict(nats.errors.MaxPayloadError()) == "too_large"
    assert publish_verdict(nats.js.errors.APIError(code=400, err_code=10054)) == "too_large"
    assert publish_verdict(nats.js.errors.BadRequestError(code=400)) == "permanent"
    assert publish_verdict(nats.js.errors.ServiceUnavailableError(code=503)) == "transient"
    assert publish_verdict(nats.errors.TimeoutError()) == "transient"
    assert publish_verdict(TimeoutError()) == "transient"
    assert publish_verdict(nats.errors.ConnectionClosedError()) == "transient"
    assert publish_verdict(RuntimeError("?")) == "unknown"


# -- item 8: the queue is bounded by bytes ---------------------------------------------------
def test_queue_bytes_bound_drops_and_releases_bodies() -> None:
    """NATS down: flows with 1 MiB bodies. The queue holds at most ``queue_bytes`` of
    bodies and headers; a dropped final event's flow lets go of its bodies, since its
    queued started entry would otherwise keep them alive."""
    cap = Capture("r1", FakeBus(), queue_bytes=8 << 20)
    flows = []
    for i in range(40):
        f = _flow(b"/%d" % i)
        cap.emit(f)  # started: headers only
        f.status = 200
        f.resp_body, f.resp_size = [b"x" * (1 << 20)], 1 << 20
        f.finish(COMPLETED)
        cap.emit(f)
        flows.append(f)
    assert cap.queued_bytes <= 8 << 20
    assert cap.dropped == cap.dropped_final > 30
    alive = {id(f): f for f, _ in cap._queue}.values()  # each flow once
    held = sum(len(c) for f in alive for c in f.resp_body + f.req_body)
    assert held <= 8 << 20  # what the queue really keeps alive
    stripped = [f for f in flows if not f.resp_body]
    assert len(stripped) == cap.dropped_final
    assert all(f.resp_truncated for f in stripped)


async def test_byte_accounting_returns_to_zero_when_drained() -> None:
    bus = FakeBus()
    cap = Capture("r1", bus, linger=0)
    for i in range(5):
        f = _flow(b"/%d" % i)
        cap.emit(f)
        f.req_body, f.req_size = [b"q" * 1000], 1000
        f.finish(COMPLETED)
        cap.emit(f)
    assert cap.queued_bytes > 5000
    await cap.flush(timeout=1)
    assert cap.queued_bytes == 0 and cap.pending == 0
    assert [e["event"] for e in bus.events()] == ["completed"] * 5


def test_a_started_entry_counts_only_headers_exactly_once_the_queue_backs_up() -> None:
    from services.proxy.capture import _EXACT_AFTER, _HEADER_GUESS

    cap = Capture("r1", FakeBus())
    f = _flow()
    f.req_headers.append((b"X-Long", b"v" * 10_000))
    cap.emit(f)  # short queue: a per-header estimate (hot path: no walk over headers)
    assert cap.queued_bytes == len(f.req_headers) * _HEADER_GUESS
    for _ in range(_EXACT_AFTER):
        cap.emit(_flow())
    before = cap.queued_bytes
    cap.emit(f)  # backed up: exact
    assert cap.queued_bytes - before == sum(len(n) + len(v) for n, v in f.req_headers)


def test_final_entry_counts_bodies_up_to_the_body_limit() -> None:
    cap = Capture("r1", FakeBus())
    for _ in range(70):  # backed up: exact header bytes
        cap.emit(_flow())
    before = cap.queued_bytes
    f = _done(body=3 << 20)  # captured: at most the body limit (1 MiB)
    f.req_size = 10
    cap.emit(f)
    heads = sum(len(n) + len(v) for n, v in f.req_headers + f.resp_headers)
    assert cap.queued_bytes - before == (1 << 20) + 10 + heads


# -- item 13: what is unsent at stop is counted ---------------------------------------------
async def test_batch_in_flight_at_stop_is_resent_or_counted() -> None:
    """The publisher is cancelled while its batch is failing: flush tries that batch again
    (same id) and, NATS still refusing, abandon counts it with what is queued."""
    bus = ScriptedBus(1 << 20, lambda p: nats.errors.TimeoutError())
    cap = Capture("r1", bus, linger=0)
    cap.emit(_done(b"/a"))
    task = asyncio.create_task(cap.run())
    for _ in range(100):
        if bus.attempts:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    cap.emit(_done(b"/b"))
    assert await cap.flush(timeout=0.3) is False
    first_id = bus.attempts[0][1]
    assert all(m == first_id for _, m in bus.attempts)  # /b never got its turn
    lost = cap.abandon()
    assert (lost.events, lost.flows) == (2, 2)
    assert cap.undeliverable == 2 and cap.undeliverable_final == 2
    assert cap.pending == 0 and cap.queued_bytes == 0


async def test_batch_in_flight_at_stop_is_published_by_flush() -> None:
    fails = [nats.errors.TimeoutError()]
    bus = ScriptedBus(1 << 20, lambda p: fails.pop() if fails else None)
    cap = Capture("r1", bus, linger=0)
    cap.emit(_done(b"/a"))
    task = asyncio.create_task(cap.run())
    for _ in range(100):
        if bus.attempts:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert await cap.flush(timeout=2) is True
    assert [e["path"] for e in bus.events()] == ["/a"]
    assert bus.attempts[0][1] == bus.attempts[-1][1]
    assert cap.abandon().events == 0


def test_abandon_counts_a_flow_once() -> None:
    cap = Capture("r1", FakeBus())
    f = _flow()
    cap.emit(f)
    f.finish(COMPLETED)
    cap.emit(f)  # started + final of one flow: one event would have gone out
    lost = cap.abandon()
    assert (lost.events, lost.flows) == (1, 1)


def test_a_flow_id_carries_the_millisecond_of_its_start() -> None:
    """A listing's ``since=<started_at>`` compares ids: the flow that started at that
    instant must be inside the bound, also across a millisecond boundary."""
    for _ in range(2000):
        flow = Flow(("127.0.0.1", 1))
        assert int(flow.id[:12], 16) == math.floor(flow.t_start * 1000)
