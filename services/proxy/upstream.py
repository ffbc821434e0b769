"""The upstream side: opening connections (one function) and reading responses.

``open_connection`` is the only way the relay reaches a server: it resolves the
name, checks the resolved address against the destination policy (so
``127.1``, ``2130706433`` and a name pointing at the fleet's own NATS are all
caught), connects to the address it checked (no second lookup for DNS to
change), chains through an upstream proxy in ``upstream:`` mode (plain requests
in absolute form, everything else through ``CONNECT``), and does the TLS
handshake with the client's SNI.

``UpstreamConnection`` parses responses with llhttp and drives the client
connection's response callbacks. It is strict about what it will reuse: bytes
that follow a complete response, or arrive on an idle pooled connection, mean
the connection is never reused (they could reach another client).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from services.proxy import destinations
from services.proxy.addons import tracing
from services.proxy.exchange import HOLD
from services.proxy.framing import MAX_HEAD

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from services.proxy.context import ProxyContext
    from services.proxy.exchange import Exchange
    from services.proxy.flow import Flow

log = logging.getLogger("proxyfleet.proxy")


class Refused(Exception):
    """The destination is not allowed (answered 403) or the upstream proxy said no."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _HeadTooLarge(Exception):
    """Raised in a parser callback: the response head is over ``MAX_HEAD``."""


class _StrayBytes(Exception):
    """Raised in a parser callback: a second response began where none was asked for."""


class ResponseSink(Protocol):
    """The client connection's side of a response (see ``client.ClientConnection``)."""

    closed: bool

    def response_head(self, ex: Exchange, up: UpstreamConnection) -> None: ...

    def interim_response(self, ex: Exchange, up: UpstreamConnection) -> None: ...

    def response_body(self, ex: Exchange, body: bytes) -> None: ...

    def response_done(self, ex: Exchange, up: UpstreamConnection, reusable: bool) -> None: ...

    def upstream_lost(
        self, ex: Exchange, up: UpstreamConnection, exc: Exception | None
    ) -> None: ...

    def upstream_timeout(self, ex: Exchange) -> None: ...

    def upstream_invalid(self, ex: Exchange, status: int, message: str) -> None: ...

    def start_websocket(self, ex: Exchange, up: UpstreamConnection, rest: bytes) -> None: ...

    def uncork(self) -> None: ...

    def pause_for_upstream(self, full: bool) -> None: ...

    corked: bool


class _ConnectReply(asyncio.Protocol):
    """Reads an upstream proxy's answer to our ``CONNECT`` (up to the blank line); what
    follows it (a server that speaks first) stays in ``buf`` for the tunnel."""

    def __init__(self) -> None:
        self.buf = b""
        self.head_len = 0
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.done.done():
            return
        end = self.buf.find(b"\r\n\r\n")
        if end >= 0:
            self.head_len = end + 4
            self.done.set_result(self.buf[: end + 4])
        elif len(self.buf) > MAX_HEAD:
            self.done.set_exception(Refused(502, "upstream proxy answer too large"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionResetError("upstream proxy closed the connection"))


async def _tunnel_through_proxy(transport: Any, host: str, port: int) -> bytes:
    """Ask the upstream proxy for a tunnel to ``host:port`` (2xx or ``Refused``); return
    the tunnel's first bytes if the server already sent some."""
    reply = _ConnectReply()
    transport.set_protocol(reply)
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    transport.write(
        b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority.encode(), authority.encode())
    )
    head = await reply.done
    status_line = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(status_line) < 2 or not status_line[1].startswith(b"2"):
        raise Refused(502, f"upstream proxy refused CONNECT {authority}: {head[:100]!r}")
    return reply.buf[reply.head_len :]


