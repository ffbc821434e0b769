"""Audit records: one system event (``fleet.events.api.audit``) per mutating API call.

``AuditMiddleware`` wraps every request whose method changes state (anything but
GET/HEAD/OPTIONS) under ``/api``, whatever its outcome (401, 403, 422 and 500
included), and publishes one ``SystemEvent`` of type ``audit`` after the response has
been sent: who (the key id, never the key), what (method, path, route, action), the
result status, when, how long, and what the route added with ``note`` (e.g. the config
revisions before and after). The action is declared on the route (``action``), so a
call refused before its handler ran carries it too. Bodies are never recorded.
Publishing is bounded and never fails the call (``libs.common.events``); safe methods
pass through untouched, so the SSE streams are not wrapped.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from libs.common import events, subjects
from libs.common.models import Severity

log = logging.getLogger("proxyfleet.api.audit")

_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
# the web UI's posts that change who is signed in: audited like the API's writes
_UI_AUDITED = frozenset({"/ui/login", "/ui/logout"})
_STATE_KEY = "audit"


ACTION_KEY = "x-audit-action"


def action(name: str) -> dict[str, Any]:
    """``openapi_extra`` declaring the audit action of a route (``config.put``).

    Declared on the route rather than only noted by its handler, so a call refused
    before the handler runs (401, 403, 422 on the query) is still recorded with the
    action it attempted; OpenAPI shows it as ``x-audit-action``.
    """
    return {ACTION_KEY: name}


def note(request: Request, action: str, **details: Any) -> None:
    """Name the action of this call and add details to its audit record."""
    request.state.audit = {"action": action, **details}


def declared_action(scope: Scope) -> str | None:
    """The action the matched route declares for this method (None for a 405 or a 404)."""
    route = scope.get("route")
    if scope["method"] not in (getattr(route, "methods", None) or ()):
        return None
    value = (getattr(route, "openapi_extra", None) or {}).get(ACTION_KEY)
    return value if isinstance(value, str) else None


def _severity(status: int) -> Severity:
    if status >= 500:
        return "error"
    if status >= 400:
        return "warning"
    return "info"


def _template(scope: Scope) -> str | None:
    """The matched route's path template (``/api/flows/{flow_id}``), or None."""
    if scope.get("route") is None:
        return None
    names = {str(v): k for k, v in (scope.get("path_params") or {}).items()}
    return "/".join(f"{{{names[p]}}}" if p in names else p for p in scope["path"].split("/"))


class AuditMiddleware:
    """Pure ASGI (streaming responses pass through untouched); see the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] in _SAFE
            or not (scope["path"].startswith("/api/") or scope["path"] in _UI_AUDITED)
        ):
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        status = 500  # what the client gets if the app fails before answering
        started = time.time()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            await self._record(scope, state, status, started)

    @staticmethod
    async def _record(scope: Scope, state: dict[str, Any], status: int, started: float) -> None:
        app = scope.get("app")
        services = getattr(getattr(app, "state", None), "services", None)
        if services is None:
            return
        principal = state.get("principal")
        details = dict(state.get(_STATE_KEY) or {})
        data: dict[str, Any] = {
            "action": details.pop("action", None) or declared_action(scope),
            "key_id": getattr(principal, "key_id", None),
            "scope": getattr(principal, "scope", None),
            "method": scope["method"],
            "path": scope["path"],
            "route": _template(scope),
            "status": status,
            "started": started,
            "duration_ms": round((time.time() - started) * 1000, 3),
            **details,
        }
        settings = getattr(app.state, "settings", None) if app is not None else None
        await events.emit(
            services.bus,
            subjects.API_SOURCE,
            events.AUDIT,
            data,
            _severity(status),
            replica=getattr(settings, "replica_id", None),
        )
