"""A system event sent in the background is tried again through a stream leader election,
with the same message id every time (the stream's duplicate window keeps one)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from libs.common import events


class FlakyBus:
    """A bus whose first ``failures`` publishes time out (a leader being elected)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[tuple[str, str | None]] = []
        self.connected = True

        class _NC:
            is_closed = False

        self.nc = _NC()

    async def js_publish(self, subject: str, payload: bytes, msg_id: str | None = None,
                         timeout: float = 2.0) -> Any:  # fmt: skip
        self.calls.append((subject, msg_id))
        if len(self.calls) <= self.failures:
            raise TimeoutError("no leader")
        return object()


async def test_a_background_event_outlasts_a_leader_election(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events, "RETRY_PAUSE", 0.01)
    bus = FlakyBus(failures=3)
    task = events.emit_soon(bus, "store-1", events.DATABASE_RECOVERED)  # type: ignore[arg-type]
    assert task is not None
    event = await asyncio.wait_for(task, 5)
    assert event is not None and len(bus.calls) == 4
    assert len({msg_id for _, msg_id in bus.calls}) == 1 == len({s for s, _ in bus.calls})
    assert bus.calls[0][1] == event.id


async def test_an_awaited_event_is_tried_once_and_gives_up_quietly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events, "RETRY_PAUSE", 0.01)
    bus = FlakyBus(failures=1)
    assert await events.emit(bus, "api", events.AUDIT, {"x": 1}) is None  # type: ignore[arg-type]
    assert len(bus.calls) == 1  # the request path never waits out an election


async def test_retries_stop_at_their_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "RETRY_PAUSE", 0.01)
    bus = FlakyBus(failures=10_000)
    got = await events.emit(bus, "s", events.DATABASE_RECOVERED, retry_for=0.2)  # type: ignore[arg-type]
    assert got is None and 5 <= len(bus.calls) <= 25
