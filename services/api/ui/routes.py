"""``/ui``: sign in and out, the page shells of each view, and ``/api/docs``.

Pages are rendered on the server (Jinja2, autoescaped): the layout, the signed-in key and
its scope, and the session's CSRF token for the view's script, which then reads pages and
live streams from the REST API with the session cookie. A page without a session sends
the browser to the sign-in form, and back where it was going afterwards.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from services.api import audit
from services.api.auth import KeyRing, Principal
from services.api.ui.sessions import COOKIE_NAME, Session, SessionsUnavailable

log = logging.getLogger("proxyfleet.api.ui")

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")

# view name -> (title, the module that draws it)
VIEWS: dict[str, str] = {
    "flows": "Flows",
    "intercept": "Intercept",
    "rules": "Rules",
    "config": "Config",
    "replicas": "Replicas",
    "events": "Events",
    "keys": "Keys",
}
HOME = "/ui/flows"
# what every UI page may load: our own files only; no inline script, no framing
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make a form post's Origin "null"
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

router = APIRouter(include_in_schema=False)


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of ours, never another site (``//evil``,
    ``/\\evil`` or a scheme would be an open redirect)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return HOME
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith(("/ui/", "/api/docs")):
        return HOME
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in target):
        return HOME
    return target


def _same_origin(request: Request) -> bool:
    """A form post must come from our own pages: a browser sends ``Origin`` with every
    POST; when it names another origin the post was made by another site."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    host = request.headers.get("host", "")
    parts = urlsplit(origin)
    return parts.netloc == host and parts.scheme in ("http", "https")


def _secure(request: Request) -> bool:
    configured: bool | None = request.app.state.settings.ui_secure_cookie
    return configured if configured is not None else request.url.scheme == "https"


async def signed_in(request: Request) -> tuple[Session, Principal] | None:
    """The request's live session and its key's principal now, or None. Raises
    ``SessionsUnavailable`` while NATS is away (answered 503, not a sign-in form)."""
    token = request.cookies.get(COOKIE_NAME)
    services = request.app.state.services
    if not token:
        return None
    if services is None:
        raise SessionsUnavailable("NATS is not connected")
    session = await services.sessions.find(token)
    if session is None:
        return None
    keyring: KeyRing = request.app.state.keyring
    principal = keyring.principal_of(session.key_id)
    return None if principal is None else (session, principal)


def _to_login(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/ui/login?next={quote(target, safe='')}", status_code=303)


def _page(request: Request, name: str, status: int = 200, **context: object) -> HTMLResponse:
    return templates.TemplateResponse(
        request, name, {"views": VIEWS, **context}, status_code=status, headers=PAGE_HEADERS
    )


async def sessions_unavailable(request: Request, exc: Exception) -> Response:
    """A page asked while NATS is away: say so (503), do not ask to sign in again."""
    return _page(
        request, "missing.html", 503, view=None, principal=None, session=None, unavailable=True
    )


@router.get("/ui")
@router.get("/ui/")
async def ui_home() -> Response:
    return RedirectResponse(HOME, status_code=303)


@router.get("/ui/login")
async def login_form(request: Request, next: str | None = None) -> Response:
    return _page(request, "login.html", next=safe_next(next), error=None)


@router.post("/ui/login", openapi_extra=audit.action("ui.sign_in"))
async def login(
    request: Request,
    key: Annotated[str, Form(max_length=512)] = "",
    next: Annotated[str, Form(max_length=2048)] = HOME,
) -> Response:
    target = safe_next(next)
    if not _same_origin(request):
        return _page(request, "login.html", 403, next=target, error="Sign in from this site.")
    services = request.app.state.services
    keyring: KeyRing = request.app.state.keyring
    principal = keyring.authenticate(key.strip()) if key.strip() else None
    if principal is None:
        return _page(request, "login.html", 401, next=target, error="That key is not valid.")
    try:
        if services is None:
            raise SessionsUnavailable("NATS is not connected")
        token, session = await services.sessions.open(principal.key_id)
    except Exception as exc:  # KV cannot be written: no session, say so
        log.warning("UI sign-in failed: %r", exc)
        error = "Sessions cannot be stored right now (NATS); try again shortly."
        return _page(request, "login.html", 503, next=target, error=error)
    request.state.principal = principal  # the audit record names the key
    log.info("UI sign-in: key %s (%s)", principal.key_id, principal.scope)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE_NAME,
        token,
        max_age=int(session.expires - session.created),
        path="/",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    return response


@router.post("/ui/logout", openapi_extra=audit.action("ui.sign_out"))
async def logout(request: Request, csrf: Annotated[str, Form(max_length=256)] = "") -> Response:
    found = await signed_in(request)
    token = request.cookies.get(COOKIE_NAME, "")
    if found is not None:
        session, request.state.principal = found
        if not hmac.compare_digest(csrf.encode(), session.csrf.encode()):
            return Response("sign-out needs the page's CSRF token", 403, headers=PAGE_HEADERS)
        await request.app.state.services.sessions.end(token)
        log.info("UI sign-out: key %s", session.key_id)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
    return response


@router.get("/ui/{view}")
async def view_page(request: Request, view: str) -> Response:
    if view not in VIEWS:
        return _page(request, "missing.html", 404, view=view, session=None, principal=None)
    found = await signed_in(request)
    if found is None:
        return _to_login(request)
    session, principal = found
    return _page(request, "view.html", view=view, session=session, principal=principal)


@router.get("/ui/flows/{flow_id}")
async def flow_page(request: Request, flow_id: str) -> Response:
    found = await signed_in(request)
    if found is None:
        return _to_login(request)
    session, principal = found
    return _page(
        request, "view.html", view="flow", session=session, principal=principal, flow_id=flow_id
    )


@router.get("/api/docs")
async def api_docs(request: Request) -> Response:
    found = await signed_in(request)
    if found is None:
        return _to_login(request)
    session, principal = found
    return _page(request, "docs.html", view="docs", session=session, principal=principal)
