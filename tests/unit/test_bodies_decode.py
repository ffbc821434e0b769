"""``decode=true`` as pure functions: ``undo_coding`` and ``inline_body(decode=True)``."""

from __future__ import annotations

import base64
import gzip
from typing import Any

import brotli
import pytest

from libs.common.bodies import content_encoding, inline_body, undo_coding

TEXT = "décodé ".encode() * 50


def part(body: bytes, *coding: str, truncated: bool = False) -> dict[str, Any]:
    headers = [["Content-Type", "text/plain"], *(["Content-Encoding", c] for c in coding)]
    return {
        "headers": headers,
        "size": len(body),
        "truncated": truncated,
        "body_b64": base64.b64encode(body).decode(),
    }


def test_repeated_content_encoding_lines_are_one_list() -> None:
    headers = [["content-encoding", "gzip"], ["X", "y"], ["Content-Encoding", " br "]]
    assert content_encoding(headers) == "gzip, br"
    assert content_encoding([["X", "y"]]) is None and content_encoding(None) is None
    layered = brotli.compress(gzip.compress(TEXT))
    assert undo_coding(layered, part(layered, "gzip", "br")).data == TEXT


@pytest.mark.parametrize(
    ("body", "coding", "truncated", "decoded", "error"),
    [
        (gzip.compress(TEXT), ("gzip",), False, True, None),
        (TEXT, (), False, False, None),
        (TEXT, ("identity",), False, False, None),
        (b"", ("gzip",), False, False, None),  # HEAD / 304 with a coding: no bytes to undo
        (b"abc", ("compress",), False, False, "unsupported"),
        (b"abc", ("gzip",), False, False, "invalid"),
        (gzip.compress(TEXT)[:20], ("gzip",), True, False, "truncated"),
    ],
)
def test_undo_coding(
    body: bytes, coding: tuple[str, ...], truncated: bool, decoded: bool, error: str | None
) -> None:
    result = undo_coding(body, part(body, *coding, truncated=truncated))
    assert (result.decoded, result.error) == (decoded, error)
    assert result.data == (TEXT if decoded else body)


def test_inline_body_decoded_keeps_the_original_visible() -> None:
    wire = gzip.compress(TEXT)
    out = inline_body(part(wire, "gzip"), decode=True)
    assert out["body"] == TEXT.decode() and out["encoding"] == "utf-8"
    assert out["decoded"] is True and out["decoded_size"] == len(TEXT)
    assert out["content_encoding"] == "gzip" and out["size"] == len(wire)
    assert out["headers"][1] == ["Content-Encoding", "gzip"]
    plain = inline_body(part(wire, "gzip"))
    assert plain["encoding"] == "base64" and base64.b64decode(plain["body"]) == wire
    assert "decoded" not in plain


def test_inline_body_that_does_not_decode_is_as_recorded() -> None:
    wire = gzip.compress(TEXT)[:30]
    out = inline_body(part(wire, "gzip", truncated=True), decode=True)
    assert out["decoded"] is False and out["decode_error"] == "truncated"
    assert out["encoding"] == "base64" and base64.b64decode(out["body"]) == wire
    unknown = inline_body({"headers": [], "size": 0, "truncated": False}, decode=True)
    assert unknown["body"] is None and unknown["decoded"] is False  # active: not known
    assert unknown["content_encoding"] is None
