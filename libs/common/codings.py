"""HTTP content codings undone: gzip, deflate, br and zstd, in the order they were applied.

Recorded bodies are kept as they crossed the wire; whoever wants to read or search one
(``decode=true`` on the API, ``~b`` in a filter, HAR export) asks here. A coding that
cannot be undone (unknown, corrupt, or a body cut at the capture limit) yields ``None``
so the caller falls back to the recorded bytes; a zip bomb stops at ``limit`` bytes.
"""

from __future__ import annotations

import zlib

import brotli
import zstandard

DEFAULT_LIMIT = 64 << 20  # decoded bytes at most: a recorded 1 MiB body may claim gigabytes
IDENTITY = frozenset({"", "identity"})
KNOWN = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd"})


class _TooLarge(Exception):
    pass


def codings(content_encoding: str | None) -> list[str]:
    """The codings of a Content-Encoding value, lowercased, in the order applied."""
    if not content_encoding:
        return []
    return [c.strip().lower() for c in content_encoding.split(",") if c.strip().lower()]


def decodable(content_encoding: str | None) -> bool:
    """Whether every coding named is one this module undoes (and at least one is named)."""
    names = [c for c in codings(content_encoding) if c not in IDENTITY]
    return bool(names) and all(c in KNOWN for c in names)


def decode(data: bytes, content_encoding: str | None, limit: int = DEFAULT_LIMIT) -> bytes | None:
    """``data`` with the codings of ``content_encoding`` undone (last applied first).

    Returns ``data`` itself when there is nothing to undo, ``None`` when a coding is
    unknown or the data does not decode (also when it would exceed ``limit``).
    """
    names = codings(content_encoding)
    try:
        for name in reversed(names):
            if name in IDENTITY:
                continue
            data = _undo(name, data, limit)
    except (_TooLarge, KeyError, ValueError, zlib.error, brotli.error, zstandard.ZstdError):
        return None
    return data


def _undo(name: str, data: bytes, limit: int) -> bytes:
    if name in ("gzip", "x-gzip"):
        return _zlib(data, 16 + zlib.MAX_WBITS, limit)
    if name == "deflate":
        return _deflate(data, limit)
    if name == "br":
        return _brotli(data, limit)
    if name == "zstd":
        return _zstd(data, limit)
    raise KeyError(name)


def _deflate(data: bytes, limit: int) -> bytes:
    try:  # RFC 9110 says zlib-wrapped; many servers send raw deflate
        return _zlib(data, zlib.MAX_WBITS, limit)
    except zlib.error:
        return _zlib(data, -zlib.MAX_WBITS, limit)


def _zlib(data: bytes, wbits: int, limit: int) -> bytes:
    d = zlib.decompressobj(wbits)
    out = d.decompress(data, limit + 1)
    if len(out) > limit or d.unconsumed_tail:
        raise _TooLarge
    if not d.eof:
        raise zlib.error("incomplete stream")
    return out


def _brotli(data: bytes, limit: int) -> bytes:
    d = brotli.Decompressor()
    out = d.process(data, output_buffer_limit=limit + 1)
    if len(out) > limit or not d.is_finished():
        raise _TooLarge if len(out) > limit else brotli.error("incomplete stream")
    return out


def _zstd(data: bytes, limit: int) -> bytes:
    with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True) as reader:
        out = reader.read(limit + 1)
    if len(out) > limit:
        raise _TooLarge
    # the reader stops quietly at a cut; its output is bounded now, so check the end
    ending = zstandard.ZstdDecompressor().decompressobj()
    ending.decompress(data)
    if not ending.eof:
        raise zstandard.ZstdError("incomplete stream")
    return out


def as_filters_see_it(data: bytes, content_encoding: str, limit: int = DEFAULT_LIMIT) -> bytes:
    """The body mitmproxy's ``~b`` searches (its ``get_content(strict=False)``): one coding
    name only (several, or ``x-gzip``, leave the bytes as they are), gzip also taking a
    zlib stream, a cut stream giving what it decoded up to the cut, anything that fails
    giving the recorded bytes. Unlike mitmproxy, no other Python codec is tried (its
    ``bz2_codec`` and ``zlib_codec`` would decompress without a bound)."""
    name = content_encoding.lower()
    try:
        if name == "gzip":
            return _partial_zlib(data, 32 + zlib.MAX_WBITS, limit)
        if name == "deflate":
            return _deflate(data, limit)
        if name == "br":
            return _brotli(data, limit)
        if name == "zstd":
            with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True) as r:
                return bytes(r.read(limit))
    except (_TooLarge, ValueError, zlib.error, brotli.error, zstandard.ZstdError):
        return data
    return data


def _partial_zlib(data: bytes, wbits: int, limit: int) -> bytes:
    if not data:
        return b""
    return zlib.decompressobj(wbits).decompress(data, limit)
