"""Recorded bodies, as a person reading JSON wants them and as the raw bytes.

The store hands bodies over as base64 (``request.body_b64`` / ``response.body_b64``);
``GET /api/flows/{id}`` shows text as text and everything else as base64, and
says which (``encoding``) so a client never has to guess.
"""

from __future__ import annotations

import base64
import binascii
import codecs
from typing import Any, Literal

Part = Literal["request", "response"]


def decode_text(raw: bytes, truncated: bool) -> str | None:
    """``raw`` as UTF-8 text, or None when it is not text.

    A body cut at the capture limit may end inside a multi-byte character; then
    the complete characters before the cut are returned (the body is marked
    truncated anyway, and ``/body`` still serves the exact bytes).
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if not truncated:
            return None
    try:  # not final: an incomplete character at the very end is held back, not an error
        text: str = codecs.getincrementaldecoder("utf-8")().decode(raw, final=False)
    except UnicodeDecodeError:
        return None
    return text


def inline_body(part: dict[str, Any]) -> dict[str, Any]:
    """A request/response part with ``body_b64`` replaced by ``body`` + ``encoding``.

    ``body`` is null while the flow is active (bodies travel with the final event).
    """
    out = {k: v for k, v in part.items() if k != "body_b64"}
    b64 = part.get("body_b64")
    if not isinstance(b64, str):
        out["body"] = None
        out["encoding"] = None
        return out
    raw = _b64decode(b64)
    text = decode_text(raw, bool(part.get("truncated")))
    if text is None:
        out["body"] = base64.b64encode(raw).decode("ascii")
        out["encoding"] = "base64"
    else:
        out["body"] = text
        out["encoding"] = "utf-8"
    return out


def render_flow(flow: dict[str, Any]) -> dict[str, Any]:
    """The flow document of ``GET /api/flows/{id}``: everything recorded, bodies inline."""
    out = dict(flow)
    for name in ("request", "response"):
        part = flow.get(name)
        if isinstance(part, dict):
            out[name] = inline_body(part)
    return out


def header(headers: Any, name: str) -> str | None:
    """The first value of header ``name`` in recorded ``[[name, value], ...]`` pairs."""
    if not isinstance(headers, list):
        return None
    lname = name.lower()
    for pair in headers:
        if isinstance(pair, list | tuple) and len(pair) == 2 and str(pair[0]).lower() == lname:
            return str(pair[1])
    return None


def raw_body(flow: dict[str, Any], which: Part) -> tuple[bytes, dict[str, Any]] | None:
    """The exact recorded bytes of one body and its part, or None if none was recorded."""
    part = flow.get(which)
    if not isinstance(part, dict) or not isinstance(part.get("body_b64"), str):
        return None
    return _b64decode(part["body_b64"]), part


def _b64decode(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:  # tolerate missing padding or line breaks from a foreign publisher
        return base64.b64decode(data + "=" * (-len(data) % 4), validate=False)
    except (binascii.Error, ValueError):
        return b""
