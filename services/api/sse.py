"""How every live stream of the API is answered: one ``text/event-stream`` response with
heartbeat comments, that ends as soon as the key that opened it is revoked.

A key's revocation is refused at once on new requests (``auth``); a stream opened before
it would otherwise go on delivering flows and events for hours. So each event, before it
is sent, checks that the stream's key is still honoured (a set lookup), and a stream
opened with a web UI session also that the session is still open (a KV read at most every
``SESSION_RECHECK_S``: signing out on another tab or replica ends it too). The client
reconnects, and is refused.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from services.api.auth import KeyRing, Principal
from services.api.ui.sessions import SessionsUnavailable

log = logging.getLogger("proxyfleet.api.sse")

SEP = "\n"
SESSION_RECHECK_S = 2.0


def heartbeat() -> ServerSentEvent:
    return ServerSentEvent(comment="heartbeat", sep=SEP)


def sse_response(
    request: Request, content: AsyncIterator[Any], heartbeat_s: float
) -> EventSourceResponse:
    """The stream of ``content`` for as long as its caller stays authorized."""
    return EventSourceResponse(
        _while_authorized(request, content),
        ping=heartbeat_s,
        sep=SEP,
        ping_message_factory=heartbeat,
        cleanup_timeout=5.0,
    )


async def _while_authorized(request: Request, content: AsyncIterator[Any]) -> AsyncIterator[Any]:
    keyring: KeyRing = request.app.state.keyring
    principal: Principal | None = getattr(request.state, "principal", None)
    token: str | None = getattr(request.state, "session_token", None)
    recheck = time.monotonic() + SESSION_RECHECK_S
    async with contextlib.aclosing(content):  # type: ignore[type-var]
        async for item in content:
            if principal is not None and not keyring.honours(principal.key_id):
                log.info("a stream of key %s ended: the key was revoked", principal.key_id)
                return
            if token is not None and time.monotonic() >= recheck:
                services = request.app.state.services
                try:
                    over = services is None or await services.sessions.find(token) is None
                except SessionsUnavailable:
                    over = False  # NATS away: checked again at the next event
                if over:
                    log.info("a stream of a UI session ended: the session is over")
                    return
                recheck = time.monotonic() + SESSION_RECHECK_S
            yield item
