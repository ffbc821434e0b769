"""The thin layer every service uses to talk over NATS.

It owns the connection policy (retry the first connect for a bounded time, then
reconnect forever), creates the streams and KV buckets with the retention the
design asks for, and offers the few messaging shapes we use: JetStream publish
with a ``Nats-Msg-Id``, request/reply, and scatter-gather to every replica.

It is also the one place where W3C trace context crosses NATS (when tracing is
on, see ``libs.common.telemetry``): every publish and request injects
``traceparent`` into the message headers inside a ``<subject> publish`` span
(PRODUCER for streams, CLIENT for requests), and handlers run in a
``<subject> process`` span continuing it (``processing`` for one request,
``processing_batch`` for a fetched batch of stream messages, with links). A batch
message that carries many flows names their traces in a header so the consumer
can continue each flow's trace. With tracing off none of this runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import UnexpectedEOF
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StreamConfig
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind

from libs.common import natsurl, subjects, telemetry

log = logging.getLogger("proxyfleet.bus")

FLOWS_MAX_AGE = 24 * 3600.0
FLOWS_MAX_BYTES = 4 << 30
EVENTS_MAX_AGE = 7 * 24 * 3600.0
DUPLICATE_WINDOW = 120.0
_NOT_CLUSTERED = 10074  # JetStream err_code: replicas > 1 not supported in non-clustered mode


_TRACER = "proxyfleet.bus"
_MAX_LINKS = 128  # the SDK's default limit of links per span: more would be dropped anyway
_NOOP: AbstractContextManager[None] = contextlib.nullcontext()


class BusUnavailable(Exception):
    """NATS could not be reached within the start-up deadline."""


def _is_auth_error(exc: BaseException) -> bool:
    """The server refused our credentials (or their absence)."""
    text = str(exc).lower()
    return "authorization violation" in text or "authentication" in text


def _refused_at_start(client: NATS, exc: BaseException) -> bool:
    """The server refused our credentials during the first connect: it says so (-ERR
    Authorization Violation), or it asked for auth in its INFO and then closed on us
    before that -ERR was read (which of the two a client sees is a race)."""
    if _is_auth_error(exc):
        return True
    info = getattr(client, "_server_info", None) or {}
    closed = isinstance(exc, (UnexpectedEOF, ConnectionError))
    return bool(info.get("auth_required")) and closed


class Bus:
    """A connected NATS client plus its JetStream context.

    ``last_reconnect`` is the ``time.monotonic()`` of the last time the connection came
    back after an outage (None: it never dropped), so that a service can tell data it
    could not see while away (the store's replica registry check) from real silence.
    """

    def __init__(self, nc: NATS, replicas: int = 1) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.last_reconnect: float | None = None
        self.replicas = replicas  # of the streams and buckets this bus creates
        self._grown: set[str] = set()  # buckets whose replicas were checked already

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str,
        timeout: float = 15.0,
        on_state: Callable[[bool], Awaitable[None] | None] | None = None,
        replicas: int = 1,
    ) -> Bus:
        """Connect, retrying for up to ``timeout`` seconds; then reconnect forever.

        ``url``: comma-separated servers; credentials, if any, in the URL
        (``nats://user:password@host:port`` or ``nats://token@host:port``, percent-encoded,
        see ``libs.common.natsurl``). They are handed to the client apart from the
        servers, and only ``natsurl.redact(url)`` is ever logged or put in an error.
        ``on_state(connected)`` is called on every disconnect/reconnect so that a
        service can report (not block on) the bus state. ``replicas``: how many copies
        of each stream and KV bucket this bus creates keep (``FLEET_NATS_REPLICAS``; see
        ``ensure_streams``).
        """

        async def _notify(up: bool) -> None:
            if on_state is not None:
                res = on_state(up)
                if res is not None:
                    await res

        async def disconnected() -> None:
            if nc_ref and (nc_ref[0].is_closed or nc_ref[0].is_draining):
                return  # our own close(), not an outage
            log.warning("nats disconnected")
            await _notify(False)

        async def reconnected() -> None:
            if bus_ref:
                bus_ref[0].last_reconnect = time.monotonic()
            log.info("nats reconnected to %s", nc.connected_url.netloc if nc.connected_url else "?")
            await _notify(True)

        async def error(exc: Exception) -> None:
            if refused.is_set():  # the refusal is the reason; later retries add nothing
                return
            if not nc_ref and _refused_at_start(client, exc):
                exc = ConnectionRefusedError("authorization violation")
                refused.set()  # at start-up, retrying the same credentials cannot help
            last_error[:] = [exc]
            if _is_auth_error(exc):
                # every retry fails the same way: say it once, at warning level
                log.log(logging.DEBUG if auth_warned else logging.WARNING, "nats: %s", exc)
                auth_warned.append(True)
            else:
                log.debug("nats error: %r", exc)

        nc_ref: list[NATS] = []
        bus_ref: list[Bus] = []
        last_error: list[Exception] = []
        auth_warned: list[bool] = []
        target = natsurl.parse(url)
        shown = natsurl.redact(url)
        credentials = target.options()
        refused = asyncio.Event()
        # With max_reconnect_attempts=-1 nats-py keeps retrying the first connect
        # itself, so the start-up deadline is enforced around the whole call; a refusal
        # of our credentials ends it at once.
        client = NATS()
        options: dict[str, Any] = {
            "name": name,
            "connect_timeout": max(1, min(5, int(timeout))),
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "allow_reconnect": True,
            "disconnected_cb": disconnected,
            "reconnected_cb": reconnected,
            "error_cb": error,
            **credentials,
        }
        connecting = asyncio.ensure_future(client.connect(target.servers, **options))
        watching = asyncio.ensure_future(refused.wait())
        try:
            await asyncio.wait(
                {connecting, watching}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            watching.cancel()
            if not connecting.done():
                connecting.cancel()
                with contextlib.suppress(BaseException):
                    await connecting
                raise TimeoutError
            connecting.result()
            nc = client
        except Exception as exc:  # TimeoutError, OSError, NoServersError, auth errors...
            if last_error and _is_auth_error(last_error[0]):
                how = "wrong" if credentials else "missing"
                reason = (
                    f"authorization violation ({how} credentials: set them in the URL or "
                    "FLEET_NATS_USER and FLEET_NATS_PASSWORD[_FILE])"
                )
            elif isinstance(exc, TimeoutError):
                reason = "no answer"
            else:
                reason = str(exc) or repr(exc)
            raise BusUnavailable(
                f"NATS unreachable at {shown} after {timeout:g}s: {reason}"
            ) from None
        nc_ref.append(nc)
        log.info("nats connected to %s", shown)
        bus = cls(nc, replicas)
        bus_ref.append(bus)
        return bus

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    @property
    def max_payload(self) -> int:
        """Largest message the server accepts (from its INFO)."""
        return int(self.nc.max_payload)

    async def ensure_streams(self) -> None:
        """Create (or update to the expected shape) the FLOWS and EVENTS streams.

        Streams and buckets get ``replicas`` copies. One that exists with fewer is
        updated to ``replicas`` (JetStream moves a stream to more peers online); one with
        more keeps them: a service started with the default never shrinks what the
        cluster was given. On a server that is not clustered ``replicas`` > 1 cannot be
        had: the bus says so once (a warning) and uses 1.
        """
        await self._ensure_stream(
            StreamConfig(
                name=subjects.FLOWS_STREAM,
                subjects=[subjects.FLOWS_SUBJECTS],
                max_age=FLOWS_MAX_AGE,
                max_bytes=FLOWS_MAX_BYTES,
                duplicate_window=DUPLICATE_WINDOW,
            )
        )
        await self._ensure_stream(
            StreamConfig(
                name=subjects.EVENTS_STREAM,
                subjects=[subjects.EVENTS_SUBJECTS],
                max_age=EVENTS_MAX_AGE,
                duplicate_window=DUPLICATE_WINDOW,
            )
        )

    def _not_clustered(self, exc: BaseException) -> bool:
        """``exc`` says the server cannot keep more than one replica: fall back to one."""
        if not (isinstance(exc, APIError) and exc.err_code == _NOT_CLUSTERED):
            return False
        if self.replicas > 1:
            log.warning(
                "FLEET_NATS_REPLICAS=%d but NATS is not a JetStream cluster: "
                "streams and buckets get 1 replica",
                self.replicas,
            )
            self.replicas = 1
        return True

    async def _ensure_stream(self, config: StreamConfig) -> None:
        assert config.name is not None
        try:
            info = await self.js.stream_info(config.name)
        except NotFoundError:
            config.num_replicas = self.replicas
            try:
                try:
                    await self.js.add_stream(config)
                except APIError as exc:
                    if not self._not_clustered(exc):
                        raise
                    config.num_replicas = self.replicas
                    await self.js.add_stream(config)
                log.info("created stream %s (%d replicas)", config.name, config.num_replicas)
                if config.num_replicas > 1:
                    await self._await_leader(config.name)
            except Exception as exc:  # another replica created it first
                if "already in use" not in str(exc):
                    raise
            return
        current = info.config.num_replicas or 1
        config.num_replicas = max(current, self.replicas)
        try:
            await self.js.update_stream(config)
        except APIError as exc:
            if config.num_replicas == current:
                raise
            # more replicas refused (not clustered, too few servers up): the rest still
            # applies with what the stream has
            if not self._not_clustered(exc):
                log.warning(
                    "stream %s keeps %d replicas (%d refused: %s)",
                    config.name,
                    current,
                    config.num_replicas,
                    exc.description or exc,
                )
            config.num_replicas = current
            await self.js.update_stream(config)
            return
        if config.num_replicas > current:
            log.info("stream %s: replicas %d -> %d", config.name, current, config.num_replicas)
            await self._await_leader(config.name)

    async def _await_leader(self, stream: str, timeout: float = 10.0) -> None:
        """Wait (bounded) until ``stream`` has a leader: a new replicated stream, or one
        whose replicas grew, elects one, and until then a publish into it gets no answer."""
        js = self.nc.jetstream(timeout=1.0)  # a request meeting no leader is not answered
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                info = await js.stream_info(stream)
                if info.cluster is None or info.cluster.leader:
                    return
            await asyncio.sleep(0.1)
        log.warning("stream %s has no leader after %gs", stream, timeout)

    async def config_kv(self) -> KeyValue:
        """The runtime-config bucket (history kept for audit and rollback)."""
        return await self._ensure_kv(
            KeyValueConfig(bucket=subjects.CONFIG_BUCKET, history=subjects.CONFIG_HISTORY)
        )

    async def policy_kv(self) -> KeyValue:
        """The rules-policy bucket (history kept for audit and rollback)."""
        return await self._ensure_kv(
            KeyValueConfig(bucket=subjects.POLICY_BUCKET, history=subjects.POLICY_HISTORY)
        )

    async def approvals_kv(self) -> KeyValue:
        """Cached intercept approvals (each entry says when it expires)."""
        return await self._ensure_kv(
            KeyValueConfig(
                bucket=subjects.APPROVALS_BUCKET, history=1, ttl=subjects.APPROVALS_MAX_AGE
            )
        )

    async def replicas_kv(self, ttl: float) -> KeyValue:
        """The replica registry: an entry disappears ``ttl`` seconds after its last heartbeat."""
        return await self._ensure_kv(
            KeyValueConfig(bucket=subjects.REPLICAS_BUCKET, history=1, ttl=ttl)
        )

    async def store_claim_kv(self, ttl: float) -> KeyValue:
        """The flow store's claim on FLOWS: the entry expires ``ttl`` seconds after its
        last heartbeat (``services.store.claim``)."""
        return await self._ensure_kv(
            KeyValueConfig(bucket=subjects.STORE_CLAIM_BUCKET, history=1, ttl=ttl)
        )

    async def keys_kv(self) -> KeyValue:
        """The API-key digests (written by the API at start-up, watched by the proxies)."""
        return await self._ensure_kv(KeyValueConfig(bucket=subjects.KEYS_BUCKET, history=1))

    async def api_keys_kv(self) -> KeyValue:
        """The API keys made at runtime (digests, scopes, last use; watched by every API)."""
        return await self._ensure_kv(KeyValueConfig(bucket=subjects.API_KEYS_BUCKET, history=1))

    async def ui_sessions_kv(self) -> KeyValue:
        """Web UI sessions (``services.api.ui.sessions``; entries expire with the bucket)."""
        return await self._ensure_kv(
            KeyValueConfig(
                bucket=subjects.UI_SESSIONS_BUCKET, history=1, ttl=subjects.UI_SESSIONS_MAX_AGE
            )
        )

    async def _ensure_kv(self, config: KeyValueConfig) -> KeyValue:
        """The bucket, created with ``replicas`` when absent; an existing one with fewer
        is grown (checked once per bucket and bus), as streams are."""
        try:
            kv = await self.js.key_value(config.bucket)
        except BucketNotFoundError:
            config.replicas = self.replicas
            try:
                try:
                    kv = await self.js.create_key_value(config)
                except APIError as exc:
                    if not self._not_clustered(exc):
                        raise
                    config.replicas = self.replicas
                    kv = await self.js.create_key_value(config)
            except Exception:  # another service created it first
                return await self.js.key_value(config.bucket)
            if config.replicas > 1:
                await self._await_leader(f"KV_{config.bucket}")
            return kv
        if self.replicas > 1 and config.bucket not in self._grown:
            await self._grow_bucket(config.bucket)
            self._grown.add(config.bucket)
        return kv

    async def _grow_bucket(self, bucket: str) -> None:
        """Give the bucket's stream ``replicas`` copies if it has fewer (never raises)."""
        stream = f"KV_{bucket}"
        try:
            info = await self.js.stream_info(stream)
            current = info.config.num_replicas or 1
            if current >= self.replicas:
                return
            info.config.num_replicas = self.replicas
            await self.js.update_stream(info.config)
            log.info("bucket %s: replicas %d -> %d", bucket, current, self.replicas)
            await self._await_leader(stream)
        except Exception as exc:
            if not self._not_clustered(exc):
                log.warning("bucket %s keeps its replicas (%r)", bucket, exc)

    async def js_publish(
        self,
        subject: str,
        payload: bytes,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
        traces: Sequence[str] = (),
    ) -> Any:
        """Publish into a stream and wait for its ack; ``msg_id`` makes retries idempotent.

        ``traces``: ``traceparent`` values of the items a batch message carries (tracing
        on only); the publish span links to them and they travel in the
        ``Fleet-Flow-Traces`` header, so that ``processing_batch`` continues each one.
        """
        hdrs = dict(headers or {})
        if msg_id is not None:
            hdrs["Nats-Msg-Id"] = msg_id
        if not telemetry.ENABLED:
            return await self.js.publish(subject, payload, timeout=timeout, headers=hdrs or None)
        with _sending(subject, SpanKind.PRODUCER, hdrs, traces, msg_id):
            return await self.js.publish(subject, payload, timeout=timeout, headers=hdrs)

    async def request(self, subject: str, payload: bytes, timeout: float = 2.0) -> Msg:
        """One request, one reply (raises ``nats.errors.TimeoutError`` / ``NoRespondersError``)."""
        if not telemetry.ENABLED:
            return await self.nc.request(subject, payload, timeout=timeout)
        hdrs: dict[str, str] = {}
        with _sending(subject, SpanKind.CLIENT, hdrs):
            return await self.nc.request(subject, payload, timeout=timeout, headers=hdrs)

    async def scatter_gather(
        self, subject: str, payload: bytes, timeout: float = 1.0, expected: int | None = None
    ) -> list[Msg]:
        """Send one request to every subscriber and collect replies until ``timeout``.

        Returns early once ``expected`` replies have arrived (the caller knows the
        replica count from the registry); replies arriving late are ignored.
        """
        if not telemetry.ENABLED:
            return await self._scatter_gather(subject, payload, timeout, expected, None)
        hdrs: dict[str, str] = {}
        with _sending(subject, SpanKind.CLIENT, hdrs) as span:
            replies = await self._scatter_gather(subject, payload, timeout, expected, hdrs)
            if span.is_recording():
                span.set_attribute("proxyfleet.replies", len(replies))
            return replies

    async def _scatter_gather(
        self,
        subject: str,
        payload: bytes,
        timeout: float,
        expected: int | None,
        headers: dict[str, str] | None,
    ) -> list[Msg]:
        inbox = self.nc.new_inbox()
        replies: list[Msg] = []
        enough = asyncio.Event()

        async def on_reply(msg: Msg) -> None:
            replies.append(msg)
            if expected is not None and len(replies) >= expected:
                enough.set()

        sub = await self.nc.subscribe(inbox, cb=on_reply)
        try:
            await self.nc.publish(subject, payload, reply=inbox, headers=headers)
            await self.nc.flush()
            try:
                await asyncio.wait_for(enough.wait(), timeout)
            except TimeoutError:
                pass
        finally:
            await sub.unsubscribe()
        return replies

    async def barrier(self, timeout: float = 5.0) -> None:
        """Return once the server has processed everything this connection sent before."""
        await barrier(self.nc, timeout)

    async def close(self) -> None:
        """Flush what is pending and close (drain) the connection."""
        if self.nc.is_closed:
            return
        try:
            await asyncio.wait_for(self.nc.drain(), 5.0)
        except Exception:
            try:
                await self.nc.close()
            except Exception as exc:  # a dead transport (NATS gone): nothing left to close
                log.debug("nats close: %r", exc)


# -- trace context over NATS (only called while tracing is on) ----------------------------
def _messaging(span: Span, subject: str, operation: str) -> None:
    span.set_attribute("messaging.system", "nats")
    span.set_attribute("messaging.destination.name", subject)
    span.set_attribute("messaging.operation.type", operation)


@contextlib.contextmanager
def _sending(
    subject: str,
    kind: SpanKind,
    headers: dict[str, str],
    traces: Sequence[str] = (),
    msg_id: str | None = None,
) -> Iterator[Span]:
    """A current ``<subject> publish`` span whose context is injected into ``headers``."""
    links = None
    if traces:
        links = [lk for lk in map(telemetry.link, traces[:_MAX_LINKS]) if lk is not None]
    with telemetry.tracer(_TRACER).start_as_current_span(
        f"{subject} publish", kind=kind, links=links
    ) as span:
        if span.is_recording():
            _messaging(span, subject, "send")
            if msg_id is not None:
                span.set_attribute("messaging.message.id", msg_id)
            if traces:
                span.set_attribute("messaging.batch.message_count", len(traces))
        propagate.inject(headers)
        if traces:
            headers[subjects.FLOW_TRACES_HEADER] = ",".join(traces)
        yield span


def processing(msg: Msg, kind: SpanKind = SpanKind.SERVER) -> AbstractContextManager[Span | None]:
    """Run the handler of one message in a ``<subject> process`` span that continues the
    sender's trace (SERVER for requests); a no-op when tracing is off."""
    if not telemetry.ENABLED:
        return _NOOP
    return _processing(msg, kind)


@contextlib.contextmanager
def _processing(msg: Msg, kind: SpanKind) -> Iterator[Span]:
    parent = propagate.extract(msg.headers or {})
    with telemetry.tracer(_TRACER).start_as_current_span(
        f"{msg.subject} process", context=parent, kind=kind
    ) as span:
        if span.is_recording():
            _messaging(span, msg.subject, "process")
        yield span


def processing_batch(destination: str, msgs: Sequence[Msg]) -> AbstractContextManager[Span | None]:
    """Process fetched stream messages in one CONSUMER span ``<destination> process``
    linked to each message's publish span; when the block succeeds, each item a message
    carried in ``Fleet-Flow-Traces`` gets its own ``<subject> process`` span in the
    item's trace (child of the item's span, linked to the publish and batch spans).
    A no-op when tracing is off."""
    if not telemetry.ENABLED:
        return _NOOP
    return _processing_batch(destination, msgs)


@contextlib.contextmanager
def _processing_batch(destination: str, msgs: Sequence[Msg]) -> Iterator[Span]:
    tracer = telemetry.tracer(_TRACER)
    producers = [
        trace.get_current_span(propagate.extract(m.headers or {})).get_span_context() for m in msgs
    ]
    start = time.time_ns()
    with tracer.start_as_current_span(
        f"{destination} process",
        kind=SpanKind.CONSUMER,
        links=[Link(c) for c in producers if c.is_valid],
        start_time=start,
    ) as span:
        if span.is_recording():
            _messaging(span, destination, "process")
            span.set_attribute("messaging.batch.message_count", len(msgs))
        yield span
    end = time.time_ns()
    batch = span.get_span_context()
    for msg, producer in zip(msgs, producers, strict=True):
        carried = msg.headers.get(subjects.FLOW_TRACES_HEADER) if msg.headers else None
        if not carried:
            continue
        links = [Link(c) for c in (producer, batch) if c.is_valid]
        name = f"{msg.subject} process"
        for value in carried.split(","):
            parent = telemetry.parent_context(value)
            if parent is not None:
                item = tracer.start_span(
                    name, context=parent, kind=SpanKind.CONSUMER, links=links, start_time=start
                )
                if item.is_recording():
                    _messaging(item, msg.subject, "process")
                item.end(end)


async def barrier(nc: NATS, timeout: float = 5.0) -> None:
    """Return once the server has processed everything ``nc`` sent before.

    ``nc.flush()`` is not that in nats-py 2.16: it writes its PING straight to the
    socket, ahead of commands still queued for the flusher task, so a SUB sent just
    before can reach the server after the PONG came back (and a request from another
    connection meets no responders). A message to our own inbox travels the same
    queue as the SUB, and the server handles one connection's commands in order.
    """
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=1)
    try:
        await nc.publish(inbox, b"")
        await sub.next_msg(timeout)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
