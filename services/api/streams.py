"""Live flow events for SSE subscribers: one shared JetStream consumer per API process.

The proxies never know about subscribers: they publish to FLOWS as always. The first
subscriber of an API process starts one ordered consumer on FLOWS (new messages only);
each message (a JSON array of flow events) is decoded once and offered to every
subscriber, whose own filter picks events into its own bounded queue. A subscriber
whose queue overflows (its client reads too slowly) is dropped rather than buffered
without bound; when the last subscriber leaves, the consumer stops.

Every event is identified by ``<stream sequence>:<index in the message>``, the SSE id.
A subscriber that resumes (``Last-Event-ID``) first replays from the stream with a pull
consumer of its own, at its own pace, then joins the live feed; positions at or before
the last one sent are skipped, so nothing is lost or repeated in the hand-over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from libs.common import flowfilter, subjects
from libs.common.bus import Bus
from libs.common.flowfilter import Filter, FilterTimeout, compile_filter
from libs.common.models import FlowQuery
from libs.common.tasks import spawn
from services.api.eventlog import EventLog

log = logging.getLogger("proxyfleet.api.streams")

Position = tuple[int, int]  # (stream sequence, index of the event in that message)
LAST = 1 << 30  # index meaning "every event of this message"


def format_id(pos: Position) -> str:
    return str(pos[0]) if pos[1] >= LAST else f"{pos[0]}:{pos[1]}"


def parse_id(value: str) -> Position | None:
    """``"<seq>:<index>"`` (or a bare ``"<seq>"``: after that whole message); None if bad."""
    seq, sep, index = value.strip().partition(":")
    if not seq.isdigit() or (sep and not index.isdigit()):
        return None
    return int(seq), int(index) if sep else LAST


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """The filters of ``GET /api/flows`` applied to one flow event."""

    host: str | None = None
    method: str | None = None
    status: int | None = None
    min_status: int | None = None
    max_status: int | None = None
    state: str | None = None
    replica: str | None = None
    path: str | None = None
    rule: str | None = None  # lowercased: ids and tags match with ASCII case folded
    tag: str | None = None
    decision: str | None = None
    expression: Filter | None = None  # ``q``, the filter language (the store runs the same)

    @classmethod
    def of(cls, query: FlowQuery) -> FlowFilter:
        return cls(
            host=query.host.lower() if query.host else None,
            method=query.method.upper() if query.method else None,
            status=query.status,
            min_status=query.min_status,
            max_status=query.max_status,
            state=query.state,
            replica=query.replica,
            path=query.path,
            rule=query.rule.lower() if query.rule else None,
            tag=query.tag.lower() if query.tag else None,
            decision=query.decision,
            expression=compile_filter(query.q) if query.q is not None else None,
        )

    def matches(self, ev: dict[str, Any]) -> bool:
        if not self._fields(ev):
            return False
        return self.expression is None or self.expression.matches(ev)

    def _fields(self, ev: dict[str, Any]) -> bool:
        if self.replica is not None and ev.get("replica") != self.replica:
            return False
        if self.path is not None and not str(ev.get("path") or "").startswith(self.path):
            return False
        if self.state is not None and ev.get("state") != self.state:
            return False
        if self.method is not None and str(ev.get("method", "")).upper() != self.method:
            return False
        if self.rule is not None and self.rule not in _folded(flowfilter.rule_ids(ev)):
            return False
        if self.tag is not None and self.tag not in _folded(flowfilter.tag_list(ev)):
            return False
        if self.decision is not None:
            decided = flowfilter.decision(ev)
            if decided is None or (self.decision != "any" and decided != self.decision):
                return False
        if self.host is not None:
            host = str(ev.get("host") or "").lower()
            if self.host.startswith("*."):
                if not host.endswith(self.host[1:]):
                    return False
            elif host != self.host:
                return False
        if self.status is not None or self.min_status is not None or self.max_status is not None:
            response = ev.get("response")
            status = response.get("status") if isinstance(response, dict) else None
            if not isinstance(status, int):
                return False
            if self.status is not None and status != self.status:
                return False
            if self.min_status is not None and status < self.min_status:
                return False
            if self.max_status is not None and status > self.max_status:
                return False
        return True


def _folded(values: list[str]) -> list[str]:
    return [v.lower() for v in values]


def summary(ev: dict[str, Any]) -> bytes:
    """A flow event as streamed: everything but the bodies (``GET /api/flows/{id}`` has them)."""
    out = dict(ev)
    for part in ("request", "response"):
        value = out.get(part)
        if isinstance(value, dict) and "body_b64" in value:
            out[part] = {k: v for k, v in value.items() if k != "body_b64"}
    return orjson.dumps(out)


class Item:
    """One flow event of a message: decoded once, serialised once, shared by subscribers."""

    __slots__ = ("_payload", "event", "pos")

    def __init__(self, pos: Position, event: dict[str, Any]) -> None:
        self.pos = pos
        self.event = event
        self._payload: bytes | None = None

    @property
    def payload(self) -> bytes:
        if self._payload is None:
            self._payload = summary(self.event)
        return self._payload


def items_of(msg: Msg) -> list[Item]:
    """The flow events of one FLOWS message (a JSON array); [] if it is not one."""
    try:
        batch = orjson.loads(msg.data)
    except orjson.JSONDecodeError:
        return []
    if not isinstance(batch, list):
        return []
    seq = msg.metadata.sequence.stream
    return [Item((seq, i), ev) for i, ev in enumerate(batch) if isinstance(ev, dict)]


class Subscriber:
    """One SSE client's filter and bounded queue."""

    def __init__(self, flt: FlowFilter, bound: int) -> None:
        self.filter = flt
        self.bound = bound
        self.queue: deque[Item] = deque()
        self.wake = asyncio.Event()
        self.after: Position = (0, -1)  # skip live events at or before this position
        self.dropped: str | None = None
        self.on_drop: Callable[[Subscriber], None] | None = None

    def offer(self, items: list[Item]) -> None:
        if self.dropped is not None:
            return
        added = False
        for item in items:
            if item.pos <= self.after:
                continue
            try:
                if not self.filter.matches(item.event):
                    continue
            except FilterTimeout as exc:  # said to the client: never a silent gap
                self.drop(str(exc))
                return
            if len(self.queue) >= self.bound:
                self.drop(
                    f"more than {self.bound} events waited for this client: it reads too slowly"
                )
                return
            self.queue.append(item)
            added = True
        if added:
            self.wake.set()

    def drop(self, reason: str) -> None:
        self.dropped = reason
        self.queue.clear()
        self.wake.set()
        if self.on_drop is not None:
            self.on_drop(self)


