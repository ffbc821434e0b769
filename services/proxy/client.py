"""The client side of the relay: one connection from a client, its requests in order.

Request heads are parsed by ``framing.parse_request_head`` (strict, any method
token) and bodies by our own length counter or ``framing.ChunkedDecoder``, all
driven from ``data_received`` with no task per request. Each request becomes an
``Exchange``: routed, passed through the ``request_head`` hooks, recorded, and
sent upstream with a head rebuilt from what was parsed. Responses come back
through ``UpstreamConnection`` callbacks (``response_head`` / ``response_body`` /
``response_done``) and are re-framed for this client.

Tasks are only started for what has to wait: connecting upstream, a TLS
handshake, the first bytes inside a ``CONNECT``. Writes made while input is
being parsed are batched into one ``send()`` per direction: on loopback the
syscall, not Python, is the largest per-request cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from httptools import HttpParserError, parse_url

from libs.common.tasks import spawn
from services.proxy import destinations, hooks, inside
from services.proxy.exchange import HOLD, KILL, RESPOND, Exchange
from services.proxy.flow import COMPLETED, ERROR, KILLED, Flow
from services.proxy.framing import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    MAX_HEAD,
    STATUS_LINES,
    ChunkedDecoder,
    FramingError,
    error_response,
    parse_request_head,
    plausible_request_start,
    request_head,
    response_framing,
    response_head,
    via_has,
)
from services.proxy.rewrite import LIMIT as REWRITE_LIMIT
from services.proxy.tunnel import Relay
from services.proxy.upstream import (
    UpstreamConnection,
    describe_failure,
    open_connection,
)

if TYPE_CHECKING:
    from services.proxy.context import ProxyContext
    from services.proxy.framing import RequestHead, ResponseFraming

log = logging.getLogger("proxyfleet.proxy")

_DEFAULT_PORT = {"http": 80, "https": 443}
# Some clients (aiohttp) send WebSocket requests to a proxy in absolute form with the
# ws:// or wss:// URI: relayed as the HTTP(S) Upgrade request they stand for.
_WS_SCHEMES = {"ws": "http", "wss": "https"}
_PENDING_HIGH = 256 * 1024  # buffered request body before reading from the client pauses
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST

# Why reading from the client is paused (a bit mask: reading resumes at 0).
PAUSE_UPSTREAM_FULL = 1  # upstream socket buffer is full
PAUSE_BUFFERED = 2  # request body waits for an upstream connection / pipelined requests wait
PAUSE_HALT = 4  # input processing is halted (see ``halt``)

# Why input processing is halted: what is read stays in ``buf`` until it resumes.
HALT_SWITCH = 1  # CONNECT or Upgrade: the bytes that follow belong to another protocol
HALT_HELD = 2  # an addon holds the exchange
HALT_DONE = 4  # refused or closing: nothing more is read


def _keep(chunks: list[bytes], body: bytes, room: int) -> int:
    """Record what fits of ``body`` in ``room`` bytes of capture; return how much was kept."""
    if room <= 0:
        return 0
    piece = body if len(body) <= room else body[:room]
    chunks.append(piece)
    return len(piece)


def _authority(host: str, port: int, default: int) -> bytes:
    name = f"[{host}]" if ":" in host else host
    return (name if port == default else f"{name}:{port}").encode("idna")


def absolute_target(url: bytes) -> tuple[str, str, int, bytes, bytes]:
    """An absolute-form request target -> (scheme, host, port, path, Host header value);
    ``FramingError`` (400) when it is not an ``http(s)``/``ws(s)`` URL we can relay."""
    try:
        u = parse_url(url)
    except HttpParserError:
        raise FramingError(400, f"invalid request target {url[:200]!r}") from None
    scheme = u.schema.decode("latin-1").lower() if u.schema else ""
    scheme = _WS_SCHEMES.get(scheme, scheme)
    if scheme not in _DEFAULT_PORT or not u.host or u.userinfo:
        raise FramingError(400, f"unsupported request target {url[:200]!r}")
    if u.port is not None and not 0 < u.port < 65536:
        raise FramingError(400, f"invalid port in request target {url[:200]!r}")
    path = u.path or b"/"
    if u.query is not None:
        path += b"?" + u.query
    host = u.host.decode("latin-1").lower().rstrip(".")
    port = u.port if u.port is not None else _DEFAULT_PORT[scheme]
    host_header = u.host if u.port is None else b"%s:%d" % (u.host, u.port)
    return scheme, host, port, path, host_header


class ClientConnection(asyncio.Protocol):
    """One connection from a client: parses requests and relays their exchanges."""

    def __init__(
        self,
        ctx: ProxyContext,
        tls_target: tuple[str, int] | None = None,
        inner_scheme: str = "https",
    ) -> None:
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.transport: Any = None
        self.client_addr: Any = None
        self.tls_target = tls_target  # (host, port) of a CONNECT whose inside this is
        self.inner_scheme = inner_scheme  # what the inside of that CONNECT speaks
        self.sni: str | None = None  # the client's TLS server name, once known
        self.buf = b""  # input not parsed yet
        self.halt = 0
        self.ex: Exchange | None = None  # exchange being relayed
        self.parsing: Exchange | None = None  # exchange whose request body is being read
        self.body_left = 0
        self.chunks: ChunkedDecoder | None = None
        self.switching: Exchange | None = None  # Upgrade waiting for the upstream's answer
        self.held: Exchange | None = None  # exchange an addon holds at its request head
        self.queue: deque[Exchange] = deque()  # pipelined requests waiting for ``ex``
        self.paused = 0
        self.closing = False
        self.closed = False
        self.relay: Relay | None = None  # tunnel / websocket mode
        # Decrypted bytes that arrive before connection_made: start_tls() has not returned
        # yet (a TLS 1.3 client may send its first request with its Finished message).
        self.early: list[bytes] = []
        self.last_active = self.loop.time()
        self.idle_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None
        self.body_start = 0.0
        self.body_got = 0
        self.corked = False
        self.wbuf: list[bytes] = []  # to the client
        self.feeding = False
        self.up_buf: list[bytes] = []  # to ``up_target``
        self.up_target: UpstreamConnection | None = None
        self.replay: Callable[[Flow], None] | None = None  # set on a replay's connection

    # -- batched writes -------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Write to the client (batched while an upstream response is being parsed)."""
        if self.corked:
            self.wbuf.append(data)
        elif not self.closed:
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
            if not up.closed:
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
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.sni = getattr(ssl_object, "proxyfleet_sni", None)
        if self.early:
            early, self.early = self.early, []
            self.data_received(b"".join(early))

    def data_received(self, data: bytes) -> None:
        if self.transport is None:  # see ``early``
            self.early.append(data)
            return
        self.feeding = True
        try:
            self._process(data)
        except Exception:
            log.exception("request handling failed")
            self._bad_request("internal error", 500)
        finally:
            self.feeding = False
            self.flush_upstream()

    def _process(self, data: bytes) -> None:
        """Parse what has arrived: heads, then bodies, request after request."""
        buf = self.buf + data if self.buf else data
        self.buf = b""
        while buf:
            if self.halt or self.closed:
                if not self.halt & HALT_DONE:
                    self.buf = buf
                    if len(buf) > _PENDING_HIGH:  # held with a large body: stop reading
                        self._pause(PAUSE_HALT)
                return
            if self.parsing is not None:
                buf = self._body_bytes(buf)
                continue
            if buf[:2] == b"\r\n":  # empty lines before a request line are ignored
                buf = buf[2:]
                continue
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._bad_request(f"request head larger than {MAX_HEAD} bytes", 431)
                elif b"\n\n" in buf or b"\r\n\n" in buf or buf[:1] == b"\n":
                    self._bad_request("malformed request: bare LF")
                elif not plausible_request_start(buf):
                    self._bad_request("malformed request: not an HTTP request line")
                else:
                    self.buf = buf
                return
            if end > MAX_HEAD:
                self._bad_request(f"request head larger than {MAX_HEAD} bytes", 431)
                return
            head, buf = buf[: end + 2], buf[end + 4 :]
            self._on_head(head)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.ctx.connections.discard(self)
        self._cancel_timers()
        ex = self.ex
        if ex is not None:
            self._finish(ex, ERROR, "client disconnected")
            self._drop_upstream(ex)
        for waiting in (self.parsing, self.switching, self.held, *self.queue):
            if waiting is not None and waiting is not ex and waiting.recorded:
                self._finish(waiting, ERROR, "client disconnected")
                self._drop_upstream(waiting)
        self.queue.clear()
        self.held = None

    def pause_writing(self) -> None:
        up = self.ex.upstream if self.ex is not None else None
        if up is not None and not up.closed:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self.ex.upstream if self.ex is not None else None
        if up is not None and not up.closed:
            up.transport.resume_reading()

    def pause_for_upstream(self, full: bool) -> None:
        """The upstream's socket buffer filled up (or drained): stop (resume) reading."""
        if full:
            self._pause(PAUSE_UPSTREAM_FULL)
        else:
            self._resume(PAUSE_UPSTREAM_FULL)

    # -- request heads ------------------------------------------------------------------
    def _on_head(self, head: bytes) -> None:
        ex = Exchange(self, Flow(self.client_addr))
        if self.replay is not None:
            self.replay(ex.flow)
        try:
            req = parse_request_head(head)
        except FramingError as exc:
            self._reject(ex, exc.status, str(exc))
            return
        flow = ex.flow
        flow.method = req.method
        flow.http_version = req.version
        flow.req_headers = req.headers
        ex.keep_alive = req.keep_alive
        ex.req_body = req.body
        ex.content_length = req.content_length
        ex.conn_drop = req.conn_drop
        ex.upgrade = req.upgrade
        if req.method == b"CONNECT":
            self._on_connect(ex, req)
            return
        try:
            self._route(ex, req)
        except FramingError as exc:
            self._reject(ex, exc.status, str(exc))
            return
        self._expect_body(ex)
        chain = self.ctx.chain.request_head
        if chain:
            hooks.run(chain, ex)
            if ex.verdict and self._verdict(ex):
                return
        self._after_request_head(ex)

    def _after_request_head(self, ex: Exchange) -> None:
        """Record the exchange and send it on (or queue it behind earlier ones)."""
        flow = ex.flow
        ex.key = (flow.scheme, flow.host, flow.port)
        ex.is_head = flow.method == b"HEAD"
        rewrite = ex.req_rewrite
        if rewrite is not None and self.parsing is not ex:  # no body to rewrite
            rewrite.give_up("no body: not applied")
            ex.req_rewrite = rewrite = None
        # a body to rewrite: the head goes with it, once its length is known
        ex.head = self._request_head(ex) if rewrite is None else b""
        self._record(ex)
        if self.ex is None:
            self._begin(ex)
        else:
            self.queue.append(ex)
            self._pause(PAUSE_BUFFERED)
        if ex.body_replacement is not None:
            self._send_replacement(ex)
        if self.parsing is not ex:  # no body to read (none, or Content-Length: 0)
            self._request_done(ex)

    def _request_head(self, ex: Exchange) -> bytes:
        flow = ex.flow
        target = flow.path
        if self.ctx.upstream_proxy is not None and flow.scheme == "http":
            target = b"http://%s%s" % (
                ex.host_header or _authority(flow.host, flow.port, 80),
                target,
            )
        return request_head(
            flow.method,
            target,
            flow.req_headers,
            ex.host_header,
            ex.req_body,
            ex.content_length,
            ex.conn_drop,
            ex.upgrade,
            self.ctx.via,
        )

    def _send_replacement(self, ex: Exchange) -> None:
        """The body an addon gave instead of the client's (recorded as what was sent)."""
        body = ex.body_replacement
        assert body is not None
        flow = ex.flow
        limit = self.ctx.config.doc.capture_body_limit
        flow.req_body = [body[:limit]] if body and limit else []
        flow.req_size = len(body)
        flow.req_truncated = len(body) > limit
        ex.captured_req = min(len(body), limit)
        if body:
            self._send_upstream(ex, body)

    def _verdict(self, ex: Exchange) -> bool:
        """Act on an addon's verdict at the request head; True if the exchange stops here."""
        verdict = ex.verdict
        if verdict == HOLD:
            self._record(ex)
            self.held = ex
            self._halt(HALT_HELD)
            return True
        if verdict == KILL:
            self._record(ex)
            self._finish(ex, KILLED, ex.kill_reason)
            self.abort()
            return True
        if verdict == RESPOND:
            self._record(ex)
            ex.refusal = ex.answer
            # A request body we will not relay: the connection closes after the answer.
            ex.keep_alive = ex.keep_alive and self.parsing is not ex
            self.parsing = None
            if self.ex is None:
                self._answer(ex)
            else:
                self.queue.append(ex)
                self._pause(PAUSE_BUFFERED)
                if not ex.keep_alive:
                    self._halt(HALT_DONE)
            return True
        return False

    def resume(self, ex: Exchange) -> None:
        """Called by ``Exchange.resume``: go on with a held exchange, or send the answer
        an addon gave it while it was held (``RESPOND``)."""
        if ex is not self.held or self.closed:
            return
        self.held = None
        answered = ex.verdict == RESPOND
        if ex.held_framing is not None and ex.upstream is not None:  # held at response head
            if answered:
                ex.held_framing = None
                self._replace_response(ex)
            else:
                self._release_response(ex, ex.upstream)
            return
        if ex.flow.method == b"CONNECT":
            self.halt &= ~HALT_HELD  # still halted for the switch
            if answered:
                ex.keep_alive = False
                self._verdict(ex)
            else:
                self._connect_decided(ex)
            return
        self.feeding = True
        try:
            if answered:
                self._verdict(ex)
            else:
                self._after_request_head(ex)
            self._unhalt(HALT_HELD)
        finally:
            self.feeding = False
            self.flush_upstream()

    def retarget(self, ex: Exchange, url: str) -> str | None:
        """Point a request (at its head) at another absolute URL: scheme, host, port,
        path and the Host header follow, as for an absolute-form request."""
        try:
            target = absolute_target(url.encode("latin-1"))
        except (FramingError, UnicodeEncodeError) as exc:
            return str(exc) or "not a URL"
        flow = ex.flow
        flow.scheme, flow.host, flow.port, flow.path, ex.host_header = target
        return None

    def _route(self, ex: Exchange, req: RequestHead) -> None:
        """Resolve the request target (``FramingError`` if it cannot be relayed)."""
        flow = ex.flow
        url = req.target
        ctx = self.ctx
        host_header: bytes | None = None
        if url[:1] == b"/" or url == b"*":
            if self.tls_target is not None:
                scheme, host, port = self.inner_scheme, *self.tls_target
            elif ctx.reverse is not None:
                scheme, host, port, host_header = ctx.reverse
            else:
                raise FramingError(
                    400,
                    "This is a forward proxy: send absolute-form requests "
                    "(GET http://host/path) or CONNECT, e.g. curl -x http://<proxy> http://host/",
                )
            if req.host is None and req.version == "1.1" and host_header is None:
                raise FramingError(400, "HTTP/1.1 request without a Host header")
            path = url
        else:
            scheme, host, port, path, host_header = absolute_target(url)
            if ctx.reverse is not None:  # reverse mode: every request goes to the upstream
                scheme, host, port, host_header = ctx.reverse
            elif self.tls_target is not None:  # inside a CONNECT: the tunnel's target wins
                scheme, host, port = self.inner_scheme, *self.tls_target
                host_header = _authority(host, port, _DEFAULT_PORT[scheme])
        if req.via and via_has(flow.req_headers, ctx.via_token):
            raise FramingError(508, "request already passed this proxy (loop refused)")
        flow.scheme, flow.host, flow.port, flow.path = scheme, host, port, path
        ex.host_header = host_header

    def _record(self, ex: Exchange) -> None:
        if ex.recorded:
            return
        ex.recorded = True
        self.ctx.active[ex.flow.id] = ex
        self.ctx.capture.emit(ex.flow)

    # -- request bodies -----------------------------------------------------------------
    def _expect_body(self, ex: Exchange) -> None:
        if ex.req_body == BODY_LENGTH and ex.content_length:
            self.parsing = ex
            self.body_left = ex.content_length
        elif ex.req_body == BODY_CHUNKED:
            self.parsing = ex
            self.chunks = ChunkedDecoder()
        else:  # no body, or Content-Length: 0 (still sent on as such)
            return
        self.body_start = self.loop.time()
        self.body_got = 0
        if self.body_timer is None:
            self.body_timer = self.loop.call_later(
                self.ctx.config.doc.client_body_timeout, self._check_body
            )

    def _body_bytes(self, buf: bytes) -> bytes:
        """Take the current request's body out of ``buf``; return what follows it."""
        ex = self.parsing
        assert ex is not None
        if self.chunks is not None:
            try:
                pieces, used = self.chunks.feed(buf)
            except FramingError as exc:
                self._bad_request(f"malformed chunked body: {exc}", exc.status)
                return b""
            for piece in pieces:
                self._on_body(ex, piece)
            rest = buf[used:] if used < len(buf) else b""
            if self.chunks.done:
                self.chunks = None
                self._request_done(ex)
            return rest
        n = self.body_left
        if len(buf) <= n:
            piece, rest = buf, b""
        else:
            piece, rest = buf[:n], buf[n:]
        self.body_left -= len(piece)
        self._on_body(ex, piece)
        if not self.body_left:
            self._request_done(ex)
        return rest

    def _on_body(self, ex: Exchange, body: bytes) -> None:
        flow = ex.flow
        n = len(body)
        self.body_got += n
        if flow.state != "active" or ex.body_replacement is not None:
            return
        flow.req_size += n
        rewrite = ex.req_rewrite
        if rewrite is not None:
            if rewrite.take(body):
                return
            # too large to rewrite: what was held back goes on as it came, then the rest
            ex.req_rewrite = None
            held = rewrite.give_up(f"body over {REWRITE_LIMIT} bytes: not applied")
            self._send_upstream(ex, self._request_head(ex))
            for piece in held:
                self._relay_request_body(ex, piece)
        self._relay_request_body(ex, body)

    def _relay_request_body(self, ex: Exchange, body: bytes) -> None:
        n = len(body)
        kept = _keep(
            ex.flow.req_body, body, self.ctx.config.doc.capture_body_limit - ex.captured_req
        )
        ex.captured_req += kept
        if kept < n:
            ex.flow.req_truncated = True
        self._send_upstream(
            ex, b"%x\r\n%s\r\n" % (n, body) if ex.req_body == BODY_CHUNKED else body
        )

    def _request_done(self, ex: Exchange) -> None:
        if self.parsing is ex:
            self.parsing = None
        ex.req_done = True
        if ex.flow.state != "active":
            return
        chain = self.ctx.chain.request_end
        if chain:
            hooks.run(chain, ex)
        if ex.req_rewrite is not None:
            self._send_rewritten_request(ex)
        if ex.req_body == BODY_CHUNKED:
            self._send_upstream(ex, b"0\r\n\r\n")
        if ex.upstream is not None:
            ex.flow.t_request_sent = time.time()
        if ex.upgrade is not None:  # what follows belongs to the protocol asked for
            self.switching = ex
            self._halt(HALT_SWITCH)

    def _send_rewritten_request(self, ex: Exchange) -> None:
        """The whole request body is in: rewrite it, send the head and it, framed by
        its new length (recorded as sent)."""
        rewrite = ex.req_rewrite
        assert rewrite is not None
        ex.req_rewrite = None
        flow = ex.flow
        done = rewrite.apply(flow.req_headers)
        if done is None:
            held = rewrite.give_up("body cannot be decoded: not applied")
            self._send_upstream(ex, self._request_head(ex))
            for piece in held:
                self._relay_request_body(ex, piece)
            return
        body, flow.req_headers = done
        ex.req_body = BODY_LENGTH
        ex.content_length = len(body)
        ex.body_replacement = body
        self._send_upstream(ex, self._request_head(ex))
        self._send_replacement(ex)

    def _check_body(self) -> None:
        """Cut a request body that arrives slower than ``client_body_min_rate`` allows
        (after ``client_body_timeout`` seconds of grace), like Apache's mod_reqtimeout."""
        self.body_timer = None
        ex = self.parsing
        if ex is None or self.closed:
            return
        doc = self.ctx.config.doc
        now = self.loop.time()
        if self.paused:  # we stopped reading (backpressure, a hold), not the client
            self.body_start = now - self.body_got / doc.client_body_min_rate
        deadline = (
            self.body_start + doc.client_body_timeout + self.body_got / doc.client_body_min_rate
        )
        if now >= deadline:
            self._bad_request(
                f"request body too slow (under {doc.client_body_min_rate:g} bytes/s)", 408
            )
            return
        self.body_timer = self.loop.call_later(deadline - now, self._check_body)

    # -- sending the request upstream -----------------------------------------------------
    def _begin(self, ex: Exchange) -> None:
        if ex.refusal is not None:  # a refused or answered request: its turn to be answered
            self._answer(ex)
            return
        self.ex = ex
        up = self.ctx.pool.take(ex.key)
        if up is not None:
            assert isinstance(up, UpstreamConnection)
            self._attach(ex, up, reused=True)
        else:
            ex.connect_task = spawn(self._connect(ex), name="upstream-connect")

    def _answer(self, ex: Exchange) -> None:
        """Send the answer of a refused request, or one an addon gave."""
        assert ex.refusal is not None
        self.send(ex.refusal)
        if ex.verdict == RESPOND:
            self._finish(ex, COMPLETED)
            if ex.keep_alive:
                self._next(ex)
                return
        self.close()

    async def _connect(self, ex: Exchange) -> None:
        scheme, host, port = ex.key
        ctx = self.ctx
        try:
            async with asyncio.timeout(ctx.config.doc.upstream_connect_timeout):
                proto = await open_connection(
                    ctx,
                    ex.key,
                    lambda: UpstreamConnection(ctx, ex.key),
                    # the client's server name, unless an addon sent it elsewhere
                    self.sni if scheme == "https" and (host, port) == self.tls_target else None,
                    ex.span,
                    ex.flow,  # a new connection: its dns/connect/tls points go on the flow
                )
        except (OSError, ssl.SSLError, TimeoutError, Exception) as exc:
            status, message = describe_failure(host, port, exc)
            self._upstream_error(ex, status, message)
            return
        up = proto
        assert isinstance(up, UpstreamConnection)
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
        framing = response_framing(status, flow.resp_headers, ex.is_head)
        if status == 101:
            if ex.upgrade is None or framing.upgrade is None:
                self.upstream_invalid(ex, 502, "upstream switched protocols unasked")
                return
            ex.response_started = True
            self.send(
                response_head(
                    101,
                    flow.reason,
                    flow.resp_headers,
                    framing,
                    self.ctx.via,
                    b"Connection: Upgrade\r\nUpgrade: " + framing.upgrade + b"\r\n\r\n",
                )
            )
            return
        chain = self.ctx.chain.response_head
        if chain:
            hooks.run(chain, ex)
            if ex.verdict == KILL:
                self.kill(ex, ex.kill_reason)
                return
            if flow.status != status:  # rewritten: the upstream's phrase no longer fits
                flow.reason = b""
            if ex.verdict == RESPOND:  # the upstream's response is dropped for the answer
                self._replace_response(ex)
                return
            if ex.verdict == HOLD:  # sent on when resumed; the upstream waits meanwhile
                ex.held_framing = framing
                ex.retried = True  # the response head is in: never resent elsewhere
                self.held = ex
                up.hold()
                return
        self._send_response_head(ex, up, framing)

    def _send_response_head(
        self, ex: Exchange, up: UpstreamConnection, framing: ResponseFraming
    ) -> None:
        flow = ex.flow
        rewrite = ex.resp_rewrite
        if rewrite is not None:
            if framing.body != BODY_NONE:  # the head goes with the rewritten body
                rewrite.framing = framing
                ex.body_mode = framing.body
                return
            rewrite.give_up("no body: not applied")
            ex.resp_rewrite = None
        ex.response_started = True
        ex.body_mode = framing.body
        http11 = flow.http_version == "1.1"
        tail = []
        if framing.body in (BODY_CHUNKED, BODY_UNTIL_CLOSE):
            if http11:
                ex.out_chunked = True
                tail.append(b"Transfer-Encoding: chunked\r\n")
            else:
                ex.keep_alive = False  # HTTP/1.0: the body ends when we close
        keep = ex.keep_alive and ex.req_done and not self.closing and not self.ctx.draining
        ex.keep_alive = keep
        if not keep:
            tail.append(b"Connection: close\r\n")
        elif not http11:
            tail.append(b"Connection: keep-alive\r\n")
        tail.append(b"\r\n")
        self.send(
            response_head(
                flow.status, flow.reason, flow.resp_headers, framing, self.ctx.via,
                b"".join(tail),
            )
        )  # fmt: skip
        if ex.is_head:  # llhttp cannot know the response has no body
            up.head_done()

    def _release_response(self, ex: Exchange, up: UpstreamConnection) -> None:
        """A response held at its head goes on: the head, the body read meanwhile, and
        the rest as the upstream sends it."""
        framing = ex.held_framing
        assert framing is not None
        ex.held_framing = None
        self.corked = True
        try:
            self._send_response_head(ex, up, framing)
            for body in up.release():
                self.response_body(ex, body)
        finally:
            self.uncork()
        up.resume_after_hold()

    def _replace_response(self, ex: Exchange) -> None:
        """Answer with what an addon gave at the response head instead of the upstream's
        response, whose connection is then dropped (its body is never read)."""
        assert ex.answer is not None
        self._drop_upstream(ex)
        ex.response_started = True
        ex.keep_alive = ex.keep_alive and ex.req_done and not self.closing
        self.send(ex.answer)
        self._finish(ex, COMPLETED)
        self._next(ex)

    def interim_response(self, ex: Exchange, up: UpstreamConnection) -> None:
        """Relay a 1xx (e.g. 100 Continue) to an HTTP/1.1 client."""
        status = up.parser.get_status_code()
        ex.flow.resp_headers.clear()
        ex.flow.reason = b""
        if ex.flow.http_version == "1.1":
            self.send((STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status) + b"\r\n")

    def response_body(self, ex: Exchange, body: bytes) -> None:
        rewrite = ex.resp_rewrite
        if rewrite is not None:
            if rewrite.take(body):
                ex.flow.resp_size += len(body)
                return
            # too large to rewrite: the head and what was held back go on as they came
            ex.resp_rewrite = None
            held = rewrite.give_up(f"body over {REWRITE_LIMIT} bytes: not applied")
            self._send_response_head(ex, ex.upstream, rewrite.framing)
            ex.flow.resp_size -= sum(map(len, held))
            for piece in held:
                self._relay_response_body(ex, piece)
        self._relay_response_body(ex, body)

    def _relay_response_body(self, ex: Exchange, body: bytes) -> None:
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

    def response_done(self, ex: Exchange, up: UpstreamConnection, reusable: bool) -> None:
        if ex.resp_rewrite is not None:
            self._send_rewritten_response(ex, up)
        if ex.out_chunked:
            self.send(b"0\r\n\r\n")
        self.uncork()  # the response's last bytes go out before the bookkeeping
        self._finish(ex, COMPLETED)
        ex.upstream = None
        if reusable and ex.req_done and ex.body_mode != BODY_UNTIL_CLOSE and not up.closed:
            self.ctx.pool.put(up)
        else:
            up.close()
        self._next(ex)

    def _send_rewritten_response(self, ex: Exchange, up: UpstreamConnection) -> None:
        """The whole response body is in: rewrite it and send the head with it, framed
        by its new length (the client's copy is what is recorded)."""
        rewrite = ex.resp_rewrite
        assert rewrite is not None
        ex.resp_rewrite = None
        flow = ex.flow
        framing = rewrite.framing
        done = rewrite.apply(flow.resp_headers)
        if done is None:
            held = rewrite.give_up("body cannot be decoded: not applied")
            self._send_response_head(ex, up, framing)
            flow.resp_size -= sum(map(len, held))
            for piece in held:
                self._relay_response_body(ex, piece)
            return
        body, flow.resp_headers = done
        framing.body = BODY_LENGTH
        framing.length = b"%d" % len(body)
        self._send_response_head(ex, up, framing)
        flow.resp_size = 0
        flow.resp_body = []
        ex.captured_resp = 0
        flow.resp_truncated = False
        self._relay_response_body(ex, body)

    def upstream_lost(self, ex: Exchange, up: UpstreamConnection, exc: Exception | None) -> None:
        """The upstream connection closed while ``ex`` was using it."""
        deferred = ex.resp_rewrite is not None and ex.resp_rewrite.framing is not None
        if (ex.response_started or deferred) and ex.body_mode == BODY_UNTIL_CLOSE:
            if exc is None:  # a clean close ends a read-until-close body
                self.response_done(ex, up, reusable=False)
            else:  # a reset: the body was cut short, and the client must be able to tell
                self._upstream_error(ex, 502, f"upstream reset the connection mid-body: {exc}")
        elif up.reused and not ex.response_started and self._retry(ex):
            return
        else:
            why = f": {exc}" if exc else ""
            self._upstream_error(ex, 502, f"upstream closed the connection{why}")

    def upstream_timeout(self, ex: Exchange) -> None:
        secs = self.ctx.config.doc.upstream_read_timeout
        self._upstream_error(ex, 504, f"upstream sent nothing for {secs:g}s")

    def upstream_invalid(self, ex: Exchange, status: int, message: str) -> None:
        self._upstream_error(ex, status, message)

    # -- ending exchanges ---------------------------------------------------------------
    def end(self, ex: Exchange, state: str, error: str | None = None) -> None:
        """End ``ex`` in ``state`` (the replica's drain deadline uses this)."""
        self._finish(ex, state, error)

    def _finish(self, ex: Exchange, state: str, error: str | None = None) -> None:
        if ex.flow.finish(state, error):
            ctx = self.ctx
            ctx.active.pop(ex.flow.id, None)
            ctx.flows_total += 1
            chain = ctx.chain.response_end if state == COMPLETED else ctx.chain.error
            if chain:
                hooks.run(chain, ex)
            if ex.on_end is not None:
                ex.on_end(ex)
            if ex.recorded:
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
            self._unhalt(HALT_SWITCH)
            if self.closed or self.ex is not None:
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
        started = ex.response_started
        if not started and not self.closed:
            flow.status = status
            self.send(error_response(status, message))
        self._finish(ex, ERROR, message)
        if self.ex is ex:
            self.ex = None
        if started:  # a response cut short: reset, so that the client cannot take it whole
            self.uncork()
            self.abort(reset=True)
        else:
            self.close()

    def _reject(self, ex: Exchange, status: int, message: str) -> None:
        """Answer a request we will not relay, record it, and stop reading.

        Responses still owed to earlier pipelined requests go first: the refusal
        then waits in the queue.
        """
        ex.flow.status = status
        self._record(ex)
        self._finish(ex, ERROR, message)
        self.parsing = None
        self._halt(HALT_DONE)
        ex.refusal = error_response(status, message)
        if self.ex is not None:
            self.queue.append(ex)
            return
        self._answer(ex)

    def _bad_request(self, message: str, status: int = 400) -> None:
        ex = self.parsing
        if ex is not None and (ex is self.ex or ex.response_started):
            # The body of the request being relayed is broken: the upstream can never
            # get all of it, so end the exchange (answered ``status`` if nothing was sent).
            self.parsing = None
            self.chunks = None
            self._halt(HALT_DONE)
            self._upstream_error(ex, status, message)
            self.close()
            return
        if ex is not None and ex.recorded:
            self.parsing = None
            self.chunks = None
            self._reject(ex, status, message)
            return
        self._reject(ex or Exchange(self, Flow(self.client_addr)), status, message)

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
        if self.held is ex:
            self.held = None
        self._drop_upstream(ex)
        self.abort(reset=True)

    # -- CONNECT --------------------------------------------------------------------------
    def _on_connect(self, ex: Exchange, req: RequestHead) -> None:
        flow = ex.flow
        ctx = self.ctx
        if ctx.reverse is not None:
            self._reject(ex, 405, "CONNECT is not allowed: this is a reverse proxy")
            return
        if self.tls_target is not None:
            self._reject(ex, 400, "CONNECT inside a tunnel is not supported")
            return
        host, _, port_s = req.target.decode("latin-1").rpartition(":")
        host = host.strip("[]").lower().rstrip(".")
        if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
            self._reject(ex, 400, f"invalid CONNECT target {req.target[:200]!r}")
            return
        port = int(port_s)
        if self.ex is not None or self.queue:
            self._reject(ex, 400, "CONNECT must be the last request on its connection")
            return
        if req.via and via_has(flow.req_headers, ctx.via_token):
            self._reject(ex, 508, "request already passed this proxy (loop refused)")
            return
        flow.scheme, flow.host, flow.port, flow.path = "https", host, port, b""
        self._halt(HALT_SWITCH)
        chain = ctx.chain.request_head
        if chain:
            hooks.run(chain, ex)
            if ex.verdict == RESPOND:  # a CONNECT answered (refused): nothing follows it
                ex.keep_alive = False
            if ex.verdict and self._verdict(ex):
                return
        self._connect_decided(ex)

    def _connect_decided(self, ex: Exchange) -> None:
        flow = ex.flow
        if ex.tunnel:
            flow.kind = "tunnel"
            flow.scheme = "tcp"
            flow.stats = {"bytes_client_to_server": 0, "bytes_server_to_client": 0}
            ex.key = ("tcp", flow.host, flow.port)
            self._record(ex)
            self.ex = ex
            ex.connect_task = spawn(self._open_tunnel(ex), name="tunnel-connect")
        else:
            ex.key = ("https", flow.host, flow.port)
            spawn(self._open_inside(ex), name="connect-inside")

    async def _open_tunnel(self, ex: Exchange) -> None:
        _, host, port = ex.key
        assert ex.flow.stats is not None
        relay = Relay(self, ex.flow.stats, count_frames=False)
        try:
            async with asyncio.timeout(self.ctx.config.doc.upstream_connect_timeout):
                await open_connection(
                    self.ctx, ex.key, lambda: relay.server, None, ex.span, ex.flow
                )
        except Exception as exc:
            status, message = describe_failure(host, port, exc)
            self._upstream_error(ex, status, message)
            return
        ex.connect_task = None
        server = relay.server
        if self.closed:
            server.transport.close()
            return
        ex.flow.server_addr = server.transport.get_extra_info("peername")
        ex.flow.status = 200
        ex.response_started = True
        self.relay = relay
        self._cancel_timers()
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        relay.wire(self.transport, server.transport)

    async def _open_inside(self, ex: Exchange) -> None:
        """Answer the CONNECT, then relay what the client sends inside: TLS (a ClientHello
        first) is intercepted, anything else is read as plain HTTP/1.1."""
        _, host, port = ex.key
        ctx = self.ctx
        # refused early: before the client's TLS handshake
        if ctx.upstream_proxy is not None:
            refusal = ctx.destinations.check_unresolved(host, port)
        else:
            try:
                _, refusal = await destinations.pick(ctx.destinations, self.loop, host, port)
            except OSError as exc:
                self._reject(ex, *describe_failure(host, port, exc))
                return
        if refusal is not None:
            self._reject(ex, 403, refusal)
            return
        if self.closed:
            return
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if self.buf:  # sent along with the CONNECT, before our answer
            first: int | None = self.buf[0]
            if first == inside.TLS_HANDSHAKE:  # already read: start_tls cannot have it
                self._record(ex)
                self._finish(ex, ERROR, "TLS ClientHello sent before the CONNECT was answered")
                self.abort()
                return
        else:
            try:
                async with asyncio.timeout(ctx.config.doc.client_idle_timeout):
                    first = await inside.peek_first_byte(self.loop, self.transport)
            except (OSError, TimeoutError):
                self.abort()
                return
        if self.closed or first is None:
            self.close()
            return
        if first != inside.TLS_HANDSHAKE:
            self.hand_over(ClientConnection(ctx, (host, port), "http"), self.transport)
            return
        inner = ClientConnection(ctx, (host, port), "https")
        try:
            sslctx = ctx.ca.client_hello_context(host)
            async with asyncio.timeout(ctx.config.doc.upstream_connect_timeout):
                transport = await self.loop.start_tls(
                    self.transport, inner, sslctx, server_side=True
                )
        except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
            if not self.closed:
                self._record(ex)
                why = str(exc) or type(exc).__name__
                self._finish(ex, ERROR, f"client TLS handshake failed: {why}")
                self.abort()
            return
        if transport is not None and not self.closed:
            self.hand_over(inner, transport)

    def hand_over(self, inner: ClientConnection, transport: Any) -> None:
        """What follows the CONNECT belongs to ``inner`` (a connection for the tunnel's
        target): this one is done; it never held a flow of its own."""
        self.ctx.connections.discard(self)
        self._cancel_timers()
        self.closed = True
        early, self.buf = self.buf, b""
        if transport.get_protocol() is not inner:
            transport.set_protocol(inner)
        inner.connection_made(transport)
        transport.resume_reading()  # paused since the CONNECT was read
        if early:
            inner.data_received(early)

    # -- WebSocket (Upgrade answered 101) -------------------------------------------------
    def start_websocket(self, ex: Exchange, up: UpstreamConnection, rest: bytes) -> None:
        """The upstream answered 101: relay frames both ways from now on."""
        self.uncork()  # the 101 head goes out before any relayed byte
        ex.flow.kind = "websocket"
        stats = ex.flow.stats = {
            "bytes_client_to_server": 0,
            "bytes_server_to_client": 0,
            "messages_client_to_server": 0,
            "messages_server_to_client": 0,
        }
        self.switching = None
        relay = self.relay = Relay(self, stats, count_frames=True)
        self._cancel_timers()
        up.detach()
        early, self.buf = self.buf, b""
        if rest:
            relay.server.early.append(rest)
        if early:
            relay.client.early.append(early)
        relay.wire(self.transport, up.transport)
        self.halt = 0
        self.paused = 0

    def relay_closed(self) -> None:
        """Both ends of the tunnel or websocket are closed: finish the flow."""
        self.closed = True
        self.ctx.connections.discard(self)
        ex = self.ex
        if ex is not None:
            self._finish(ex, COMPLETED)
            self.ex = None

    # -- flow control and lifecycle -------------------------------------------------------
    def _halt(self, reason: int) -> None:
        """Stop parsing input. A held exchange keeps reading (into ``buf``, bounded) so
        that a client that leaves is noticed and frees it; otherwise reading pauses."""
        self.halt |= reason
        if reason != HALT_HELD:
            self._pause(PAUSE_HALT)

    def _unhalt(self, reason: int) -> None:
        """Go on parsing what was kept while halted, then read again."""
        self.halt &= ~reason
        if self.halt or self.closed:
            return
        self._resume(PAUSE_HALT)
        if self.buf:
            self.data_received(b"")

    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.transport.resume_reading()

    def _check_idle(self) -> None:
        self.idle_timer = None
        if self.closed or self.relay is not None:
            return
        timeout = self.ctx.config.doc.client_idle_timeout
        idle = self.loop.time() - self.last_active
        busy = self.ex is not None or self.held is not None or self.parsing is not None
        if not busy and idle >= timeout:
            self.close()
            return
        self.idle_timer = self.loop.call_later(max(timeout - idle, 1.0), self._check_idle)

    def _cancel_timers(self) -> None:
        for timer in (self.idle_timer, self.body_timer):
            if timer is not None:
                timer.cancel()
        self.idle_timer = self.body_timer = None

    def shutdown(self) -> None:
        """Graceful stop: close now if idle, else after the current response."""
        self.closing = True
        if self.relay is None and self.ex is None and self.parsing is None and not self.queue:
            self.close()

    def close(self) -> None:
        """Close after what is written (and batched) has been sent."""
        if not self.closed and self.transport is not None:
            self.uncork()
            self.closed = True
            self.transport.close()

    def abort(self, reset: bool = False) -> None:
        """Cut the connection now (and both ends of a tunnel or websocket); ``reset``
        sends a TCP RST instead of a FIN, which is how an HTTP/1.0 client (whose body
        ends at the close) learns that the body was cut short."""
        self.wbuf = []
        if self.relay is not None:
            self.relay.abort()
        if self.transport is not None:
            self.closed = True
            if reset:
                sock = self.transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            self.transport.abort()
