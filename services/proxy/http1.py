"""The HTTP/1.1 relay: client connections, upstream connections, and the
exchange that ties one request to one response.

Everything here runs as asyncio ``Protocol`` callbacks driven by httptools
(llhttp), with no task per request: a request head is parsed, rewritten once
into the upstream head, and bodies are streamed chunk by chunk with transport
flow control (``pause_writing`` on one side pauses reading on the other), so a
large body never accumulates in memory. Tasks are only started for work that
has to wait: connecting upstream, a TLS handshake.

Framing rules (RFC 9112): hop-by-hop headers and those named in ``Connection``
are dropped; bodies are re-framed (chunked bodies are decoded by the parser and
re-chunked; read-until-close responses become chunked for HTTP/1.1 clients and
close-delimited for HTTP/1.0 ones).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from httptools import (
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
    HttpResponseParser,
    parse_url,
)

from libs.common import telemetry
from libs.common.tasks import spawn
from services.proxy import tracing
from services.proxy.flow import COMPLETED, ERROR, KILLED, Flow
from services.proxy.relay import FrameCounter

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from services.proxy.context import ProxyContext

log = logging.getLogger("proxyfleet.proxy")

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_STANDARD_CONN_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade", b""})
_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_DEFAULT_PORT = {"http": 80, "https": 443}
# Some clients (aiohttp) send WebSocket requests to a proxy in absolute form with the
# ws:// or wss:// URI: relayed as the HTTP(S) Upgrade request they stand for.
_WS_SCHEMES = {"ws": "http", "wss": "https"}
_PENDING_HIGH = 256 * 1024  # buffered request body before reading from the client pauses
_MAX_HEAD = 64 * 1024  # request line + headers; a larger head is refused with 431

# Why reading from the client is paused (a bit mask: reading resumes at 0).
PAUSE_UPSTREAM_FULL = 1  # upstream socket buffer is full
PAUSE_BUFFERED = 2  # request body waits for an upstream connection / pipelined requests wait
PAUSE_SWITCHING = 4  # CONNECT or Upgrade in progress

# Response body framing, as received from upstream.
BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_UNTIL_CLOSE = range(4)


class Exchange:
    """Relay state of one request/response (the recorded part is ``flow``)."""

    __slots__ = (
        "body_mode",
        "captured_req",
        "captured_resp",
        "conn",
        "connect_task",
        "flow",
        "head",
        "is_head",
        "keep_alive",
        "key",
        "out_chunked",
        "pending",
        "pending_size",
        "recorded",
        "refusal",
        "req_chunked",
        "req_done",
        "response_started",
        "retried",
        "span",
        "upgrade",
        "upgrade_rest",
        "upstream",
    )

    def __init__(self, conn: ClientConnection, flow: Flow) -> None:
        self.conn = conn
        self.flow = flow
        self.key: tuple[str, str, int] = ("http", "", 0)
        self.head = b""
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.req_chunked = False
        self.req_done = False
        self.keep_alive = True
        self.is_head = False
        self.upgrade = False
        self.upgrade_rest = b""
        self.upstream: UpstreamConnection | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.response_started = False
        self.out_chunked = False
        self.body_mode = BODY_LENGTH
        self.captured_req = 0
        self.captured_resp = 0
        self.retried = False
        self.recorded = False
        self.refusal: bytes | None = None  # error answer owed after earlier responses
        self.span: Span | None = None  # the flow's span, only while tracing is on


class _Refused(Exception):
    """Raised in a parser callback to refuse a request (it also stops the parser)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error_response(status: int, message: str, close: bool = True) -> bytes:
    body = (message + "\n").encode()
    return b"".join(
        (
            _STATUS_LINES.get(status, b"HTTP/1.1 %d Error\r\n" % status),
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body),
            b"Connection: close\r\n\r\n" if close else b"\r\n",
            body,
        )
    )


def _keep(chunks: list[bytes], body: bytes, room: int) -> int:
    """Record what fits of ``body`` in ``room`` bytes of capture; return how much was kept."""
    if room <= 0:
        return 0
    piece = body if len(body) <= room else body[:room]
    chunks.append(piece)
    return len(piece)


def _conn_tokens(value: bytes) -> set[bytes]:
    return {t.strip() for t in value.lower().split(b",")}


