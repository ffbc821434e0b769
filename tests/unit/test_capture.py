"""Capture queue: coalescing, bounded drops, batch limits, retries (fake publisher)."""

from __future__ import annotations

import asyncio
from typing import Any

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
