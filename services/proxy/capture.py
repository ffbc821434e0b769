"""Flow capture: a bounded in-memory queue drained by one publisher task.

The request path only calls ``emit(flow)`` (a deque append). The publisher
turns queued flows into JSON events at drain time, which gives coalescing for
free: a flow that finished before its ``started`` entry was drained is sent
once, as its final event. Events go out in batches, one JetStream message per
batch with a ``Nats-Msg-Id`` so a retried batch is stored once. When NATS is
down or slow the queue fills up to its bound, then new events are dropped and
counted; publishing resumes by itself when NATS is back.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from binascii import b2a_base64
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import orjson

from libs.common import subjects, telemetry
from services.proxy.flow import ACTIVE, COMPLETED, KILLED, Flow

log = logging.getLogger("proxyfleet.capture")

_RESERVED = 4096  # room for headers and the JSON array brackets within max_payload
_SLICE = 32  # events serialised between two yields to the event loop
_TRACEPARENT_LEN = 55


class Publisher(Protocol):
    """What capture needs from the bus (a ``libs.common.bus.Bus`` fits)."""

    @property
    def connected(self) -> bool: ...

    @property
    def max_payload(self) -> int: ...

    async def js_publish(
        self, subject: str, payload: bytes, msg_id: str | None = None, *, traces: Sequence[str] = ()
    ) -> Any: ...


def _headers(pairs: list[tuple[bytes, bytes]]) -> list[list[str]]:
    return [[n.decode("latin-1"), v.decode("latin-1")] for n, v in pairs]


def _addr(addr: Any) -> list[Any] | None:
    return [addr[0], addr[1]] if addr else None


def _body(chunks: list[bytes], limit: int) -> str:
    if not chunks:
        return ""
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return b2a_base64(data[:limit] if len(data) > limit else data, newline=False).decode("ascii")


def flow_event(flow: Flow, replica: str, body_limit: int | None = None) -> dict[str, Any]:
    """The wire form of a flow: ``started`` while active, else its final state.

    ``body_limit`` trims captured bodies further (only used when an event would
    not fit in one NATS message); trimmed bodies are marked truncated.
    """
    final = flow.state != ACTIVE
    limit = body_limit if body_limit is not None else 1 << 62
    request: dict[str, Any] = {
        "headers": _headers(flow.req_headers),
        "size": flow.req_size,
        "truncated": flow.req_truncated,
    }
    response: dict[str, Any] | None = None
    if flow.status:
        response = {
            "status": flow.status,
            "reason": flow.reason.decode("latin-1"),
            "http_version": flow.resp_http_version,
            "headers": _headers(flow.resp_headers),
            "size": flow.resp_size,
            "truncated": flow.resp_truncated,
        }
    if final:
        request["body_b64"] = _body(flow.req_body, limit)
        if body_limit is not None and flow.req_size > body_limit:
            request["truncated"] = True
        if response is not None:
            response["body_b64"] = _body(flow.resp_body, limit)
            if body_limit is not None and flow.resp_size > body_limit:
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
            "request_sent": flow.t_request_sent or None,
            "first_byte": flow.t_first_byte or None,
            "end": flow.t_end or None,
        },
        "error": flow.error,
        "stats": flow.stats,
        "trace_id": flow.trace_id,
        "traceparent": flow.traceparent,
        "tags": [],
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


class Capture:
    """The bounded event queue and its single publisher task."""

    def __init__(
        self,
        replica: str,
        bus: Publisher | None,
        queue_size: int = 100_000,
        batch_max: int = 256,
        linger: float = 0.005,
    ) -> None:
        self.replica = replica
        self.bus = bus
        self.queue_size = queue_size
        self.batch_max = batch_max
        self.linger = linger
        self.subject = subjects.flows_subject(replica)
        self._queue: deque[Flow] = deque()
        self._wakeup = asyncio.Event()
        self._boot = secrets.token_hex(4)
        self._seq = 0
        self.dropped = 0
        self.dropped_final = 0  # of ``dropped``: final events (their flow goes unrecorded)
        self.published = 0
        self.batches = 0
        self.tally = FlowTally()
        self._traces: list[str] = []  # traceparents of sampled flows in the batch being built

    def emit(self, flow: Flow) -> None:
        """Queue ``flow`` for publishing (hot path: never blocks, never awaits)."""
        if len(self._queue) >= self.queue_size:
            self.dropped += 1
            if flow.state != ACTIVE:
                self.dropped_final += 1
            return
        self._queue.append(flow)
        self._wakeup.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _take_batch(self, max_bytes: int, max_count: int | None = None) -> list[bytes]:
        """Serialise queued flows into events, up to ``max_count`` (default ``batch_max``)
        and ``max_bytes``."""
        out: list[bytes] = []
        size = 0
        q = self._queue
        count = max_count or self.batch_max
        traces = self._traces if telemetry.ENABLED else None
        while q and len(out) < count:
            flow = q[0]
            if flow.final_sent:  # its final event already went out (coalesced)
                q.popleft()
                continue
            data = orjson.dumps(flow_event(flow, self.replica))
            if len(data) > max_bytes:
                data = self._shrink(flow, max_bytes)
            if out and size + len(data) + 1 > max_bytes:
                break
            q.popleft()
            if flow.state != ACTIVE:
                flow.final_sent = True
                self.tally.count(flow)
                if traces is not None:  # tracing on: this flow's store span needs its trace
                    tp = flow.traceparent
                    if tp is not None and telemetry.is_sampled(tp):
                        traces.append(tp)
            out.append(data)
            size += len(data) + 1
        return out

    async def _take_batch_yielding(self, max_bytes: int) -> list[bytes]:
        """``_take_batch`` in slices, letting the relay run in between: serialising a
        full batch at once would hold every connection up for a millisecond or two."""
        out: list[bytes] = []
        while len(out) < self.batch_max and self._queue:
            part = self._take_batch(max_bytes, min(_SLICE, self.batch_max - len(out)))
            if not part:
                break
            out += part
            max_bytes -= sum(len(p) + 1 for p in part)
            if self._queue and len(out) < self.batch_max:
                await asyncio.sleep(0)
        return out

    def _shrink(self, flow: Flow, max_bytes: int) -> bytes:
        """Re-serialise a flow whose bodies do not fit in one message, trimming them."""
        limit = max(0, (max_bytes - 16_384) * 3 // 8)  # base64 grows 4/3, two bodies
        while True:
            data = orjson.dumps(flow_event(flow, self.replica, body_limit=limit))
            if len(data) <= max_bytes or limit == 0:
                return data
            limit //= 2

    async def run(self) -> None:
        """Publish until cancelled; a failed batch is retried with the same message id."""
        assert self.bus is not None
        bus = self.bus
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.linger:
                await asyncio.sleep(self.linger)
            while not bus.connected:
                await asyncio.sleep(0.1)
            batch = await self._take_batch_yielding(self._budget(bus))
            if not batch:
                continue
            await self._publish(b"[" + b",".join(batch) + b"]", len(batch))

    def _budget(self, bus: Publisher) -> int:
        """Payload bytes a batch may use: ``max_payload`` less the room for headers (with
        tracing on, the traceparents of up to ``batch_max`` flows)."""
        reserved = _RESERVED
        if telemetry.ENABLED:
            reserved += (_TRACEPARENT_LEN + 1) * self.batch_max
        return max(bus.max_payload - reserved, 64 * 1024)

    async def _publish(self, payload: bytes, count: int) -> None:
        assert self.bus is not None
        self._seq += 1
        msg_id = f"{self.replica}.{self._boot}.{self._seq}"
        traces, self._traces = self._traces, []
        delay = 0.1
        while True:
            try:
                if traces:  # tracing on: the batch span links to its flows' spans
                    await self.bus.js_publish(self.subject, payload, msg_id=msg_id, traces=traces)
                else:
                    await self.bus.js_publish(self.subject, payload, msg_id=msg_id)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("flow batch publish failed (%d events, retrying): %r", count, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.published += count
        self.batches += 1

    async def flush(self, timeout: float) -> None:
        """Publish what is queued (used on shutdown), giving up after ``timeout``."""
        if self.bus is None:
            return
        bus = self.bus

        async def _drain() -> None:
            while self._queue:
                while not bus.connected:
                    await asyncio.sleep(0.1)
                batch = self._take_batch(self._budget(bus))
                if batch:
                    await self._publish(b"[" + b",".join(batch) + b"]", len(batch))

        try:
            await asyncio.wait_for(_drain(), timeout)
        except TimeoutError:
            log.warning("shutdown: %d flow events not published", len(self._queue))
