"""Recorded bodies, as a person reading JSON wants them and as the raw bytes.

The store hands bodies over as base64 (``request.body_b64`` / ``response.body_b64``);
``GET /api/flows/{id}`` shows text as text and everything else as base64, and
says which (``encoding``) so a client never has to guess. Bodies are kept as they
crossed the wire; ``decode=true`` undoes their Content-Encoding (``undo_coding``),
and a body that cannot be undone is shown as recorded with the reason, never an error.
"""

from __future__ import annotations

import base64
import binascii
import codecs
from dataclasses import dataclass
from typing import Any, Literal

from libs.common import codings

Part = Literal["request", "response"]

# Why a body asked to be decoded is shown as recorded (``decode_error``).
TRUNCATED = "truncated"  # cut at the capture limit: the coded stream is incomplete
UNSUPPORTED = "unsupported"  # a coding this API does not undo (only gzip, deflate, br, zstd)
INVALID = "invalid"  # corrupt, or decodes to more than codings.DEFAULT_LIMIT bytes


@dataclass(frozen=True, slots=True)
class Uncoded:
    """A body after ``undo_coding``: the bytes to show and what happened to them.

    ``decoded``: a Content-Encoding was undone (``data`` is the decoded body);
    ``error``: one was named and could not be undone (``data`` is as recorded).
    """

    data: bytes
    content_encoding: str | None
    decoded: bool
    error: str | None


def undo_coding(raw: bytes, part: dict[str, Any]) -> Uncoded:
    """``raw`` with the Content-Encoding of ``part`` undone, or as recorded and why not."""
    coding = content_encoding(part.get("headers"))
    if not raw or not [c for c in codings.codings(coding) if c not in codings.IDENTITY]:
        return Uncoded(raw, coding, False, None)  # nothing to undo (HEAD, 204, 304: no bytes)
    if not codings.decodable(coding):
        return Uncoded(raw, coding, False, UNSUPPORTED)
    data = codings.decode(raw, coding)
    if data is None:
        return Uncoded(raw, coding, False, TRUNCATED if part.get("truncated") else INVALID)
    return Uncoded(data, coding, True, None)


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


def inline_body(part: dict[str, Any], decode: bool = False) -> dict[str, Any]:
    """A request/response part with ``body_b64`` replaced by ``body`` + ``encoding``.

    ``body`` is null while the flow is active (bodies travel with the final event).
    ``decode``: the Content-Encoding is undone and the part also says
    ``content_encoding`` (the recorded value), ``decoded`` (whether ``body`` is the
    decoded body), ``decoded_size`` when it is, and ``decode_error`` when a coding was
    named but could not be undone (``body`` is then as recorded).
    """
    out = {k: v for k, v in part.items() if k != "body_b64"}
    b64 = part.get("body_b64")
    if decode:
        out["content_encoding"] = content_encoding(part.get("headers"))
        out["decoded"] = False
    if not isinstance(b64, str):
        out["body"] = None
        out["encoding"] = None
        return out
    raw = _b64decode(b64)
    truncated = bool(part.get("truncated"))
    if decode:
        uncoded = undo_coding(raw, part)
        if uncoded.decoded:
            raw, truncated = uncoded.data, False  # a stream that decodes is complete
            out["decoded"] = True
            out["decoded_size"] = len(raw)
        elif uncoded.error is not None:
            out["decode_error"] = uncoded.error
    text = decode_text(raw, truncated)
    if text is None:
        out["body"] = base64.b64encode(raw).decode("ascii")
        out["encoding"] = "base64"
    else:
        out["body"] = text
        out["encoding"] = "utf-8"
    return out


def render_flow(flow: dict[str, Any], decode: bool = False) -> dict[str, Any]:
    """The flow document of ``GET /api/flows/{id}``: everything recorded, bodies inline
    (``decode``: content codings undone, see ``inline_body``)."""
    out = dict(flow)
    for name in ("request", "response"):
        part = flow.get(name)
        if isinstance(part, dict):
            out[name] = inline_body(part, decode)
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


def content_encoding(headers: Any) -> str | None:
    """The Content-Encoding of recorded headers: repeated header lines joined in order
    (``gzip`` then ``br`` on two lines is ``gzip, br``), None when there is none."""
    if not isinstance(headers, list):
        return None
    values = [
        str(pair[1]).strip()
        for pair in headers
        if isinstance(pair, list | tuple)
        and len(pair) == 2
        and str(pair[0]).lower() == "content-encoding"
    ]
    return ", ".join(v for v in values if v) or None


def raw_body(flow: dict[str, Any], which: Part) -> tuple[bytes, dict[str, Any]] | None:
    """The exact recorded bytes of one body and its part, or None if none was recorded."""
    part = flow.get(which)
    if not isinstance(part, dict) or not isinstance(part.get("body_b64"), str):
        return None
    return _b64decode(part["body_b64"]), part


def b64decode(data: str) -> bytes:
    """A recorded ``body_b64`` to bytes, tolerant of a foreign publisher's base64."""
    return _b64decode(data)


def _b64decode(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:  # tolerate missing padding or line breaks from a foreign publisher
        return base64.b64decode(data + "=" * (-len(data) % 4), validate=False)
    except (binascii.Error, ValueError):
        return b""
