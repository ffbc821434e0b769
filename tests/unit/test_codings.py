"""``libs.common.codings.decode``: every coding the proxy records, layered codings, and
the ways a recorded body fails to decode (corrupt, cut at the capture limit, a bomb)."""

from __future__ import annotations

import gzip
import os
import zlib

import brotli
import pytest
import zstandard

from libs.common import codings

TEXT = b"hello proxyfleet " * 200
BINARY = os.urandom(5000)


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


ENCODERS = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
}


@pytest.mark.parametrize("name", sorted(ENCODERS))
@pytest.mark.parametrize("payload", [TEXT, BINARY, b""], ids=["text", "binary", "empty"])
def test_each_coding_round_trips(name: str, payload: bytes) -> None:
    encoded = ENCODERS[name](payload)
    assert codings.decode(encoded, name) == payload
    assert codings.decode(encoded, name.upper()) == payload  # names are case-insensitive


def test_identity_and_no_coding_return_the_bytes() -> None:
    for value in (None, "", "identity", " identity "):
        assert codings.decode(TEXT, value) == TEXT
    assert not codings.decodable(None) and not codings.decodable("identity")


def test_layered_codings_are_undone_last_applied_first() -> None:
    # "gzip, br": gzip applied first, then br
    layered = brotli.compress(gzip.compress(TEXT))
    assert codings.decode(layered, "gzip, br") == TEXT
    assert codings.decode(layered, "gzip,br") == TEXT
    # the other order is a different body: undoing it the wrong way fails, never guesses
    assert codings.decode(layered, "br, gzip") is None
    assert codings.codings("gzip, identity, br") == ["gzip", "identity", "br"]
    assert codings.decode(brotli.compress(gzip.compress(TEXT)), "gzip, identity, br") == TEXT
    assert codings.decodable("gzip, br") and not codings.decodable("gzip, compress")


def test_deflate_zlib_wrapped_and_raw() -> None:
    assert codings.decode(zlib.compress(TEXT), "deflate") == TEXT  # RFC 9110
    assert codings.decode(raw_deflate(TEXT), "deflate") == TEXT  # what many servers send
    assert codings.decode(raw_deflate(BINARY), "deflate") == BINARY


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_corrupt_body_is_none(name: str) -> None:
    encoded = bytearray(ENCODERS[name](TEXT))
    garbage = b"\x00\xffnot compressed at all\xfe" * 4
    assert codings.decode(garbage, name) is None
    # bytes flipped mid-stream: gzip's CRC catches it; zstd (no checksum by default) and
    # br may decode it to other bytes; what matters is an answer, never an exception
    encoded[len(encoded) // 2 : len(encoded) // 2 + 8] = b"\xde\xad\xbe\xef" * 2
    flipped = codings.decode(bytes(encoded), name)
    assert flipped is None or isinstance(flipped, bytes)
    if name in ("gzip", "x-gzip"):
        assert flipped is None


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_body_cut_at_the_capture_limit_is_none(name: str) -> None:
    encoded = ENCODERS[name](BINARY)
    for cut in (1, len(encoded) // 2, len(encoded) - 1):
        assert codings.decode(encoded[:cut], name) is None, cut


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_bomb_stops_at_the_limit(name: str) -> None:
    bomb = ENCODERS[name](b"\x00" * (4 << 20))  # 4 MiB of zeros: a few KiB encoded
    assert len(bomb) < 64 << 10
    assert codings.decode(bomb, name, limit=1 << 20) is None
    assert codings.decode(bomb, name, limit=4 << 20) == b"\x00" * (4 << 20)  # exactly fits


def test_unknown_coding_is_none() -> None:
    assert codings.decode(TEXT, "compress") is None
    assert codings.decode(gzip.compress(TEXT), "gzip, snappy") is None
    assert not codings.decodable("snappy")