class FlowHub:
    """The API process's one live feed of FLOWS, fanned out to its SSE subscribers."""

    def __init__(self, bus: Bus, queue_size: int) -> None:
        self.bus = bus
        self.queue_size = queue_size
        self.closing = asyncio.Event()
        self.subscribers: set[Subscriber] = set()
        self.messages = 0  # FLOWS messages received (tests, metrics)
        self.dropped = 0  # subscribers dropped as too slow
        self._sub: Any = None
        self._lock = asyncio.Lock()
        self._log = EventLog(bus, subjects.FLOWS_STREAM)

    def subscriber(self, query: FlowQuery) -> Subscriber:
        sub = Subscriber(FlowFilter.of(query), self.queue_size)
        sub.on_drop = self._dropped
        return sub

    async def bounds(self) -> tuple[int, int]:
        """The FLOWS stream's first and last sequence (what a resume can reach)."""
        info = await self.bus.js.stream_info(subjects.FLOWS_STREAM)
        return int(info.state.first_seq), int(info.state.last_seq)

    async def join(self, sub: Subscriber) -> None:
        """Start receiving live events (starting the shared consumer if needed)."""
        async with self._lock:
            if self._sub is None:
                self._sub = await self.bus.js.subscribe(
                    subjects.FLOWS_SUBJECTS,
                    stream=subjects.FLOWS_STREAM,
                    cb=self._on_msg,
                    ordered_consumer=True,
                    deliver_policy=DeliverPolicy.NEW,
                )
                log.info("live flow feed started")
            if sub.dropped is None:
                self.subscribers.add(sub)

    def leave(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        if not self.subscribers and self._sub is not None:
            spawn(self._stop_if_idle(), name="flow-feed-stop")

    def _dropped(self, sub: Subscriber) -> None:
        self.dropped += 1
        log.info("live flow subscriber dropped: %s", sub.dropped)
        self.leave(sub)

    async def _stop_if_idle(self) -> None:
        async with self._lock:
            if self.subscribers or self._sub is None:
                return
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            log.info("live flow feed stopped (no subscribers)")

    async def _on_msg(self, msg: Msg) -> None:
        self.messages += 1
        if not self.subscribers:
            return
        items = items_of(msg)
        if not items:
            return
        for sub in list(self.subscribers):
            sub.offer(items)

    async def replay(self, sub: Subscriber, after: Position) -> AsyncIterator[Item]:
        """The subscriber's matching events after ``after`` up to the stream's end, read
        at the caller's pace (a pull consumer of its own, from the stream)."""
        filter_subject = subjects.flows_filter(sub.filter.replica)
        start = after[0] if after[1] != LAST else after[0] + 1
        sub_, info = await self._log.open_consumer(filter_subject, start_seq=start)
        try:
            remaining = info.num_pending or 0
            while remaining > 0 and not self.closing.is_set():
                try:
                    msgs = await sub_.fetch(min(64, remaining), 5.0)
                except TimeoutError:
                    return
                for msg in msgs:
                    remaining = msg.metadata.num_pending
                    for item in items_of(msg):
                        try:
                            if item.pos > after and sub.filter.matches(item.event):
                                yield item
                        except FilterTimeout as exc:
                            sub.drop(str(exc))
                            return
        finally:
            self._log.discard_consumer(sub_, info.name)

    def close(self) -> None:
        """End every live stream (server shutdown): subscribers see ``closing`` and leave."""
        self.closing.set()
        for sub in list(self.subscribers):
            sub.wake.set()

    async def stop(self) -> None:
        self.close()
        async with self._lock:
            if self._sub is not None:
                with contextlib.suppress(Exception):
                    await self._sub.unsubscribe()
                self._sub = None
