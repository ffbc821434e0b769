"""Flow capture: a bounded in-memory queue drained by one publisher task.

The request path only calls ``emit(flow)`` (a deque append and a few integer
operations). The publisher turns queued flows into JSON events at drain time,
which gives coalescing for free: a flow that finished before its ``started``
entry was drained is sent once, as its final event. Serialising there is also
where secrets are taken out (``services.proxy.redact``): nothing the relay does
per request depends on it.

Events go out in batches, one JetStream message per batch with a ``Nats-Msg-Id``
so a retried batch is stored once. Every batch fits the server's real
``max_payload`` (from the connection's INFO); an event that could not fit in one
message on its own is shrunk (bodies first, then headers) and marked truncated.

The queue is bounded twice: by events (``queue_size``) and by the bytes of the
bodies and headers its entries hold (``queue_bytes``), so NATS being down costs
a bounded amount of memory whatever the traffic. Over either bound new events
are dropped and counted; publishing resumes by itself when NATS is back.

A publish that fails for a reason retrying cannot fix (a message over the
server's limits, a request the server rejects) is split or dropped and counted
as undeliverable, never retried unchanged; timeouts and disconnects are retried
with the same message id. At shutdown what is still queued, or the batch being
published, is counted as undeliverable when it cannot go out in time.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from binascii import b2a_base64
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import nats.errors
import nats.js.errors
import orjson

from libs.common import subjects, telemetry
from services.proxy import redact
from services.proxy.flow import ACTIVE, COMPLETED, KILLED, Flow
from services.proxy.redact import Redaction

if TYPE_CHECKING:
    from services.proxy.config import ProxyConfig

log = logging.getLogger("proxyfleet.capture")

_RESERVED = 4096  # room for headers and the JSON array brackets within max_payload
_SLICE = 32  # events serialised between two yields to the event loop
_TRACEPARENT_LEN = 55
_SHRINK_SLACK = 256  # bytes kept free when sizing trimmed bodies (JSON fields that grow)
_UNKNOWN_RETRIES = 8  # attempts before an unrecognised publish error counts as permanent
_EXACT_AFTER = 64  # queued entries from which header bytes are counted exactly (see emit)
_HEADER_GUESS = 64  # bytes per header assumed while the queue is shorter
DEFAULT_QUEUE_BYTES = 128 << 20


class Publisher(Protocol):
    """What capture needs from the bus (a ``libs.common.bus.Bus`` fits)."""

    @property
    def connected(self) -> bool: ...

    @property
    def max_payload(self) -> int: ...

    async def js_publish(
        self, subject: str, payload: bytes, msg_id: str | None = None, *, traces: Sequence[str] = ()
    ) -> Any: ...


def _addr(addr: Any) -> list[Any] | None:
    return [addr[0], addr[1]] if addr else None


def _body(chunks: list[bytes], limit: int) -> str:
    if not chunks or limit <= 0:
        return ""
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return b2a_base64(data[:limit] if len(data) > limit else data, newline=False).decode("ascii")


def _captured(chunks: list[bytes]) -> int:
    return sum(map(len, chunks))


def head_bytes(pairs: list[tuple[bytes, bytes]]) -> int:
    """Bytes of names and values in a header list (what a queued entry holds for it)."""
    return sum([len(n) + len(v) for n, v in pairs])


def _trim_headers(headers: list[list[str]], budget: int) -> tuple[list[list[str]], bool]:
    """Keep headers in order while their names and values fit ``budget`` characters;
    the one that straddles the budget keeps the start of its value."""
    out: list[list[str]] = []
    left = budget
    for name, value in headers:
        need = len(name) + len(value)
        if need <= left:
            out.append([name, value])
            left -= need
            continue
        if left > len(name):
            out.append([name, value[: left - len(name)]])
        return out, True
    return out, False


def flow_event(
    flow: Flow,
    replica: str,
    body_limit: int | tuple[int, int] | None = None,
    *,
    redaction: Redaction = redact.DEFAULT,
    header_budget: int | None = None,
) -> dict[str, Any]:
    """The wire form of a flow: ``started`` while active, else its final state.

    ``redaction`` removes or masks secret headers (request and response). The
    other two only serve events that would not fit in one NATS message:
    ``body_limit`` trims captured bodies further (one limit, or one per
    direction), ``header_budget`` keeps at most that many characters of header
    names and values per direction. Whatever they cut is marked truncated.
    """
    final = flow.state != ACTIVE
    req_headers = redaction.headers(flow.req_headers)
    req_cut = resp_cut = False
    if header_budget is not None:
        req_headers, req_cut = _trim_headers(req_headers, header_budget)
    request: dict[str, Any] = {
        "headers": req_headers,
        "size": flow.req_size,
        "truncated": flow.req_truncated or req_cut,
    }
    if req_cut:
        request["headers_truncated"] = True
    response: dict[str, Any] | None = None
    if flow.status:
        resp_headers = redaction.headers(flow.resp_headers)
        if header_budget is not None:
            resp_headers, resp_cut = _trim_headers(resp_headers, header_budget)
        response = {
            "status": flow.status,
            "reason": flow.reason.decode("latin-1"),
            "http_version": flow.resp_http_version,
            "headers": resp_headers,
            "size": flow.resp_size,
            "truncated": flow.resp_truncated or resp_cut,
        }
        if resp_cut:
            response["headers_truncated"] = True
    if final:
        if body_limit is None:
            req_limit = resp_limit = 1 << 62
        elif isinstance(body_limit, tuple):
            req_limit, resp_limit = body_limit
        else:
            req_limit = resp_limit = body_limit
        request["body_b64"] = _body(flow.req_body, req_limit)
        if flow.req_size > req_limit:
            request["truncated"] = True
        if response is not None:
            response["body_b64"] = _body(flow.resp_body, resp_limit)
            if flow.resp_size > resp_limit:
                response["truncated"] = True
    return {
        "event": ("completed" if flow.state == COMPLETED else flow.state) if final else "started",
        "id": flow.id,
        "replica": replica,
        "kind": flow.kind,
        "state": flow.state,
        "client": _addr(flow.client_addr),
        "server": _addr(flow.server_addr),
        "scheme": flow.scheme,
        "method": flow.method.decode("latin-1"),
        "host": flow.host,
        "port": flow.port,
        "path": flow.path.decode("latin-1"),
        "http_version": flow.http_version,
        "request": request,
        "response": response,
        "timings": {
            "start": flow.t_start,
            # the new upstream connection's phases (null: a pooled connection was reused,
            # or the phase did not happen: no tls for http; the client side's own TLS
            # handshake with the proxy is not measured)
            "dns": flow.t_dns or None,
            "connect": flow.t_connect or None,
            "tls": flow.t_tls or None,
            "request_sent": flow.t_request_sent or None,
            "first_byte": flow.t_first_byte or None,
            "end": flow.t_end or None,
        },
        "error": flow.error,
        "stats": flow.stats,
        "trace_id": flow.trace_id,
        "traceparent": flow.traceparent,
        "tags": flow.tags or [],
        "policy": None
        if flow.policy is None
        else {"revision": flow.policy[0], "matched": flow.policy[1]},
        "intercept": flow.intercept,
        "replay_of": flow.replay_of,
        "is_replay": "request" if flow.replay_of else None,
    }


# Label values of finished flows: index ``status // 100`` for completed flows (0: no
# usable status), then the two final states that are not a response.
STATUS_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx", "error", "killed")
_ERROR_CLASS, _KILLED_CLASS = 6, 7
# Upper bounds (seconds) of the upstream latency histogram: request sent -> first byte.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class FlowTally:
    """Totals of finished flows, kept by the publisher as it serialises final events.

    Counting there keeps metrics off the request path (the relay only appends to
    the queue); the numbers are plain ints that the metrics collector reads at
    scrape time. A flow is counted once, when its final event (or the coalesced
    one) leaves the queue: flows still queued, and flows whose final event was
    dropped on overflow, are not in here (``Capture.dropped_final`` counts those).
    """

    __slots__ = (
        "by_class",
        "bytes_client_to_server",
        "bytes_server_to_client",
        "latency_buckets",
        "latency_sum",
    )

    def __init__(self) -> None:
        self.by_class = [0] * len(STATUS_CLASSES)
        self.bytes_client_to_server = 0  # request bodies, tunnel and websocket bytes
        self.bytes_server_to_client = 0  # response bodies, tunnel and websocket bytes
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # not cumulative; last: +Inf
        self.latency_sum = 0.0

    def count(self, flow: Flow) -> None:
        state = flow.state
        if state == COMPLETED:
            status = flow.status
            self.by_class[status // 100 if 100 <= status < 600 else 0] += 1
        else:
            self.by_class[_KILLED_CLASS if state == KILLED else _ERROR_CLASS] += 1
        self.bytes_client_to_server += flow.req_size
        self.bytes_server_to_client += flow.resp_size
        stats = flow.stats
        if stats is not None:
            self.bytes_client_to_server += stats.get("bytes_client_to_server", 0)
            self.bytes_server_to_client += stats.get("bytes_server_to_client", 0)
        sent, first = flow.t_request_sent, flow.t_first_byte
        if sent and first:
            wait = first - sent if first > sent else 0.0
            self.latency_buckets[bisect_left(LATENCY_BUCKETS, wait)] += 1
            self.latency_sum += wait

    @property
    def latency_count(self) -> int:
        return sum(self.latency_buckets)


# What a failed publish means for its batch.
_TRANSIENT = "transient"  # retry the same message (same id) later
_TOO_LARGE = "too_large"  # the message is over a server limit: split it, or drop one event
_PERMANENT = "permanent"  # the server refuses this message: drop it, counted
_UNKNOWN = "unknown"  # retried a few times, then treated as permanent

_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,  # nats.errors.TimeoutError is one too
    nats.errors.NoRespondersError,  # no stream listening yet (JetStream starting, stream gone)
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.UnexpectedEOF,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
    ConnectionError,
)
_MSG_TOO_LARGE = 10054  # JetStream err_code: message size exceeds maximum allowed


def publish_verdict(exc: BaseException) -> str:
    """Classify a publish failure: may the same message succeed if it is sent again?"""
    if isinstance(exc, nats.errors.MaxPayloadError):
        return _TOO_LARGE
    if isinstance(exc, nats.js.errors.APIError) and not isinstance(
        exc, nats.js.errors.ServiceUnavailableError
    ):
        if exc.err_code == _MSG_TOO_LARGE or exc.code == 413:
            return _TOO_LARGE
        if exc.code is not None and 400 <= exc.code < 500:
            return _PERMANENT  # bad request: the same bytes will be refused again
        return _TRANSIENT  # 5xx: the server's trouble, not the message's
    if isinstance(exc, _TRANSIENT_ERRORS):
        return _TRANSIENT
    if isinstance(exc, (nats.errors.BadSubjectError, nats.errors.BadHeaderError, ValueError)):
        return _PERMANENT
    return _UNKNOWN


@dataclass(slots=True)
class Batch:
    """Serialised events on their way to the stream as one message."""

    msg_id: str
    events: list[bytes] = field(default_factory=list)
    finals: int = 0  # how many of ``events`` are a flow's final event
    final_flags: list[bool] = field(default_factory=list)
    traces: list[str] = field(default_factory=list)  # traceparents of sampled flows

    def payload(self) -> bytes:
        return b"[" + b",".join(self.events) + b"]"


@dataclass(frozen=True, slots=True)
class Abandoned:
    """What could not be published before shutdown."""

    events: int
    flows: int  # flows whose final state was never published


class Capture:
    """The bounded event queue and its single publisher task."""

    def __init__(
        self,
        replica: str,
        bus: Publisher | None,
        queue_size: int = 100_000,
        batch_max: int = 256,
        linger: float = 0.005,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
    ) -> None:
        self.replica = replica
        self.bus = bus
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self.batch_max = batch_max
        self.linger = linger
        self.subject = subjects.flows_subject(replica)
        # entries: (flow, bytes accounted for it when queued); see ``emit``
        self._queue: deque[tuple[Flow, int]] = deque()
        self.queued_bytes = 0
        self._outbox: deque[Batch] = deque()  # taken off the queue, not yet delivered
        self._wakeup = asyncio.Event()
        self._boot = secrets.token_hex(4)
        self._seq = 0
        self.body_limit = 1 << 20  # the config's capture_body_limit (``configure``)
        self._names = redact.DEFAULT
        self._key_digests: frozenset[bytes] = frozenset()
        self.redaction = redact.DEFAULT
        self.dropped = 0  # events refused by a full queue (by count or by bytes)
        self.dropped_final = 0  # of ``dropped``: final events (their flow goes unrecorded)
        self.undeliverable = 0  # events taken but never published (refused, or at shutdown)
        self.undeliverable_final = 0  # of ``undeliverable``: final events
        self.truncated = 0  # events shrunk to fit one NATS message
        self.published = 0
        self.batches = 0
        self.tally = FlowTally()

    # -- configuration (control plane) ---------------------------------------------------
    def configure(self, config: ProxyConfig) -> None:
        """Take up a config revision: its body limit and header redaction."""
        self.body_limit = config.doc.capture_body_limit
        self._names = config.redact
        self.redaction = Redaction(config.redact.names, self._key_digests)

    def set_key_digests(self, digests: frozenset[bytes]) -> None:
        """The SHA-256 digests of the fleet's API keys (masked wherever they are seen)."""
        self._key_digests = digests
        self.redaction = Redaction(self._names.names, digests)

    # -- the hot path ----------------------------------------------------------------------
    def emit(self, flow: Flow) -> None:
        """Queue ``flow`` for publishing (hot path: never blocks, never awaits).

        Each entry is accounted the bytes its event will need from the flow: the
        request headers for a ``started`` entry; headers and captured bodies for a
        final one (captured body = the size up to the body limit, no walk over the
        chunks). Header bytes are counted exactly once the queue backs up (NATS slow
        or down); while the publisher keeps up and the queue is short they are
        estimated per header, which keeps emit a few integer operations on the hot
        path (the short queue cannot hold much: heads are capped at 64 KiB).

        A final event that does not fit is dropped and the flow lets go of its
        bodies and response headers, since a queued ``started`` entry still
        references the flow (it then goes out with the final state, marked truncated).
        """
        q = self._queue
        queued = len(q)
        short = queued < _EXACT_AFTER
        if flow.state == ACTIVE:
            n = len(flow.req_headers) * _HEADER_GUESS if short else head_bytes(flow.req_headers)
        else:
            lim = self.body_limit
            a, b = flow.req_size, flow.resp_size
            n = (a if a < lim else lim) + (b if b < lim else lim)
            if short:
                n += (len(flow.req_headers) + len(flow.resp_headers)) * _HEADER_GUESS
            else:
                n += head_bytes(flow.req_headers) + head_bytes(flow.resp_headers)
        if queued >= self.queue_size or self.queued_bytes + n > self.queue_bytes:
            self._drop(flow)
            return
        q.append((flow, n))
        self.queued_bytes += n
        self._wakeup.set()

    def _drop(self, flow: Flow) -> None:
        self.dropped += 1
        if flow.state != ACTIVE:
            self.dropped_final += 1
            if flow.req_body:
                flow.req_body = []
                flow.req_truncated = True
            if flow.resp_body or flow.resp_headers:
                flow.resp_body = []
                flow.resp_headers = []
                flow.resp_truncated = True

    @property
    def pending(self) -> int:
        return len(self._queue)

    # -- taking batches --------------------------------------------------------------------
    def _new_batch(self) -> Batch:
        self._seq += 1
        return Batch(f"{self.replica}.{self._boot}.{self._seq}")

    def _fill(self, batch: Batch, room: int, limit: int, count: int) -> int:
        """Move up to ``count`` queued events into ``batch`` while they fit in ``room``
        bytes; ``limit`` is what one message may hold. Returns the room left.

        The budget holds for the whole batch however it is taken (one slice or many):
        an event that does not fit in what is left waits for the next batch, and one
        that would not fit in any message is shrunk here.
        """
        q = self._queue
        events = batch.events
        red = self.redaction
        traces = batch.traces if telemetry.ENABLED else None
        end = len(events) + count
        while q and len(events) < end:
            flow, n = q[0]
            if flow.final_sent:  # its final event already went out (coalesced)
                q.popleft()
                self.queued_bytes -= n
                continue
            data: bytes | None = orjson.dumps(flow_event(flow, self.replica, redaction=red))
            assert data is not None
            if len(data) + 1 > limit:
                data = self._shrink(flow, limit - 1)
            if data is not None and len(data) + 1 > room and events:
                break  # the next batch starts with it
            q.popleft()
            self.queued_bytes -= n
            final = flow.state != ACTIVE
            if final:
                flow.final_sent = True
                self.tally.count(flow)
            if data is None:  # not even its bare head fits in one message
                self.undeliverable += 1
                self.undeliverable_final += final
                log.warning("flow %s: event cannot fit in one NATS message; dropped", flow.id)
                continue
            if final:
                batch.finals += 1
                if traces is not None:  # tracing on: this flow's store span needs its trace
                    tp = flow.traceparent
                    if tp is not None and telemetry.is_sampled(tp):
                        traces.append(tp)
            events.append(data)
            batch.final_flags.append(final)
            room -= len(data) + 1
        return room

    def _take_batch(self, budget: int, max_count: int | None = None) -> Batch:
        """One batch of up to ``max_count`` (default ``batch_max``) events in ``budget`` bytes."""
        batch = self._new_batch()
        self._fill(batch, budget, budget, max_count or self.batch_max)
        return batch

    async def _take_batch_yielding(self, budget: int) -> Batch:
        """``_take_batch`` in slices, letting the relay run in between: serialising a
        full batch at once would hold every connection up for a millisecond or two."""
        batch = self._new_batch()
        room = budget
        while len(batch.events) < self.batch_max and self._queue:
            before = len(batch.events)
            room = self._fill(batch, room, budget, min(_SLICE, self.batch_max - before))
            if len(batch.events) == before and (not self._queue or batch.events):
                break  # full (the next event waits), or nothing left
            if self._queue and len(batch.events) < self.batch_max:
                await asyncio.sleep(0)
        return batch

    def _shrink(self, flow: Flow, limit: int) -> bytes | None:
        """The event of ``flow`` trimmed to at most ``limit`` bytes, or None if impossible.

        Bodies go first: the room left by the event without bodies is shared between
        them (a small one keeps all of it, the other gets the rest). If headers alone
        are too big, they are cut too (per direction, halving until it fits).
        """
        self.truncated += 1
        red = self.redaction
        replica = self.replica
        bare = orjson.dumps(flow_event(flow, replica, 0, redaction=red))
        if len(bare) <= limit:
            if flow.state == ACTIVE:
                return bare  # a started event carries no bodies: nothing else to cut
            room = max(0, (limit - len(bare) - _SHRINK_SLACK) * 3 // 4)  # base64: 4/3
            req_have, resp_have = _captured(flow.req_body), _captured(flow.resp_body)
            half = room // 2
            if req_have <= half:
                limits = (req_have, room - req_have)
            elif resp_have <= half:
                limits = (room - resp_have, resp_have)
            else:
                limits = (half, room - half)
            while True:
                data = orjson.dumps(flow_event(flow, replica, limits, redaction=red))
                if len(data) <= limit or limits == (0, 0):
                    return data if len(data) <= limit else bare
                limits = (limits[0] // 2, limits[1] // 2)
        budget = limit // 2
        while budget > 0:
            data = orjson.dumps(flow_event(flow, replica, 0, redaction=red, header_budget=budget))
            if len(data) <= limit:
                return data
            budget //= 2
        data = orjson.dumps(flow_event(flow, replica, 0, redaction=red, header_budget=0))
        return data if len(data) <= limit else None

    def _budget(self, bus: Publisher) -> int:
        """Payload bytes a batch may use: ``max_payload`` less the room for headers (with
        tracing on, the traceparents of up to ``batch_max`` flows)."""
        reserved = _RESERVED
        if telemetry.ENABLED:
            reserved += (_TRACEPARENT_LEN + 1) * self.batch_max
        max_payload = bus.max_payload
        return max(max_payload - reserved, max_payload // 2)

    # -- publishing ------------------------------------------------------------------------
    async def run(self) -> None:
        """Publish until cancelled (see ``_deliver`` for what a failure does)."""
        assert self.bus is not None
        bus = self.bus
        while True:
            if self._outbox:  # left over from a cancelled delivery
                await self._deliver()
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.linger:
                await asyncio.sleep(self.linger)
            while not bus.connected:
                await asyncio.sleep(0.1)
            batch = await self._take_batch_yielding(self._budget(bus))
            if batch.events:
                self._outbox.append(batch)
                await self._deliver()

    async def _deliver(self) -> None:
        """Publish the outbox in order. Transient failures are retried with the same
        message id (the stream deduplicates); a message over a server limit is split in
        two (one event alone: dropped); a message the server refuses is dropped. Drops
        are counted in ``undeliverable``. Cancelling leaves the current batch in the
        outbox, so ``flush`` can still send it (same id) or count it."""
        assert self.bus is not None
        bus = self.bus
        delay = 0.1
        unknown = 0
        while self._outbox:
            batch = self._outbox[0]
            while not bus.connected:
                await asyncio.sleep(0.1)
            try:
                if batch.traces:  # tracing on: the batch span links to its flows' spans
                    await bus.js_publish(
                        self.subject, batch.payload(), msg_id=batch.msg_id, traces=batch.traces
                    )
                else:
                    await bus.js_publish(self.subject, batch.payload(), msg_id=batch.msg_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                verdict = publish_verdict(exc)
                if verdict == _UNKNOWN:
                    unknown += 1
                    if unknown >= _UNKNOWN_RETRIES:
                        verdict = _PERMANENT
                if verdict == _TOO_LARGE and len(batch.events) > 1:
                    self._outbox.popleft()
                    first, second = self._split(batch)
                    self._outbox.appendleft(second)
                    self._outbox.appendleft(first)
                    log.info("flow batch over a server limit (%r): split in two", exc)
                    continue
                if verdict in (_TOO_LARGE, _PERMANENT):
                    self._outbox.popleft()
                    self._give_up(batch)
                    log.warning(
                        "flow batch refused (%d events dropped, not retried): %r",
                        len(batch.events),
                        exc,
                    )
                    unknown = 0
                    continue
                log.warning(
                    "flow batch publish failed (%d events, retrying): %r", len(batch.events), exc
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._outbox.popleft()
            self.published += len(batch.events)
            self.batches += 1
            delay = 0.1
            unknown = 0

    def _split(self, batch: Batch) -> tuple[Batch, Batch]:
        """Two batches (new message ids: the refused one was never stored)."""
        mid = len(batch.events) // 2
        halves = (self._new_batch(), self._new_batch())
        for half, sl in zip(halves, (slice(None, mid), slice(mid, None)), strict=True):
            half.events = batch.events[sl]
            half.final_flags = batch.final_flags[sl]
            half.finals = sum(half.final_flags)
        halves[0].traces = batch.traces  # links only: the consumer continues each one once
        return halves

    def _give_up(self, batch: Batch) -> None:
        self.undeliverable += len(batch.events)
        self.undeliverable_final += batch.finals

    async def flush(self, timeout: float) -> bool:
        """Publish what is queued (and a batch a cancelled publisher left), giving up
        after ``timeout`` seconds; True if nothing is left. Used on shutdown."""
        if self.bus is None:
            return not self._queue
        bus = self.bus

        async def _drain() -> None:
            await self._deliver()
            while self._queue:
                while not bus.connected:
                    await asyncio.sleep(0.1)
                batch = self._take_batch(self._budget(bus))
                if batch.events:
                    self._outbox.append(batch)
                    await self._deliver()

        try:
            async with asyncio.timeout(timeout):
                await _drain()
        except TimeoutError:
            pass
        return not self._queue and not self._outbox

    def abandon(self) -> Abandoned:
        """Count what is still queued or unsent as undeliverable and let go of it (the
        replica is stopping). ``flows``: flows whose final state is lost with it."""
        events = finals = 0
        for batch in self._outbox:  # their flows are marked final_sent: not seen below
            events += len(batch.events)
            finals += batch.finals
        lost_flows = finals
        seen: set[str] = set()
        for flow, _ in self._queue:
            if flow.final_sent or flow.id in seen:
                continue  # one event per flow would have gone out (coalescing)
            seen.add(flow.id)
            events += 1
            lost_flows += 1
            finals += flow.state != ACTIVE
        self._outbox.clear()
        self._queue.clear()
        self.queued_bytes = 0
        self.undeliverable += events
        self.undeliverable_final += finals
        return Abandoned(events, lost_flows)
