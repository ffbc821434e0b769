"""Web UI sessions: a browser signs in with an API key once and then holds a session
cookie instead of the key.

The cookie carries a random token (HttpOnly, SameSite=Strict, Secure over https); KV
``fleet_ui_sessions`` keeps, under the token's SHA-256, the key id, a CSRF token and the
expiry, so any API replica honours a session another one opened, and signing out ends it
everywhere. A session is only as good as its key: each request looks the key up again,
so a revoked key's sessions die with it and a key's scope is always the current one.
Mutating requests made with the cookie must echo the session's CSRF token in
``X-CSRF-Token`` (the page shell hands it to its scripts): a cross-site form or script can
make the browser send the cookie (SameSite aside) but cannot read the token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from libs.common.bus import Bus

log = logging.getLogger("proxyfleet.api.ui")

COOKIE_NAME = "fleet_session"
CSRF_HEADER = "X-CSRF-Token"
PREFIX = "s."


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in browser: which key signed in, its CSRF token, when it ends."""

    key_id: str
    csrf: str
    created: float
    expires: float

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(
            presented.encode("utf-8", "surrogateescape"), self.csrf.encode()
        )


def _name(token: str) -> str:
    return PREFIX + hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def _parse(raw: bytes | None) -> Session | None:
    """A stored session, or None for anything else (the bucket is not trusted blindly)."""
    try:
        data: Any = orjson.loads(raw or b"")
        return Session(
            str(data["key_id"]), str(data["csrf"]), float(data["created"]), float(data["expires"])
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


class SessionsUnavailable(Exception):
    """KV cannot be read now (NATS away): not the same as "not signed in"."""


class Sessions:
    """Open, find and end UI sessions in KV (shared by every API replica)."""

    def __init__(self, bus: Bus, ttl: float) -> None:
        self.bus = bus
        self.ttl = ttl
        self._kv: KeyValue | None = None

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.bus.ui_sessions_kv()
        return self._kv

    async def open(self, key_id: str) -> tuple[str, Session]:
        """A new session for ``key_id``: its token (for the cookie, never stored) and it."""
        token = secrets.token_urlsafe(32)
        now = time.time()
        session = Session(key_id, secrets.token_urlsafe(24), now, now + self.ttl)
        value = orjson.dumps(
            {
                "key_id": session.key_id,
                "csrf": session.csrf,
                "created": session.created,
                "expires": session.expires,
            }
        )
        await (await self.kv()).put(_name(token), value)
        return token, session

    async def find(self, token: str) -> Session | None:
        """The live session of ``token``, or None (unknown, ended or expired). Raises
        ``SessionsUnavailable`` when KV cannot answer: a NATS blip must not sign anyone
        out."""
        if not token or len(token) > 128:
            return None
        try:
            entry = await (await self.kv()).get(_name(token))
        except KeyNotFoundError:  # also a deleted or purged entry
            return None
        except Exception as exc:
            raise SessionsUnavailable(f"sessions cannot be read: {exc!r}") from None
        session = _parse(entry.value)
        if session is None or session.expires <= time.time():
            return None
        return session

    async def end(self, token: str) -> None:
        """Sign out: the session is gone on every replica."""
        try:
            await (await self.kv()).purge(_name(token))
        except Exception as exc:
            log.warning("ending a UI session failed: %r", exc)
