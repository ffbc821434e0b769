"""Reading the system event log (stream EVENTS) straight from JetStream.

Pages and live tails both read through short-lived ephemeral pull consumers with no
acks: a page creates one (or a few, going backwards), reads a bounded range by stream
sequence and deletes it; a tail keeps one and pulls as fast as its client reads, so
JetStream, not the API, buffers for a slow client and resuming after a sequence is
exact. Filters are subject filters (``fleet.events.<source|*>.<type|*>``), applied by
the server. Times are mapped to stream sequences once (``seq_at``), so every range is
a sequence range.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from libs.common import subjects
from libs.common.bus import Bus
from libs.common.tasks import spawn

log = logging.getLogger("proxyfleet.api.events")

_FETCH = 256  # most messages pulled per request
_MAX_WINDOW = 1 << 16  # widest sequence window read at once when paging backwards
_PAGE_INACTIVE = 30.0  # seconds before the server deletes a page consumer we failed to delete
_FAR_FUTURE = 7_258_118_400.0  # 2200-01-01: later times are all "after everything"
_TAIL_INACTIVE = 120.0  # a tail whose client stopped reading for this long is recreated

Order = Literal["desc", "asc"]
Keep = Callable[[dict[str, Any]], bool]  # a record -> whether a page includes it


@dataclass(frozen=True, slots=True)
class Page:
    events: list[dict[str, Any]]
    next_cursor: int | None


def record(msg: Msg) -> dict[str, Any]:
    """A stored event as the API shows it: the ``SystemEvent`` plus its stream ``seq``.

    Events written by older code (or by hand) are completed from the subject and the
    stream's timestamp, so every record has ``seq``, ``type``, ``source`` and ``time``.
    """
    meta = msg.metadata
    try:
        body = orjson.loads(msg.data)
    except orjson.JSONDecodeError:
        body = None
    event: dict[str, Any] = body if isinstance(body, dict) else {"data": {}}
    parts = msg.subject.split(".")
    if len(parts) >= 4:
        event.setdefault("source", parts[2])
        event.setdefault("type", parts[3])
    event.setdefault("time", meta.timestamp.timestamp())
    event.setdefault("severity", "info")
    event["seq"] = meta.sequence.stream
    return event


class EventLog:
    """Pages and tails of stream EVENTS over one shared connection."""

    def __init__(self, bus: Bus, stream: str = subjects.EVENTS_STREAM) -> None:
        self.bus = bus
        self.stream = stream

    # -- consumers --------------------------------------------------------------------------
    async def open_consumer(
        self,
        filter_subject: str | list[str] | None,
        *,
        start_seq: int | None = None,
        start_time: float | None = None,
        inactive: float = _PAGE_INACTIVE,
    ) -> tuple[JetStreamContext.PullSubscription, ConsumerInfo]:
        """An ephemeral pull consumer from ``start_seq``/``start_time`` (neither: new only),
        on one filter subject or several."""
        name = f"api-{secrets.token_hex(8)}"
        if start_seq is not None:
            policy, opt_seq, opt_time = DeliverPolicy.BY_START_SEQUENCE, max(1, start_seq), None
        elif start_time is not None:
            policy, opt_seq = DeliverPolicy.BY_START_TIME, None
            opt_time = datetime.fromtimestamp(start_time, UTC)
        else:
            policy, opt_seq, opt_time = DeliverPolicy.NEW, None, None
        config = ConsumerConfig(
            name=name,
            deliver_policy=policy,
            opt_start_seq=opt_seq,
            opt_start_time=opt_time,
            ack_policy=AckPolicy.NONE,
            filter_subject=filter_subject if not isinstance(filter_subject, list) else None,
            filter_subjects=filter_subject if isinstance(filter_subject, list) else None,
            inactive_threshold=inactive,
            mem_storage=True,
            num_replicas=1,
        )
        info = await self.bus.js.add_consumer(self.stream, config=config)
        try:
            sub = await self.bus.js.pull_subscribe_bind(consumer=name, stream=self.stream)
        except BaseException:
            self.discard_consumer(None, name)
            raise
        return sub, info

    def discard_consumer(
        self, sub: JetStreamContext.PullSubscription | None, name: str | None
    ) -> None:
        """Unsubscribe and delete a consumer in the background (safe in a cancelled task)."""

        async def _close() -> None:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            if name is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.bus.js.delete_consumer(self.stream, name), 5.0)

        spawn(_close(), name="api-consumer-delete")

    # -- pages ------------------------------------------------------------------------------
    async def bounds(self) -> tuple[int, int] | None:
        """(first, last) stream sequence; None when the stream does not exist."""
        try:
            info = await self.bus.js.stream_info(self.stream)
        except NotFoundError:
            return None
        return info.state.first_seq, info.state.last_seq

    async def seq_at(self, when: float) -> int:
        """The first stream sequence stored at or after ``when`` (last + 1 if none)."""
        when = min(when, _FAR_FUTURE)  # beyond 2262 JetStream's nanoseconds overflow
        sub, info = await self.open_consumer(None, start_time=when)
        self.discard_consumer(sub, info.name)
        assert info.delivered is not None
        return info.delivered.stream_seq + 1

    async def read(
        self,
        filter_subject: str,
        start: int,
        end: int,
        max_items: int,
        keep: Keep | None = None,
    ) -> list[dict[str, Any]]:
        """Up to ``max_items`` matching records with ``start <= seq <= end``, oldest first.

        ``keep`` filters what a subject cannot (severity lives in the body).
        """
        if start > end or max_items <= 0:
            return []
        sub, info = await self.open_consumer(filter_subject, start_seq=start)
        out: list[dict[str, Any]] = []
        try:
            remaining = info.num_pending or 0
            while remaining > 0 and len(out) < max_items:
                try:
                    # filtered: whole batches (how many will match is unknown)
                    want = remaining if keep is not None else min(remaining, max_items - len(out))
                    msgs = await sub.fetch(min(_FETCH, want), 5.0)
                except TimeoutError:  # messages removed meanwhile (age limit)
                    break
                for msg in msgs:
                    meta = msg.metadata
                    if meta.sequence.stream > end:
                        return out
                    remaining = meta.num_pending
                    rec = record(msg)
                    if keep is not None and not keep(rec):
                        continue
                    out.append(rec)
                    if len(out) >= max_items:
                        break
            return out
        finally:
            self.discard_consumer(sub, info.name)

    async def page(
        self,
        filter_subject: str,
        *,
        since: float | None = None,
        until: float | None = None,
        cursor: int | None = None,
        limit: int = 100,
        order: Order = "desc",
        keep: Keep | None = None,
    ) -> Page:
        """One page of matching events; ``cursor`` is the ``seq`` the previous page ended at.

        ``desc`` (newest first) returns events below the cursor, ``asc`` above it.
        ``since``/``until`` bound the time the event was stored (``until`` exclusive);
        ``keep`` drops records a subject filter cannot (they do not count to ``limit``).
        """
        bounds = await self.bounds()
        if bounds is None:
            return Page([], None)
        lo, hi = bounds
        if since is not None:
            lo = max(lo, await self.seq_at(since))
        if until is not None:
            hi = min(hi, await self.seq_at(until) - 1)
        if order == "asc":
            if cursor is not None:
                lo = max(lo, cursor + 1)
            found = await self.read(filter_subject, lo, hi, limit + 1, keep)
        else:
            if cursor is not None:
                hi = min(hi, cursor - 1)
            found = await self._read_backwards(filter_subject, lo, hi, limit + 1, keep)
        more = len(found) > limit
        events = found[:limit]
        return Page(events, events[-1]["seq"] if more and events else None)

    async def _read_backwards(
        self, filter_subject: str, lo: int, hi: int, wanted: int, keep: Keep | None = None
    ) -> list[dict[str, Any]]:
        """The newest ``wanted`` matches in ``[lo, hi]``, newest first.

        Consumers only read forwards, so windows of sequences are read from ``hi``
        downwards, each four times wider than the last (sparse matches cost a few
        round trips, dense ones one).
        """
        found: list[dict[str, Any]] = []
        top, width = hi, max(wanted, 16)
        while top >= lo and len(found) < wanted:
            start = max(lo, top - width + 1)
            window = await self.read(filter_subject, start, top, top - start + 1, keep)
            found.extend(reversed(window))
            top = start - 1
            width = min(width * 4, _MAX_WINDOW)
        return found[:wanted]

    # -- live -------------------------------------------------------------------------------
    async def tail(
        self,
        filter_subject: str | list[str],
        after: int | None,
        stop: asyncio.Event,
        poll: float = 1.0,
    ) -> AsyncIterator[dict[str, Any]]:
        """Matching records after sequence ``after`` (None: from now on), until ``stop``.

        Pulled only as fast as the caller consumes them. A consumer that disappears
        (NATS restarted, or deleted while its client was not reading) is recreated
        after the last sequence delivered, so nothing is skipped or repeated.
        """
        last = after
        sub: JetStreamContext.PullSubscription | None = None
        name: str | None = None
        try:
            while not stop.is_set():
                if sub is None:
                    try:
                        if last is None:
                            sub, info = await self.open_consumer(
                                filter_subject, inactive=_TAIL_INACTIVE
                            )
                            assert info.delivered is not None
                            last = info.delivered.stream_seq
                        else:
                            sub, info = await self.open_consumer(
                                filter_subject, start_seq=last + 1, inactive=_TAIL_INACTIVE
                            )
                        name = info.name
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        log.debug("event tail: cannot create consumer: %r", exc)
                        await _sleep(stop, poll)
                        continue
                try:
                    msgs = await sub.fetch(64, poll)
                except TimeoutError:
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # consumer gone, NATS away: start over after `last`
                    log.debug("event tail: fetch failed, recreating: %r", exc)
                    self.discard_consumer(sub, name)
                    sub = name = None
                    await _sleep(stop, poll)
                    continue
                for msg in msgs:
                    seq = msg.metadata.sequence.stream
                    if last is not None and seq <= last:
                        continue
                    last = seq
                    yield record(msg)
        finally:
            if sub is not None:
                self.discard_consumer(sub, name)


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
