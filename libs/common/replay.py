"""Replaying a recorded request: what the API sends a replica (``fleet.cmd.<replica>.replay``).

The API builds the request from the stored flow and the caller's edits; the replica
sends it through its own relay as a new client would (destination policy, rules and
capture all apply; intercept rules do not hold a replay, as in mitmproxy), records
it as a new flow with ``replay_of``, and answers ``data["flow_id"]`` as soon as that
flow exists.
"""

from __future__ import annotations

import base64
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from libs.common.policy import PROTECTED_HEADERS, header_syntax, header_value

REPLAY_VERB = "replay"
MAX_BODY = 16 << 20  # bytes of a replayed body (a NATS message carries it, base64)
# Headers a replay does not copy: those the proxy owns (it frames the request itself, the
# target comes from the URL, it is one request on its own connection), and Expect.
_NOT_COPIED = PROTECTED_HEADERS | {"expect"}
REDACTED = "<redacted>"  # what capture wrote for a masked value (never sent on)


def check_url(url: str) -> str:
    """``url`` if it is an absolute http(s) URL with a host, else ``ValueError``."""
    if any(c in url for c in " \t\r\n\x00") or not url.isascii():
        raise ValueError("the url must be ASCII without spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("the url must be an absolute http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("the url must not carry credentials")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValueError(f"invalid port: {exc}") from None
    return url


Token = Annotated[str, Field(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}$")]


class ReplayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replay_of: str = Field(max_length=64)
    method: Token
    url: str = Field(max_length=8192)
    headers: list[tuple[str, str]] = Field(default_factory=list, max_length=500)
    body_b64: str = Field("", max_length=(MAX_BODY * 4) // 3 + 4)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_url(v)

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(header_syntax(n), header_value(x)) for n, x in v]

    def body(self) -> bytes:
        return base64.b64decode(self.body_b64, validate=True)

    def wire(self) -> bytes:
        """The request as an absolute-form HTTP/1.1 message closing its connection."""
        body = self.body()
        lines = [f"{self.method} {self.url} HTTP/1.1\r\n".encode("latin-1")]
        for name, value in self.headers:
            if name.lower() in _NOT_COPIED or value == REDACTED:
                continue
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        if body or self.method not in ("GET", "HEAD", "DELETE", "OPTIONS", "TRACE"):
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"Connection: close\r\n\r\n")
        return b"".join(lines) + body
