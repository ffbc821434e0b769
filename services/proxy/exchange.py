"""One request and its response as the relay drives it (the recorded part is ``flow``).

Besides the relay's own state, an ``Exchange`` carries the verdict that addons
give through the hook seam (``services/proxy/hooks.py``): answer the request
(``respond``), kill it (``kill``), or hold it (``hold``) until ``resume``. A held
exchange is a parked object: the client connection stops reading, no timer or
task runs for it, and a kill or a client disconnect frees it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from services.proxy.flow import Flow
from services.proxy.framing import BODY_LENGTH, BODY_NONE, STATUS_LINES

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from services.proxy.rewrite import BodyRewrite

# Verdicts (``Exchange.verdict``); 0 means "go on".
RESPOND, KILL, HOLD = 1, 2, 3


class Owner(Protocol):
    """What an exchange needs from the connection that relays it."""

    def kill(self, ex: Exchange, reason: str) -> None: ...

    def resume(self, ex: Exchange) -> None: ...

    def retarget(self, ex: Exchange, url: str) -> str | None: ...


class Exchange:
    """Relay state of one request/response."""

    __slots__ = (
        "answer",
        "body_mode",
        "body_replacement",
        "captured_req",
        "captured_resp",
        "conn",
        "conn_drop",
        "connect_task",
        "content_length",
        "flow",
        "head",
        "held_framing",
        "host_header",
        "is_head",
        "keep_alive",
        "key",
        "kill_reason",
        "on_end",
        "out_chunked",
        "pending",
        "pending_size",
        "recorded",
        "refusal",
        "req_body",
        "req_done",
        "req_rewrite",
        "resp_rewrite",
        "response_started",
        "retried",
        "sni",
        "span",
        "tunnel",
        "upgrade",
        "upgrade_rest",
        "upstream",
        "verdict",
    )

    def __init__(self, conn: Owner, flow: Flow) -> None:
        self.conn = conn
        self.flow = flow
        self.key: tuple[str, str, int] = ("http", "", 0)
        self.head = b""  # the upstream request head, built after the request_head hooks
        self.host_header: bytes | None = None  # Host sent upstream (None: the client's)
        self.req_body = BODY_NONE  # request body framing (framing.BODY_*)
        self.content_length = 0
        self.conn_drop: frozenset[bytes] = frozenset()
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.req_done = False
        self.keep_alive = True
        self.is_head = False
        self.upgrade: bytes | None = None  # the Upgrade value of an upgrade request
        self.upgrade_rest = b""
        self.upstream: Any = None  # the UpstreamConnection relaying it
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
        self.sni: str | None = None  # the client's TLS server name (intercepted CONNECT)
        self.tunnel = False  # CONNECT: relay bytes untouched instead of intercepting
        self.verdict = 0
        self.answer: bytes | None = None  # the response an addon gave (RESPOND)
        self.kill_reason = ""
        self.held_framing: Any = None  # the response's framing while held at its head
        self.body_replacement: bytes | None = None  # sent instead of the client's body
        self.req_rewrite: BodyRewrite | None = None  # replace_body rules, request body
        self.resp_rewrite: BodyRewrite | None = None  # and response body
        self.on_end: Callable[[Exchange], None] | None = None  # told when the flow ends

    # -- verdicts, for addons ------------------------------------------------------------
    def respond(
        self, status: int, headers: list[tuple[bytes, bytes]] | None = None, body: bytes = b""
    ) -> None:
        """Answer the request with this response instead of relaying it."""
        parts = [STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
        for name, value in headers or ():
            if name.lower() not in (b"content-length", b"transfer-encoding", b"connection"):
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"Content-Length: %d\r\n\r\n" % len(body))
        parts.append(body)
        self.flow.status = status
        self.flow.resp_headers = [*(headers or ()), (b"Content-Length", b"%d" % len(body))]
        self.flow.resp_body = [body] if body else []
        self.flow.resp_size = len(body)
        self.answer = b"".join(parts)
        self.verdict = RESPOND

    def kill(self, reason: str = "killed by addon") -> None:
        """Abort the exchange: both connections are cut, the flow ends killed."""
        self.kill_reason = reason
        self.verdict = KILL
        if self.recorded:  # outside a hook (e.g. an operator on a held exchange)
            self.conn.kill(self, reason)

    def hold(self) -> None:
        """Park the exchange at this hook until ``resume`` (or a kill, or a disconnect).

        At ``request_head`` nothing has gone upstream; at ``response_head`` the upstream
        connection stops being read and the head waits (rewrites made before ``resume``
        are sent). Other hooks cannot hold."""
        self.verdict = HOLD

    def resume(self) -> None:
        """Go on from the hook where the exchange was held; if ``respond`` was called
        while it was held, that answer is sent instead (at the response head it
        replaces the upstream's response)."""
        if self.verdict == HOLD:
            self.verdict = 0
        elif self.verdict != RESPOND:
            return
        self.conn.resume(self)

    def replace_request_body(self, body: bytes) -> None:
        """Send ``body`` upstream instead of the client's (which is read and dropped);
        only while the request head has not gone upstream (held at ``request_head``)."""
        self.body_replacement = body
        self.req_body = BODY_LENGTH
        self.content_length = len(body)

    def retarget(self, url: str) -> str | None:
        """Send the request to this absolute ``http(s)://`` URL instead (request head
        only); None when done, else why not (the exchange is unchanged)."""
        return self.conn.retarget(self, url)
