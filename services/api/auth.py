"""API keys: kept only as SHA-256 digests, compared in constant time, two scopes.

A presented key is hashed once and compared with ``hmac.compare_digest``
against *every* configured digest, with no early exit, so neither the timing
of a match nor of a near-miss tells an attacker which key (or how much of it)
was right. Comparing digests rather than the keys also makes the comparison
length-independent. Keys never reach a log line.

With no key configured, the first start generates an admin key into
``$FLEET_DATA_DIR/api-key`` (created 0600, atomically, so two API replicas
starting together agree on one key) and later starts reuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from libs.common.settings import API_KEY_FILE, ApiKeySpec, ApiSettings, ensure_private_dir
from services.api.errors import ApiError
from services.api.ui.sessions import COOKIE_NAME, CSRF_HEADER, SessionsUnavailable

log = logging.getLogger("proxyfleet.api.auth")

KEY_FILE_NAME = API_KEY_FILE
GENERATED_KEY_ID = "local"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class KeyFileError(Exception):
    """The generated-key file cannot be created or read; the message is one line."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: the key's id (never the key) and its scope."""

    key_id: str
    scope: Literal["read", "admin"]


class KeyRing:
    """The configured keys (digests only) and where they came from."""

    def __init__(self, keys: Sequence[ApiKeySpec], source: str) -> None:
        if not keys:
            raise ValueError("a key ring needs at least one key")
        self._keys = tuple(keys)
        self.source = source  # for the start line: "FLEET_API_KEYS (2 keys)" or the file path
        # keys made at runtime (``runtime_keys``): replaced whole, never mutated, so that an
        # authentication in progress sees one consistent set
        self._runtime: tuple[ApiKeySpec, ...] = ()
        self._ids = frozenset(k.id for k in self._keys)  # every key honoured now
        self.on_use: Callable[[str], None] | None = None  # told the id of each key used

    def __len__(self) -> int:
        return len(self._keys) + len(self._runtime)

    @property
    def static(self) -> tuple[ApiKeySpec, ...]:
        """The configured keys (settings or the key file): not revocable over the API."""
        return self._keys

    def set_runtime(self, keys: Sequence[ApiKeySpec]) -> None:
        """The runtime keys now (a runtime key never shadows a configured one's id)."""
        taken = {k.id for k in self._keys}
        self._runtime = tuple(k for k in keys if k.id not in taken)
        self._ids = frozenset((*taken, *(k.id for k in self._runtime)))

    def honours(self, key_id: str) -> bool:
        """Whether the key with that id is still honoured (an open stream asks per event)."""
        return key_id in self._ids

    def authenticate(self, presented: str) -> Principal | None:
        """The principal whose key is ``presented``, or None; constant time in the keys."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: ApiKeySpec | None = None
        for key in (*self._keys, *self._runtime):  # no break: every digest, every time
            if hmac.compare_digest(digest, key.sha256):
                found = key
        if found is None:
            return None
        if self.on_use is not None:
            self.on_use(found.id)
        return Principal(found.id, found.scope)

    def principal_of(self, key_id: str) -> Principal | None:
        """The principal of the key with that id now (a UI session's key), or None once it
        is revoked or gone from the settings."""
        for key in (*self._keys, *self._runtime):
            if key.id == key_id:
                if self.on_use is not None:
                    self.on_use(key.id)
                return Principal(key.id, key.scope)
        return None

    @classmethod
    def from_settings(cls, settings: ApiSettings) -> KeyRing:
        """The keys of ``FLEET_API_KEYS``, else the generated key file's (created if absent)."""
        if settings.api_keys:
            n = len(settings.api_keys)
            return cls(settings.api_keys, f"FLEET_API_KEYS ({n} key{'s' if n != 1 else ''})")
        path = settings.data_dir / KEY_FILE_NAME
        secret, created = load_or_create_key_file(path)
        spec = ApiKeySpec(
            id=GENERATED_KEY_ID, scope="admin", sha256=hashlib.sha256(secret.encode()).digest()
        )
        del secret
        return cls([spec], f"{path} ({'generated' if created else 'existing'})")


def load_or_create_key_file(path: Path) -> tuple[str, bool]:
    """The key stored in ``path`` and whether this call created it.

    Creation writes a temporary 0600 file and hard-links it into place, which
    fails if ``path`` appeared meanwhile: the file is never seen half-written
    and a concurrent starter reads the winner's key instead of overwriting it.
    """
    try:
        ensure_private_dir(path.parent)
        if not path.exists():
            if _create_exclusive(path, secrets.token_urlsafe(32)):
                log.info("generated an admin API key in %s", path)
                return _read_key(path), True
        return _read_key(path), False
    except OSError as exc:
        raise KeyFileError(f"API key file {path}: {exc.strerror or exc}") from None


def _create_exclusive(path: Path, secret: str) -> bool:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _read_key(path: Path) -> str:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("API key file %s had mode %o; tightening it to 600", path, mode)
        path.chmod(0o600)
    secret = path.read_text().strip()
    if not secret:
        raise KeyFileError(f"API key file {path} is empty; delete it to generate a new key")
    return secret


# Both ways of presenting a key, declared as security schemes so OpenAPI documents them.
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="ApiKey")
_bearer = HTTPBearer(auto_error=False, scheme_name="Bearer")


