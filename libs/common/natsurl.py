"""NATS server URLs with credentials: adding them, taking them apart, printing them safely.

Credentials travel in the URL (``nats://user:password@host:port``, or
``nats://token@host:port``), which every NATS client and tool understands, so that one
setting (``FLEET_NATS_URL``) or one test fixture carries everything a service needs.
The userinfo is percent-encoded as RFC 3986 says; nats-py does not decode it, so
``Bus.connect`` takes it out of the URL and hands it to the client decoded. Whatever
prints or logs a NATS URL prints ``redact(url)``: the password or token never appears.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit, urlunsplit

MASK = "***"


@dataclass(frozen=True)
class Target:
    """Where to connect (server URLs without userinfo) and with what."""

    servers: list[str]
    user: str | None = None
    password: str | None = field(default=None, repr=False)  # None with a user: user is a token

    def options(self) -> dict[str, str]:
        """The credentials as ``nats.connect`` keyword arguments (decoded)."""
        if self.user is None:
            return {}
        if self.password is None:
            return {"token": self.user}
        return {"user": self.user, "password": self.password}


def _servers(url: str) -> list[str]:
    return [s.strip() for s in url.split(",") if s.strip()]


def _split_netloc(netloc: str) -> tuple[str | None, str | None, str]:
    """``user:pass@host:port`` -> (user, password, host:port), still percent-encoded."""
    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        return None, None, netloc
    user, colon, password = userinfo.partition(":")
    return user, (password if colon else None), hostport


def parse(url: str) -> Target:
    """The servers of a comma-separated URL list and the first credentials found in it."""
    servers: list[str] = []
    user: str | None = None
    password: str | None = None
    for server in _servers(url):
        if "://" not in server:
            server = f"nats://{server}"
        parts = urlsplit(server)
        u, p, hostport = _split_netloc(parts.netloc)
        if u is not None and user is None:
            user = unquote(u)
            password = unquote(p) if p is not None else None
        servers.append(urlunsplit(parts._replace(netloc=hostport)))
    return Target(servers, user, password)


def has_credentials(url: str) -> bool:
    """True when any server in ``url`` carries a user, password or token."""
    return parse(url).user is not None


def with_credentials(url: str, user: str | None, password: str | None) -> str:
    """``url`` with ``user``/``password`` (``password`` alone: a token) on every server
    that has none of its own."""
    if not user and not password:
        return url
    if user and password:
        userinfo = f"{quote(user, safe='')}:{quote(password, safe='')}"
    else:
        userinfo = quote(password or user or "", safe="")
    out = []
    for server in _servers(url):
        scheme, sep, rest = server.partition("://")
        if not sep:
            scheme, rest = "nats", server
        if "@" in rest.split("/", 1)[0]:
            out.append(server)
        else:
            out.append(f"{scheme}://{userinfo}@{rest}")
    return ",".join(out)


def redact(url: str) -> str:
    """``url`` fit to print: each server's password (or token) replaced by ``***``."""
    out = []
    for server in _servers(url):
        scheme, sep, rest = server.partition("://")
        netloc, slash, tail = rest.partition("/")
        user, password, hostport = _split_netloc(netloc)
        if user is not None:
            # user:password -> user:***; a bare token -> ***
            netloc = f"{user}:{MASK}@{hostport}" if password is not None else f"{MASK}@{hostport}"
        out.append(f"{scheme}{sep}{netloc}{slash}{tail}")
    return ",".join(out)