class ClientConnection(asyncio.Protocol):
    """One connection from a client: parses requests and relays their exchanges."""

    def __init__(self, ctx: ProxyContext, tls_target: tuple[str, int] | None = None) -> None:
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.transport: Any = None
        self.client_addr: Any = None
        self.parser = HttpRequestParser(self)
        self.tls_target = tls_target  # (host, port) of an intercepted CONNECT
        self.ex: Exchange | None = None  # exchange being relayed
        self.parsing: Exchange | None = None  # exchange whose request is being parsed
        self.switching: Exchange | None = None  # CONNECT / Upgrade waiting for its decision
        self.queue: deque[Exchange] = deque()  # pipelined requests waiting for ``ex``
        self.url = b""
        self.in_body = False  # the parser is past a request head (until the message ends)
        self.head_bytes = 0  # bytes received while a request head was incomplete
        self.head_size = 0  # request line and headers of the message being parsed
        self.paused = 0
        self.closing = False
        self.closed = False
        self.relay_peer: UpstreamConnection | None = None  # tunnel / websocket mode
        self.relay_counter: FrameCounter | None = None
        self.relay_eof = False  # the client sent FIN while relaying
        # Decrypted bytes that arrive while start_tls() has not returned yet: a TLS 1.3
        # client may send its first request together with its Finished message.
        self.tls_early: list[bytes] | None = None
        self.last_active = self.loop.time()
        self.idle_timer: asyncio.TimerHandle | None = None
        # Writes made while a parser is being fed are batched into one send() each way:
        # on loopback the syscall, not Python, is the largest per-request cost.
        self.corked = False
        self.wbuf: list[bytes] = []  # to the client
        self.feeding = False
        self.up_buf: list[bytes] = []  # to ``up_target``
        self.up_target: UpstreamConnection | None = None

    # -- batched writes -------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Write to the client (batched while an upstream response is being parsed)."""
        if self.corked:
            self.wbuf.append(data)
        else:
            self.transport.write(data)

    def uncork(self) -> None:
        self.corked = False
        buf = self.wbuf
        if buf:
            self.wbuf = []
            if not self.closed:
                self.transport.write(buf[0] if len(buf) == 1 else b"".join(buf))

    def send_upstream(self, up: UpstreamConnection, data: bytes) -> None:
        """Write to ``up`` (batched while the client's bytes are being parsed)."""
        if not self.feeding:
            up.transport.write(data)
            return
        if self.up_target is not up:
            self.flush_upstream()
            self.up_target = up
        self.up_buf.append(data)

    def flush_upstream(self) -> None:
        up, buf = self.up_target, self.up_buf
        if buf:
            self.up_buf = []
            if up is not None and not up.closed:
                up.transport.write(buf[0] if len(buf) == 1 else b"".join(buf))
        self.up_target = None

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.client_addr = transport.get_extra_info("peername")
        self.ctx.connections.add(self)
        self.idle_timer = self.loop.call_later(
            self.ctx.config.doc.client_idle_timeout, self._check_idle
        )

    def data_received(self, data: bytes) -> None:
        peer = self.relay_peer
        if peer is not None:
            peer.transport.write(data)
            stats = self.ex.flow.stats if self.ex is not None else None
            if stats is not None:
                stats["bytes_client_to_server"] += len(data)
            if self.relay_counter is not None:
                self.relay_counter.feed(data)
            return
        if self.tls_early is not None:
            self.tls_early.append(data)
            return
        if not self.in_body:
            self.head_bytes += len(data)
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self.feeding = False
            self.flush_upstream()
            self._on_switch(data[exc.args[0] :])
        except HttpParserError as exc:
            cause = exc.__context__
            if cause is not None and not isinstance(cause, _Refused):
                # one of our callbacks raised: a bug, not bad input
                log.error("request handling failed", exc_info=cause)
            self.feeding = False
            self.flush_upstream()
            if isinstance(cause, _Refused):
                self._bad_request(str(cause), cause.status)
            else:
                self._bad_request(f"malformed request: {exc}")
        finally:
            if self.feeding:
                self.feeding = False
                self.flush_upstream()
        if self.head_bytes > _MAX_HEAD and not self.in_body and not self.closed:
            # an unfinished head this large (httptools buffers a header line whole)
            self.head_bytes = 0
            self._bad_request(f"request head larger than {_MAX_HEAD} bytes", 431)

    def eof_received(self) -> bool | None:
        peer = self.relay_peer
        if peer is not None:
            # half-close: pass the client's FIN to the upstream and keep reading from it;
            # once both sides have sent FIN the relay is over: closing the upstream ends it
            # (its connection_lost -> relay_closed finishes the flow and closes this side)
            self.relay_eof = True
            if peer.relay_eof:
                peer.close()
            elif peer.transport.can_write_eof():
                peer.transport.write_eof()
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ctx.connections.discard(self)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
        ex = self.ex
        if ex is not None:
            if self.relay_peer is not None:
                self._finish(ex, COMPLETED)
            else:
                self._finish(ex, ERROR, "client disconnected")
            self._drop_upstream(ex)
        for waiting in (self.parsing, self.switching, *self.queue):
            if waiting is not None and waiting is not ex and waiting.recorded:
                self._finish(waiting, ERROR, "client disconnected")
        self.queue.clear()

    def pause_writing(self) -> None:
        up = self.relay_peer or (self.ex.upstream if self.ex is not None else None)
        if up is not None and not up.closed:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self.relay_peer or (self.ex.upstream if self.ex is not None else None)
        if up is not None and not up.closed:
            up.transport.resume_reading()

    # -- httptools request callbacks ----------------------------------------------------
    def on_message_begin(self) -> None:
        self.parsing = Exchange(self, Flow(self.client_addr))
        self.url = b""
        self.head_size = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        if ex is not None and not ex.head:  # later calls are trailers: not recorded
            ex.flow.req_headers.append((name, value))
            self.head_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        self.in_body = True
        self.head_bytes = 0
        ex = self.parsing
        if ex is None or self.closed:
            self.parsing = None
            return
        flow = ex.flow
        p = self.parser
        flow.method = p.get_method()
        flow.http_version = p.get_http_version()
        ex.keep_alive = p.should_keep_alive()
        if self.head_size > _MAX_HEAD:
            raise _Refused(431, f"request head larger than {_MAX_HEAD} bytes")
        if flow.http_version not in ("1.1", "1.0"):  # llhttp also takes 0.9 (no version), 2.0
            raise _Refused(505, f"HTTP/{flow.http_version} is not supported: use HTTP/1.1")
        if flow.method == b"CONNECT":
            ex.head = b"CONNECT"
            self.switching = ex
            return
        self._route(ex)
        self._record(ex)
        if ex.upgrade:
            self.switching = ex
        if self.ex is None:
            self._begin(ex)
        else:
            self.queue.append(ex)
            self._pause(PAUSE_BUFFERED)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is None or not ex.recorded or ex.flow.state != "active":
            return
        flow = ex.flow
        n = len(body)
        flow.req_size += n
        kept = _keep(flow.req_body, body, self.ctx.config.doc.capture_body_limit - ex.captured_req)
        ex.captured_req += kept
        if kept < n:
            flow.req_truncated = True
        self._send_upstream(ex, b"%x\r\n%s\r\n" % (n, body) if ex.req_chunked else body)

    def on_message_complete(self) -> None:
        self.in_body = False
        ex = self.parsing
        self.parsing = None
        if ex is None or not ex.recorded:
            return
        ex.req_done = True
        if ex.req_chunked:
            self._send_upstream(ex, b"0\r\n\r\n")
        elif ex.upstream is not None:
            ex.flow.t_request_sent = time.time()

    # -- request routing and the upstream head --------------------------------------------
    def _route(self, ex: Exchange) -> None:
        """Resolve the target and build the upstream request head (``_Refused`` if not)."""
        flow = ex.flow
        url = self.url
        ctx = self.ctx
        host_header: bytes | None = None
        if url[:1] == b"/" or url == b"*":
            if self.tls_target is not None:
                scheme, host, port = "https", *self.tls_target
            elif ctx.reverse is not None:
                scheme, host, port, host_header = ctx.reverse
            else:
                raise _Refused(
                    400,
                    "This is a forward proxy: send absolute-form requests "
                    "(GET http://host/path) or CONNECT, e.g. curl -x http://<proxy> http://host/",
                )
            path = url
        else:
            try:
                u = parse_url(url)
            except HttpParserError:
                raise _Refused(400, f"invalid request target {url[:200]!r}") from None
            scheme = u.schema.decode("latin-1").lower() if u.schema else ""
            scheme = _WS_SCHEMES.get(scheme, scheme)
            if scheme not in _DEFAULT_PORT or not u.host:
                raise _Refused(400, f"unsupported request target {url[:200]!r}")
            host = u.host.decode("latin-1").lower()
            port = u.port or _DEFAULT_PORT[scheme]
            path = u.path or b"/"
            if u.query is not None:
                path += b"?" + u.query
            host_header = u.host if u.port is None else b"%s:%d" % (u.host, u.port)
        if port == ctx.listen_port and ctx.is_local(host):
            raise _Refused(400, "request addressed to the proxy itself (loop refused)")
        flow.scheme, flow.host, flow.port, flow.path = scheme, host, port, path
        ex.key = (scheme, host, port)
        ex.is_head = flow.method == b"HEAD"
        ex.head = self._upstream_head(ex, path, host_header)

    def _upstream_head(self, ex: Exchange, path: bytes, host_header: bytes | None) -> bytes:
        flow = ex.flow
        parts = [flow.method, b" ", path, b" HTTP/1.1\r\n"]
        if host_header is not None:
            parts += (b"Host: ", host_header, b"\r\n")
        conn_value = b""
        upgrade: bytes | None = None
        for name, value in flow.req_headers:
            lname = name.lower()
            if lname in HOP_BY_HOP:
                if lname == b"connection":
                    conn_value += b"," + value
                elif lname == b"transfer-encoding":
                    ex.req_chunked = b"chunked" in value.lower()
                elif lname == b"upgrade":
                    upgrade = value
                continue
            if lname == b"host" and host_header is not None:
                continue
            parts += (name, b": ", value, b"\r\n")
        if conn_value:
            tokens = _conn_tokens(conn_value)
            extra = tokens - _STANDARD_CONN_TOKENS
            if extra:  # rare: drop the headers the client declared hop-by-hop
                return self._upstream_head_filtered(ex, path, host_header, extra)
            if upgrade is not None and b"upgrade" in tokens:
                ex.upgrade = True
                parts += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, b"\r\n")
        if ex.req_chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _upstream_head_filtered(
        self, ex: Exchange, path: bytes, host_header: bytes | None, drop: set[bytes]
    ) -> bytes:
        flow = ex.flow
        kept = [(n, v) for n, v in flow.req_headers if n.lower() not in drop]
        original, flow.req_headers = flow.req_headers, kept
        try:
            conn = b",".join(v for n, v in kept if n.lower() == b"connection")
            kept[:] = [(n, v) for n, v in kept if n.lower() != b"connection"]
            kept.append((b"Connection", b",".join(_conn_tokens(conn) - drop)))
            return self._upstream_head(ex, path, host_header)
        finally:
            flow.req_headers = original

    def _record(self, ex: Exchange) -> None:
        ex.recorded = True
        if telemetry.ENABLED:  # the one tracing check per flow when tracing is off
            tracing.start_flow(ex)
        self.ctx.active[ex.flow.id] = ex
        self.ctx.capture.emit(ex.flow)

    # -- sending the request upstream -----------------------------------------------------
    def _begin(self, ex: Exchange) -> None:
        if ex.refusal is not None:  # a refused pipelined request: its turn to be answered
            self.send(ex.refusal)
            self.close()
            return
        self.ex = ex
        up = self.ctx.pool.take(ex.key)
        if up is not None:
            assert isinstance(up, UpstreamConnection)
            self._attach(ex, up, reused=True)
        else:
            ex.connect_task = spawn(self._connect(ex), name="upstream-connect")

    async def _connect(self, ex: Exchange) -> None:
        scheme, host, port = ex.key
        cfg = self.ctx.config
        tls = scheme == "https"
        try:
            async with asyncio.timeout(cfg.doc.upstream_connect_timeout):
                if ex.span is not None:
                    up = await tracing.connect(
                        self.loop,
                        lambda: UpstreamConnection(self.ctx, ex.key),
                        host,
                        port,
                        cfg.upstream_ssl if tls else None,
                        ex.span,
                    )
                else:
                    _, up = await self.loop.create_connection(
                        lambda: UpstreamConnection(self.ctx, ex.key),
                        host,
                        port,
                        ssl=cfg.upstream_ssl if tls else None,
                        server_hostname=host if tls else None,
                    )
        except TimeoutError:
            self._upstream_error(ex, 504, f"timed out connecting to {host}:{port}")
            return
        except socket.gaierror as exc:
            self._upstream_error(ex, 502, f"cannot resolve {host}: {exc.strerror}")
            return
        except ssl.SSLCertVerificationError as exc:
            self._upstream_error(ex, 502, f"upstream certificate rejected: {exc.verify_message}")
            return
        except (OSError, ssl.SSLError) as exc:
            self._upstream_error(ex, 502, f"cannot connect to {host}:{port}: {exc}")
            return
        ex.connect_task = None
        if self.closed or ex.flow.state != "active":
            up.close()
            return
        self._attach(ex, up, reused=False)

    def _attach(self, ex: Exchange, up: UpstreamConnection, reused: bool) -> None:
        ex.upstream = up
        up.bind(self, ex, reused)
        ex.flow.server_addr = up.server_addr
        pending = ex.pending
        if pending:
            self.send_upstream(up, b"".join([ex.head, *pending]))
            ex.pending = []
            ex.pending_size = 0
            self._resume(PAUSE_BUFFERED)
        else:
            self.send_upstream(up, ex.head)
        if ex.req_done:
            ex.flow.t_request_sent = time.time()

    def _send_upstream(self, ex: Exchange, data: bytes) -> None:
        up = ex.upstream
        if up is not None and ex is self.ex:
            self.send_upstream(up, data)
            up.last_io = self.loop.time()
            return
        ex.pending.append(data)
        ex.pending_size += len(data)
        if ex.pending_size > _PENDING_HIGH:
            self._pause(PAUSE_BUFFERED)

    def _retry(self, ex: Exchange) -> bool:
        """Resend on a fresh connection after a pooled one turned out stale."""
        if ex.retried or ex.response_started or ex.flow.req_size or not ex.req_done:
            return False
        ex.retried = True
        ex.upstream = None
        ex.connect_task = spawn(self._connect(ex), name="upstream-reconnect")
        return True

    # -- the response, driven by UpstreamConnection -------------------------------------
    def response_head(self, ex: Exchange, up: UpstreamConnection) -> None:
        flow = ex.flow
        p = up.parser
        status = p.get_status_code()
        flow.status = status
        flow.resp_http_version = p.get_http_version()
        flow.t_first_byte = time.time()
        ex.response_started = True
        parts = [
            _STATUS_LINES.get(status, b"HTTP/1.1 %d \r\n" % status)
            if not flow.reason
            else b"HTTP/1.1 %d %s\r\n" % (status, flow.reason)
        ]
        chunked = has_length = False
        conn_value = b""
        upgrade: bytes | None = None
        for name, value in flow.resp_headers:
            lname = name.lower()
            if lname in HOP_BY_HOP:
                if lname == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif lname == b"connection":
                    conn_value += b"," + value
                elif lname == b"upgrade":
                    upgrade = value
                continue
            if lname == b"content-length":
                has_length = True
            parts += (name, b": ", value, b"\r\n")
        if conn_value:
            drop = _conn_tokens(conn_value) - _STANDARD_CONN_TOKENS
            if drop:
                parts = [parts[0]] + [
                    part
                    for n, v in flow.resp_headers
                    if n.lower() not in HOP_BY_HOP and n.lower() not in drop
                    for part in (n, b": ", v, b"\r\n")
                ]
        if status == 101:
            if not ex.upgrade or upgrade is None:
                up.detach()
                self._upstream_error(ex, 502, "upstream switched protocols unasked")
                return
            parts += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, b"\r\n\r\n")
            self.send(b"".join(parts))
            return
        if ex.is_head or status in (204, 304):
            ex.body_mode = BODY_NONE
        elif chunked:
            ex.body_mode = BODY_CHUNKED
        elif has_length:
            ex.body_mode = BODY_LENGTH
        else:
            ex.body_mode = BODY_UNTIL_CLOSE
        http11 = flow.http_version == "1.1"
        if ex.body_mode in (BODY_CHUNKED, BODY_UNTIL_CLOSE):
            if http11:
                ex.out_chunked = True
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                ex.keep_alive = False  # HTTP/1.0: the body ends when we close
        keep = ex.keep_alive and ex.req_done and not self.closing and not self.ctx.draining
        ex.keep_alive = keep
        if not keep:
            parts.append(b"Connection: close\r\n")
        elif not http11:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        self.send(b"".join(parts))
        if ex.is_head:  # llhttp cannot know the response has no body
            up.reset_parser = True
            self.response_done(ex, up)

    def interim_response(self, ex: Exchange, up: UpstreamConnection) -> None:
        """Relay a 1xx (e.g. 100 Continue) to an HTTP/1.1 client."""
        status = up.parser.get_status_code()
        ex.flow.resp_headers.clear()
        ex.flow.reason = b""
        if ex.flow.http_version == "1.1":
            self.send(_STATUS_LINES.get(status, b"HTTP/1.1 %d \r\n" % status) + b"\r\n")

    def response_body(self, ex: Exchange, body: bytes) -> None:
        flow = ex.flow
        n = len(body)
        flow.resp_size += n
        kept = _keep(
            flow.resp_body, body, self.ctx.config.doc.capture_body_limit - ex.captured_resp
        )
        ex.captured_resp += kept
        if kept < n:
            flow.resp_truncated = True
        if ex.out_chunked:
            self.send(b"%x\r\n%s\r\n" % (n, body))
        else:
            self.send(body)

    def response_done(self, ex: Exchange, up: UpstreamConnection) -> None:
        if ex.out_chunked:
            self.send(b"0\r\n\r\n")
        self._finish(ex, COMPLETED)
        reusable = (
            ex.body_mode != BODY_UNTIL_CLOSE and ex.req_done and up.parser.should_keep_alive()
        )
        up.detach()
        if reusable and not up.closed:
            self.ctx.pool.put(up)
        else:
            up.close()
        self._next(ex)

    def upstream_lost(self, ex: Exchange, up: UpstreamConnection, exc: Exception | None) -> None:
        """The upstream connection closed while ``ex`` was using it."""
        if ex.response_started and ex.body_mode == BODY_UNTIL_CLOSE:
            self.response_done(ex, up)
        elif up.reused and not ex.response_started and self._retry(ex):
            return
        else:
            why = f": {exc}" if exc else ""
            self._upstream_error(ex, 502, f"upstream closed the connection{why}")

    def upstream_timeout(self, ex: Exchange) -> None:
        secs = self.ctx.config.doc.upstream_read_timeout
        self._upstream_error(ex, 504, f"upstream sent nothing for {secs:g}s")

    def upstream_invalid(self, ex: Exchange, message: str) -> None:
        self._upstream_error(ex, 502, f"invalid response from upstream: {message}")

    # -- ending exchanges ---------------------------------------------------------------
    def _finish(self, ex: Exchange, state: str, error: str | None = None) -> None:
        if self.relay_counter is not None:
            self.update_relay_stats()
        if ex.flow.finish(state, error):
            ctx = self.ctx
            ctx.active.pop(ex.flow.id, None)
            ctx.flows_total += 1
            if ex.span is not None:
                tracing.end_flow(ex)
            ctx.capture.emit(ex.flow)

    def _next(self, ex: Exchange) -> None:
        """After a response: serve the next pipelined request, wait, or close."""
        self.ex = None
        self.last_active = self.loop.time()
        if not ex.keep_alive or self.closed:
            self.close()
            return
        if self.switching is ex:  # an Upgrade the upstream declined: back to HTTP
            self.switching = None
            self.parser = HttpRequestParser(self)
            rest, ex.upgrade_rest = ex.upgrade_rest, b""
            self._resume(PAUSE_SWITCHING)
            if rest:
                self.data_received(rest)
                return
        if self.queue:
            nxt = self.queue.popleft()
            if not self.queue:
                self._resume(PAUSE_BUFFERED)
            self._begin(nxt)
        elif self.closing:
            self.close()

    def _upstream_error(self, ex: Exchange, status: int, message: str) -> None:
        """Answer ``status`` (or cut the response short) and record an error flow."""
        flow = ex.flow
        self._drop_upstream(ex)
        if flow.state != "active":
            return
        if not ex.response_started and not self.closed:
            flow.status = status
            self.send(_error_response(status, message))
        self._finish(ex, ERROR, message)
        self.ex = None
        self.close()

    def _reject(self, ex: Exchange, status: int, message: str) -> None:
        """Answer a request we will not relay, record it, and close.

        Responses still owed to earlier pipelined requests go first: the refusal
        then waits in the queue, and nothing more is read from the client.
        """
        ex.flow.status = status
        if not ex.recorded:
            self._record(ex)
        self._finish(ex, ERROR, message)
        self.parsing = None
        if self.ex is not None:
            ex.refusal = _error_response(status, message)
            self.queue.append(ex)
            self._pause(PAUSE_BUFFERED)
            return
        self.send(_error_response(status, message))
        self.close()

    def _bad_request(self, message: str, status: int = 400) -> None:
        ex = self.parsing or Exchange(self, Flow(self.client_addr))
        if ex is self.ex:
            # The body of the request being relayed is broken: the upstream can never
            # get all of it, so end the exchange (answered ``status`` if nothing was sent).
            self.parsing = None
            self._upstream_error(ex, status, message)
            self.close()
            return
        self._reject(ex, status, message)

    def _drop_upstream(self, ex: Exchange) -> None:
        if ex.connect_task is not None:
            ex.connect_task.cancel()
            ex.connect_task = None
        up = ex.upstream
        if up is not None:
            ex.upstream = None
            up.detach()
            up.abort()

    def kill(self, ex: Exchange, reason: str) -> None:
        """Abort both sides of ``ex``; the flow ends as killed."""
        self._finish(ex, KILLED, reason)
        self._drop_upstream(ex)
        if self.relay_peer is not None:
            self.relay_peer.abort()
        self.abort()

    # -- CONNECT and Upgrade --------------------------------------------------------------
    def _on_switch(self, rest: bytes) -> None:
        ex = self.switching
        if ex is None:
            self._bad_request("unexpected protocol switch")
            return
        if ex.flow.method == b"CONNECT":
            self._on_connect(ex, rest)
        else:  # Upgrade: wait for the upstream's answer before reading further
            ex.upgrade_rest = rest
            self._pause(PAUSE_SWITCHING)

    def _on_connect(self, ex: Exchange, rest: bytes) -> None:
        self.switching = None
        flow = ex.flow
        host, _, port_s = self.url.decode("latin-1").rpartition(":")
        host = host.strip("[]").lower()
        if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
            self._reject(ex, 400, f"invalid CONNECT target {self.url[:200]!r}")
            return
        port = int(port_s)
        if self.ex is not None or self.queue or rest:
            self._reject(ex, 400, "CONNECT must be the last request on its connection")
            return
        flow.scheme, flow.host, flow.port, flow.path = "https", host, port, b""
        if port == self.ctx.listen_port and self.ctx.is_local(host):
            self._reject(ex, 400, "CONNECT to the proxy itself (loop refused)")
            return
        self._pause(PAUSE_SWITCHING)
        if self.ctx.config.tunnel_untouched(host, port):
            flow.kind = "tunnel"
            flow.scheme = "tcp"
            flow.stats = {"bytes_client_to_server": 0, "bytes_server_to_client": 0}
            ex.key = ("tcp", host, port)
            self._record(ex)
            self.ex = ex
            ex.connect_task = spawn(self._open_tunnel(ex), name="tunnel-connect")
        else:
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            spawn(self._intercept_tls(ex, host, port), name="client-tls")

    async def _open_tunnel(self, ex: Exchange) -> None:
        _, host, port = ex.key
        try:
            async with asyncio.timeout(self.ctx.config.doc.upstream_connect_timeout):
                if ex.span is not None:
                    up = await tracing.connect(
                        self.loop,
                        lambda: UpstreamConnection(self.ctx, ex.key),
                        host,
                        port,
                        None,
                        ex.span,
                    )
                else:
                    _, up = await self.loop.create_connection(
                        lambda: UpstreamConnection(self.ctx, ex.key), host, port
                    )
        except TimeoutError:
            self._upstream_error(ex, 504, f"timed out connecting to {host}:{port}")
            return
        except OSError as exc:
            self._upstream_error(ex, 502, f"cannot connect to {host}:{port}: {exc}")
            return
        ex.connect_task = None
        if self.closed:
            up.close()
            return
        ex.upstream = up
        ex.flow.server_addr = up.server_addr
        ex.flow.status = 200
        ex.response_started = True
        up.bind(self, ex, reused=False)
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self._start_relay(ex, up, count_frames=False)

    async def _intercept_tls(self, ex: Exchange, host: str, port: int) -> None:
        self.tls_early = []
        try:
            sslctx = self.ctx.ca.client_hello_context(host)
            async with asyncio.timeout(self.ctx.config.doc.upstream_connect_timeout):
                transport = await self.loop.start_tls(
                    self.transport, self, sslctx, server_side=True
                )
        except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
            self.tls_early = None
            if not self.closed:
                self._record(ex)
                why = str(exc) or type(exc).__name__
                self._finish(ex, ERROR, f"client TLS handshake failed: {why}")
                self.abort()
            return
        early, self.tls_early = self.tls_early, None
        if transport is None or self.closed:
            return
        self.transport = transport
        self.tls_target = (host, port)
        self.parser = HttpRequestParser(self)
        self._resume(PAUSE_SWITCHING)
        if early:
            self.data_received(b"".join(early))

    def start_websocket(self, ex: Exchange, up: UpstreamConnection, rest: bytes) -> None:
        """The upstream answered 101: relay frames both ways from now on."""
        self.uncork()  # the 101 head goes out before any relayed byte
        ex.flow.kind = "websocket"
        ex.flow.stats = {
            "bytes_client_to_server": 0,
            "bytes_server_to_client": 0,
            "messages_client_to_server": 0,
            "messages_server_to_client": 0,
        }
        self.switching = None
        self._start_relay(ex, up, count_frames=True)
        early, ex.upgrade_rest = ex.upgrade_rest, b""
        if early:
            self.data_received(early)
        if rest:
            up.data_received(rest)
        self._resume(PAUSE_SWITCHING)

    def _start_relay(self, ex: Exchange, up: UpstreamConnection, count_frames: bool) -> None:
        self.relay_peer = up
        up.relay = True
        if count_frames:
            self.relay_counter = FrameCounter()
            up.relay_counter = FrameCounter()
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self._resume(PAUSE_SWITCHING)

    def relay_closed(self) -> None:
        """The upstream side of a tunnel or websocket closed: finish and close."""
        ex = self.ex
        if ex is not None:
            self._finish(ex, COMPLETED)
        self.close()

    def update_relay_stats(self) -> None:
        ex = self.ex
        if ex is None or ex.flow.stats is None:
            return
        up = self.relay_peer
        if self.relay_counter is not None and up is not None and up.relay_counter is not None:
            ex.flow.stats["messages_client_to_server"] = self.relay_counter.messages
            ex.flow.stats["messages_server_to_client"] = up.relay_counter.messages

    # -- flow control and lifecycle -------------------------------------------------------
    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.transport.resume_reading()

    def _check_idle(self) -> None:
        self.idle_timer = None
        if self.closed or self.relay_peer is not None:
            return
        timeout = self.ctx.config.doc.client_idle_timeout
        idle = self.loop.time() - self.last_active
        if self.ex is None and idle >= timeout:
            self.close()
            return
        self.idle_timer = self.loop.call_later(max(timeout - idle, 1.0), self._check_idle)

    def shutdown(self) -> None:
        """Graceful stop: close now if idle, else after the current response."""
        self.closing = True
        if self.ex is None and self.parsing is None and not self.queue:
            self.close()

    def close(self) -> None:
        """Close after what is written (and batched) has been sent."""
        if not self.closed and self.transport is not None:
            self.uncork()
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        self.wbuf = []
        if self.transport is not None:
            self.closed = True
            self.transport.abort()


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream server, pooled between exchanges."""

    def __init__(self, ctx: ProxyContext, key: tuple[str, str, int]) -> None:
        self.ctx = ctx
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: Any = None
        self.server_addr: Any = None
        self.parser = HttpResponseParser(self)
        self.client: ClientConnection | None = None
        self.ex: Exchange | None = None
        self.closed = False
        self.reused = False
        self.reset_parser = False
        self.interim = False
        self.relay = False
        self.relay_counter: FrameCounter | None = None
        self.relay_eof = False  # the upstream sent FIN while relaying
        self.msg_ex: Exchange | None = None
        self.last_io = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def bind(self, client: ClientConnection, ex: Exchange, reused: bool) -> None:
        self.client = client
        self.ex = ex
        self.reused = reused
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
        self.server_addr = transport.get_extra_info("peername")

    def data_received(self, data: bytes) -> None:
        client = self.client
        if self.relay:
            if client is not None:
                client.transport.write(data)
                ex = client.ex
                if ex is not None and ex.flow.stats is not None:
                    ex.flow.stats["bytes_server_to_client"] += len(data)
                if self.relay_counter is not None:
                    self.relay_counter.feed(data)
            return
        ex = self.ex
        if ex is None or client is None:  # bytes on an idle connection: it is unusable
            self.abort()
            return
        self.last_io = self.loop.time()
        if self.reset_parser:
            self.parser = HttpResponseParser(self)
            self.reset_parser = False
        client.corked = True
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            if self.ex is ex and ex.flow.status == 101:
                client.start_websocket(ex, self, data[exc.args[0] :])
        except HttpParserError as exc:
            if exc.__context__ is not None:
                log.error("response handling failed", exc_info=exc.__context__)
            if self.ex is ex:
                client.upstream_invalid(ex, str(exc))
        finally:
            client.uncork()

    def eof_received(self) -> bool | None:
        if self.relay and self.client is not None:
            client = self.client
            self.relay_eof = True
            if client.relay_eof:  # both sides sent FIN: close (connection_lost ends the relay)
                return False
            if client.transport.can_write_eof():
                client.transport.write_eof()
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.ctx.pool.discard(self)
        client, ex = self.client, self.ex
        self.detach()
        if client is None:
            return
        if self.relay:
            client.relay_closed()
        elif ex is not None:
            client.upstream_lost(ex, self, exc)

    def pause_writing(self) -> None:
        if self.client is not None and self.client.transport is not None:
            self.client._pause(PAUSE_UPSTREAM_FULL)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client._resume(PAUSE_UPSTREAM_FULL)

    # -- httptools response callbacks ----------------------------------------------------
    def on_message_begin(self) -> None:
        self.msg_ex = self.ex  # completion is only reported for the exchange it began with

    def on_status(self, status: bytes) -> None:
        if self.ex is not None:
            self.ex.flow.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.ex
        if ex is not None and not ex.response_started:
            ex.flow.resp_headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex, client = self.ex, self.client
        if ex is None or client is None:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.interim = True
            client.interim_response(ex, self)
            return
        client.response_head(ex, self)

    def on_body(self, body: bytes) -> None:
        ex, client = self.ex, self.client
        if ex is not None and client is not None:
            client.response_body(ex, body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        ex, client = self.ex, self.client
        if ex is None or client is None or ex is not self.msg_ex:
            return  # a HEAD response, already completed at its headers
        if ex.flow.status != 101:
            client.response_done(ex, self)

    # -- timers and closing ---------------------------------------------------------------
    def _check_timeout(self) -> None:
        self.timer = None
        if self.closed or self.relay:
            return
        timeout = self.ctx.config.doc.upstream_read_timeout
        ex, client = self.ex, self.client
        if ex is not None and client is not None:
            silent = self.loop.time() - self.last_io
            if silent >= timeout:
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