async def authorize(
    request: Request,
    api_key: Annotated[str | None, Security(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    """Authenticate the request and check its scope against the method.

    Safe methods (GET/HEAD/OPTIONS) need ``read``; anything that changes state
    needs ``admin``. Deciding by method (not per route) means a new route is
    protected by being mounted, not by remembering a decorator. A request without a key
    may carry a web UI session cookie instead (``ui.sessions``): then a mutating method
    must also carry the session's CSRF token.
    """
    presented = api_key if api_key else (bearer.credentials if bearer is not None else None)
    keyring: KeyRing = request.app.state.keyring
    if presented is None and request.cookies.get(COOKIE_NAME):
        return await _session_principal(request, keyring)
    principal = keyring.authenticate(presented) if presented else None
    if principal is None:
        raise ApiError(
            401,
            "AUTH_REQUIRED",
            "a valid API key is required (X-API-Key or Authorization: Bearer)"
            if presented is None
            else "the API key is not valid",
            headers={"WWW-Authenticate": 'Bearer realm="proxyfleet"'},
        )
    return _check_scope(request, principal)


def _check_scope(request: Request, principal: Principal) -> Principal:
    request.state.principal = principal  # known even when refused (the audit record)
    if request.method not in READ_METHODS and principal.scope != "admin":
        raise ApiError(
            403, "AUTH_FORBIDDEN", f"key {principal.key_id!r} has scope read; this needs admin"
        )
    return principal


async def _session_principal(request: Request, keyring: KeyRing) -> Principal:
    """The principal of the request's UI session (its key, looked up again now)."""
    services = getattr(request.app.state, "services", None)
    if services is None:
        raise ApiError(503, "BUS_UNAVAILABLE", "NATS is not connected; retry shortly")
    try:
        session = await services.sessions.find(request.cookies[COOKIE_NAME])
    except SessionsUnavailable:
        raise ApiError(
            503, "BUS_UNAVAILABLE", "sessions cannot be checked; retry shortly"
        ) from None
    principal = keyring.principal_of(session.key_id) if session is not None else None
    if session is None or principal is None:
        raise ApiError(
            401,
            "AUTH_REQUIRED",
            "the web UI session has ended; sign in again",
            headers={"WWW-Authenticate": 'Bearer realm="proxyfleet"'},
        )
    request.state.session_token = request.cookies[COOKIE_NAME]  # streams recheck it
    if request.method not in READ_METHODS and not session.csrf_ok(request.headers.get(CSRF_HEADER)):
        request.state.principal = principal
        raise ApiError(403, "CSRF_FAILED", f"a session's {CSRF_HEADER} header is missing or wrong")
    return _check_scope(request, principal)