async def open_connection(
    ctx: ProxyContext,
    key: tuple[str, str, int],
    factory: Callable[[], asyncio.Protocol],
    sni: str | None = None,
    span: Span | None = None,
    flow: Flow | None = None,
) -> asyncio.Protocol:
    """Connect to ``key`` = (scheme, host, port): ``http`` and ``https`` speak HTTP,
    ``tcp`` is a blind tunnel. Returns the protocol ``factory`` made, connected.

    With ``flow``, the end of each phase is stored on it (epoch seconds, one
    ``time.time()`` each): ``t_dns`` when the name is resolved (from the cache or a
    literal IP: at once; in ``upstream:`` mode, where the upstream proxy resolves, when
    the destination check is done), ``t_connect`` when the TCP connection is up (in
    ``upstream:`` mode, for ``https``/``tcp``, when the upstream proxy's ``CONNECT``
    tunnel is up too), ``t_tls`` when the upstream TLS handshake is done (``https``
    only). A phase that fails leaves its point at 0.0 (not measured).

    Raises ``Refused`` for a destination the policy refuses, ``OSError`` /
    ``ssl.SSLError`` / ``TimeoutError`` for connection failures.
    """
    loop = asyncio.get_running_loop()
    scheme, host, port = key
    cfg = ctx.config
    proxy = ctx.upstream_proxy
    if proxy is not None:  # the upstream proxy resolves: check what can be checked here
        refusal = ctx.destinations.check_unresolved(host, port)
        if refusal is not None:
            raise Refused(403, refusal)
        address, to_port = proxy
    else:
        picked, refusal = await destinations.pick(ctx.destinations, loop, host, port)
        if picked is None:
            raise Refused(403, refusal or f"cannot resolve {host}")
        address, to_port = picked, port
    if flow is not None:
        flow.t_dns = time.time()
    spans = tracing.connect_spans(span, host, port) if span is not None else None
    with spans.tcp() if spans is not None else contextlib.nullcontext():
        transport, proto = await loop.create_connection(factory, address, to_port)
    if proxy is not None and scheme != "http":
        try:
            first = await _tunnel_through_proxy(transport, host, port)
            if first and scheme == "https":
                raise Refused(502, "upstream sent bytes before the TLS handshake")
        except BaseException:
            transport.abort()
            raise
        transport.set_protocol(proto)
        if first:  # a server that speaks first (the tunnel's protocol keeps them)
            proto.data_received(first)
    if flow is not None:
        flow.t_connect = time.time()
    if scheme != "https":
        return proto
    server_name = sni or host
    try:
        with spans.tls() if spans is not None else contextlib.nullcontext():
            tls = await loop.start_tls(
                transport, proto, cfg.upstream_ssl, server_hostname=server_name
            )
            if tls is None:
                raise ConnectionResetError("upstream closed the connection during TLS handshake")
            if spans is not None:
                spans.tls_done(tls)
    except BaseException:
        transport.abort()
        raise
    if flow is not None:
        flow.t_tls = time.time()
    proto.connection_made(tls)  # the protocol now writes through the TLS transport
    return proto


def describe_failure(host: str, port: int, exc: BaseException) -> tuple[int, str]:
    """The status and message owed to the client when connecting upstream failed."""
    if isinstance(exc, Refused):
        return exc.status, str(exc)
    if isinstance(exc, TimeoutError):
        return 504, f"timed out connecting to {host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return 502, f"upstream certificate rejected: {exc.verify_message}"
    if isinstance(exc, socket.gaierror):
        return 502, f"cannot resolve {host}: {exc.strerror}"
    return 502, f"cannot connect to {host}:{port}: {exc}"


class UpstreamConnection(asyncio.Protocol):
    """One HTTP connection to an upstream server, pooled between exchanges."""

    def __init__(self, ctx: ProxyContext, key: tuple[str, str, int]) -> None:
        self.ctx = ctx
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: Any = None
        self.server_addr: Any = None
        self.parser = HttpResponseParser(self)
        self.client: ResponseSink | None = None
        self.ex: Exchange | None = None
        self.closed = False
        self.reused = False
        self.reset_parser = False
        self.interim = False
        self.switched = False  # handed over to a WebSocket relay
        self.in_head = True  # a response head is being read
        self.head_bytes = 0  # bytes received while the head is incomplete
        self.head_size = 0  # bytes of the head's header lines
        self.completed = False  # the exchange's response ended inside this feed
        self.stray = False  # bytes came that no request asked for: never reuse
        self.keep_alive = False  # the completed response allows reuse
        self.held: list[bytes] | None = None  # body read while the response is held
        self.last_io = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def bind(self, client: ResponseSink, ex: Exchange, reused: bool) -> None:
        self.client = client
        self.ex = ex
        self.reused = reused
        self.completed = False
        self.in_head = True
        self.head_bytes = self.head_size = 0
        self.last_io = self.loop.time()
        if self.timer is None:
            self.timer = self.loop.call_later(
                self.ctx.config.doc.upstream_read_timeout, self._check_timeout
            )

    def detach(self) -> None:
        self.client = None
        self.ex = None

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.server_addr is None:
            self.server_addr = transport.get_extra_info("peername")

    def data_received(self, data: bytes) -> None:
        ex, client = self.ex, self.client
        if ex is None or client is None:  # bytes on an idle connection: it is unusable
            self.ctx.upstream_faults["stray_bytes"] += 1
            self.abort()
            return
        self.last_io = self.loop.time()
        if self.in_head:
            self.head_bytes += len(data)
        if self.reset_parser:
            self.parser = HttpResponseParser(self)
            self.reset_parser = False
        client.corked = True
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            if self.ex is ex and ex.flow.status == 101:
                self.switched = True
                client.start_websocket(ex, self, data[exc.args[0] :])
        except HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _StrayBytes):
                self.stray = True
                self.ctx.upstream_faults["stray_bytes"] += 1
            elif isinstance(cause, _HeadTooLarge):
                self._head_too_large(ex, client)
            else:
                if cause is not None:
                    log.error("response handling failed", exc_info=cause)
                self.ctx.upstream_faults["invalid_response"] += 1
                if self.ex is ex:
                    client.upstream_invalid(ex, 502, f"invalid response from upstream: {exc}")
        else:
            if self.in_head and self.head_bytes > MAX_HEAD and self.ex is ex:
                self._head_too_large(ex, client)  # still no end of head in sight
        finally:
            if self.completed and self.held is None:
                self.completed = False
                if self.ex is ex:
                    self._done(ex, client)
            client.uncork()

    def _head_too_large(self, ex: Exchange, client: ResponseSink) -> None:
        self.ctx.upstream_faults["head_too_large"] += 1
        self.detach()
        self.abort()
        client.upstream_invalid(ex, 502, f"response head larger than {MAX_HEAD} bytes")

    def _done(self, ex: Exchange, client: ResponseSink) -> None:
        """The response is complete: hand the connection back (or not) once the whole
        feed was seen, so that trailing bytes are known before anyone reuses it."""
        reusable = not self.stray and self.keep_alive
        self.detach()
        client.response_done(ex, self, reusable)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.ctx.pool.discard(self)
        client, ex = self.client, self.ex
        self.detach()
        if client is not None and ex is not None and not self.switched:
            client.upstream_lost(ex, self, exc)

    def pause_writing(self) -> None:
        client = self.client
        if client is not None:
            client.pause_for_upstream(True)

    def resume_writing(self) -> None:
        client = self.client
        if client is not None:
            client.pause_for_upstream(False)

    # -- httptools response callbacks ----------------------------------------------------
    def on_message_begin(self) -> None:
        if self.ex is None or self.completed:
            raise _StrayBytes

    def on_status(self, status: bytes) -> None:
        ex = self.ex
        if ex is not None:
            ex.flow.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.ex
        if ex is not None and not ex.response_started:
            self.head_size += len(name) + len(value) + 4
            if self.head_size > MAX_HEAD:
                raise _HeadTooLarge
            ex.flow.resp_headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex, client = self.ex, self.client
        if ex is None or client is None:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.interim = True
            self.head_bytes = self.head_size = 0
            client.interim_response(ex, self)
            return
        self.in_head = False
        client.response_head(ex, self)

    def on_body(self, body: bytes) -> None:
        if self.completed:  # e.g. a body after a HEAD response: not ours to relay
            raise _StrayBytes
        if self.held is not None:  # the response is held at its head
            self.held.append(body)
            return
        ex, client = self.ex, self.client
        if ex is not None and client is not None:
            client.response_body(ex, body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        ex = self.ex
        if ex is None or ex.flow.status == 101 or (ex.verdict and ex.verdict != HOLD):
            return  # a held response that ends meanwhile is complete once released
        if not self.completed and not ex.is_head:
            self.completed = True
            self.keep_alive = self.parser.should_keep_alive()  # before llhttp resets

    def hold(self) -> None:
        """The response is held at its head: stop reading; what this feed still holds of
        the body is kept for ``release``."""
        self.held = []
        self.transport.pause_reading()

    def release(self) -> list[bytes]:
        """The body kept while held (the relay sends it on)."""
        held, self.held = self.held or [], None
        return held

    def resume_after_hold(self) -> None:
        """Go on reading; finish now if the response had ended while held."""
        self.last_io = self.loop.time()
        if not self.closed:  # also when the response ended meanwhile: pooled, it must read
            self.transport.resume_reading()
        ex, client = self.ex, self.client
        if self.completed and ex is not None and client is not None:
            self.completed = False
            self._done(ex, client)

    def head_done(self) -> None:
        """A response without a body (HEAD) ended at its head: llhttp cannot know that."""
        self.reset_parser = True
        self.completed = True
        self.keep_alive = self.parser.should_keep_alive()

    # -- timers and closing ---------------------------------------------------------------
    def _check_timeout(self) -> None:
        self.timer = None
        if self.closed or self.switched:
            return
        timeout = self.ctx.config.doc.upstream_read_timeout
        ex, client = self.ex, self.client
        if ex is not None and client is not None:
            silent = self.loop.time() - self.last_io
            if self.held is not None:  # held by an addon: not the upstream's silence
                silent = 0.0
            elif silent >= timeout:
                client.upstream_timeout(ex)
                return
            self.timer = self.loop.call_later(timeout - silent, self._check_timeout)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self.transport.abort()
