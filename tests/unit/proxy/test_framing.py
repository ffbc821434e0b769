"""The framing module (``services/proxy/framing.py``) on its own: no sockets.

Request heads are parsed strictly (anything a second parser could read differently is
refused with the status owed), heads sent on are rebuilt from what was parsed (never
the client's framing or hop-by-hop headers), and chunked bodies are decoded exactly to
their end. Example cases first, then hypothesis properties.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from services.proxy.framing import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    FRAMING,
    HOP_BY_HOP,
    ChunkedDecoder,
    FramingError,
    RequestHead,
    ResponseFraming,
    conn_tokens,
    error_response,
    final_coding_is_chunked,
    parse_request_head,
    request_head,
    response_framing,
    response_head,
    via_has,
)

VIA = b"1.1 proxyfleet-test"


def parse(head: bytes) -> RequestHead:
    return parse_request_head(head)


def refused(head: bytes) -> int:
    """The status ``parse_request_head`` refuses ``head`` with (fails if it accepts it)."""
    with pytest.raises(FramingError) as info:
        parse_request_head(head)
    return info.value.status


def head_of(line: bytes, *headers: bytes) -> bytes:
    return line + b"\r\n" + b"".join(h + b"\r\n" for h in headers)


def forward(req: RequestHead, host: bytes | None = None, via: bytes = VIA) -> bytes:
    """The head ``request_head`` builds for ``req`` (origin-form target kept)."""
    return request_head(
        req.method,
        req.target,
        req.headers,
        host,
        req.body,
        req.content_length,
        req.conn_drop,
        req.upgrade,
        via,
    )


def reparse(wire: bytes) -> RequestHead:
    """Parse a head as ``request_head`` built it (ended by the blank line)."""
    assert wire.endswith(b"\r\n\r\n")
    return parse_request_head(wire[:-2])


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n.lower() for n, _ in headers]


# -- accepted heads --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method", [b"GET", b"BREW", b"X-CUSTOM", b"M-SEARCH", b"PROPFIND", b"get", b"A!#$%&'*+.^_`|~"]
)
def test_any_token_method_is_accepted(method: bytes) -> None:
    req = parse(head_of(method + b" /pot HTTP/1.1", b"Host: a.example"))
    assert req.method == method
    assert req.target == b"/pot"
    assert req.host == b"a.example"
    assert req.body == BODY_NONE


@pytest.mark.parametrize(("version", "keep"), [(b"1.1", True), (b"1.0", False)])
def test_http_10_and_11(version: bytes, keep: bool) -> None:
    req = parse(head_of(b"GET http://a.example/ HTTP/" + version))
    assert req.version == version.decode()
    assert req.keep_alive is keep
    assert req.headers == []


def test_http_10_keep_alive_and_11_close() -> None:
    assert parse(head_of(b"GET / HTTP/1.0", b"Connection: keep-alive")).keep_alive
    assert not parse(head_of(b"GET / HTTP/1.1", b"Connection: close")).keep_alive
    assert not parse(head_of(b"GET / HTTP/1.1", b"Connection: Keep-Alive, CLOSE")).keep_alive


def test_values_lose_leading_and_trailing_ows_only() -> None:
    req = parse(head_of(b"GET / HTTP/1.1", b"A:   one two \t", b"B:\tx", b"C:", b"D: \t "))
    assert req.headers == [(b"A", b"one two"), (b"B", b"x"), (b"C", b""), (b"D", b"")]


def test_repeated_headers_are_kept_in_order_with_their_case() -> None:
    req = parse(
        head_of(
            b"GET / HTTP/1.1",
            b"Host: h",
            b"X-A: 1",
            b"Set-Thing: a",
            b"x-a: 2",
            b"X-A: 3",
            b"Cookie: c=1",
            b"cookie: d=2",
        )
    )
    assert req.headers == [
        (b"Host", b"h"),
        (b"X-A", b"1"),
        (b"Set-Thing", b"a"),
        (b"x-a", b"2"),
        (b"X-A", b"3"),
        (b"Cookie", b"c=1"),
        (b"cookie", b"d=2"),
    ]


def test_body_framing_is_parsed() -> None:
    req = parse(head_of(b"POST / HTTP/1.1", b"Content-Length: 42"))
    assert (req.body, req.content_length) == (BODY_LENGTH, 42)
    req = parse(head_of(b"POST / HTTP/1.1", b"Transfer-Encoding: Chunked"))
    assert req.body == BODY_CHUNKED
    # identical repeats (in one value or several lines) are one length (RFC 9110 8.6)
    req = parse(head_of(b"POST / HTTP/1.1", b"Content-Length: 7, 7", b"content-length: 7"))
    assert (req.body, req.content_length) == (BODY_LENGTH, 7)
    req = parse(head_of(b"POST / HTTP/1.1", b"Content-Length: 0"))
    assert (req.body, req.content_length) == (BODY_LENGTH, 0)


def test_upgrade_needs_connection_upgrade() -> None:
    req = parse(head_of(b"GET / HTTP/1.1", b"Connection: Upgrade", b"Upgrade: websocket"))
    assert req.upgrade == b"websocket"
    assert parse(head_of(b"GET / HTTP/1.1", b"Upgrade: websocket")).upgrade is None


def test_high_bytes_are_allowed_in_targets_and_values() -> None:
    req = parse(head_of(b"GET /caf\xc3\xa9 HTTP/1.1", b"X: \xff\x80 ok"))
    assert req.target == b"/caf\xc3\xa9"
    assert req.headers == [(b"X", b"\xff\x80 ok")]


# -- refused heads ---------------------------------------------------------------------------
BAD_400 = {
    "obs-fold": head_of(b"GET / HTTP/1.1", b"X: a", b" folded"),
    "obs-fold-tab": head_of(b"GET / HTTP/1.1", b"X: a", b"\tfolded"),
    "ws-before-first-header": head_of(b"GET / HTTP/1.1", b" Host: a"),
    "bare-lf-in-headers": b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n",
    "bare-lf-request-line": b"GET / HTTP/1.1\nHost: a\r\n",
    "bare-cr-in-headers": b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n",
    "bare-cr-request-line": b"GET / HTTP/1.1\rX: b\r\n",
    "space-before-colon": head_of(b"GET / HTTP/1.1", b"Host : a"),
    "tab-before-colon": head_of(b"GET / HTTP/1.1", b"Content-Length\t: 5"),
    "nul-in-value": head_of(b"GET / HTTP/1.1", b"X: a\x00b"),
    "del-in-value": head_of(b"GET / HTTP/1.1", b"X: a\x7fb"),
    "ctl-in-value": head_of(b"GET / HTTP/1.1", b"X: a\x01b"),
    "empty-name": head_of(b"GET / HTTP/1.1", b": a"),
    "no-colon": head_of(b"GET / HTTP/1.1", b"Host a"),
    "bad-name-char": head_of(b"GET / HTTP/1.1", b"X(y): a"),
    "cl-and-te": head_of(b"POST / HTTP/1.1", b"Content-Length: 5", b"Transfer-Encoding: chunked"),
    "te-and-cl": head_of(b"POST / HTTP/1.1", b"Transfer-Encoding: chunked", b"Content-Length: 0"),
    "conflicting-cl": head_of(b"POST / HTTP/1.1", b"Content-Length: 5", b"Content-Length: 6"),
    "conflicting-cl-list": head_of(b"POST / HTTP/1.1", b"Content-Length: 5, 6"),
    "cl-plus": head_of(b"POST / HTTP/1.1", b"Content-Length: +5"),
    "cl-minus": head_of(b"POST / HTTP/1.1", b"Content-Length: -5"),
    "cl-inner-space": head_of(b"POST / HTTP/1.1", b"Content-Length: 1 2"),
    "cl-hex": head_of(b"POST / HTTP/1.1", b"Content-Length: 0x10"),
    "cl-hex-digits": head_of(b"POST / HTTP/1.1", b"Content-Length: 1a"),
    "cl-empty": head_of(b"POST / HTTP/1.1", b"Content-Length:"),
    "cl-empty-element": head_of(b"POST / HTTP/1.1", b"Content-Length: 5,"),
    "cl-decimal": head_of(b"POST / HTTP/1.1", b"Content-Length: 5.0"),
    "cl-huge": head_of(b"POST / HTTP/1.1", b"Content-Length: 1" + b"0" * 20),
    "te-xchunked": head_of(b"POST / HTTP/1.1", b"Transfer-Encoding: xchunked"),
    "te-chunkedchunked": head_of(b"POST / HTTP/1.1", b"Transfer-Encoding: chunkedchunked"),
    "te-chunked-gzip": head_of(b"POST / HTTP/1.1", b"Transfer-Encoding: chunked, gzip"),
    "te-gzip": head_of(b"POST / HTTP/1.1", b"Transfer-Encoding: gzip"),
    "te-lines-chunked-gzip": head_of(
        b"POST / HTTP/1.1", b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip"
    ),
    "te-http10": head_of(b"POST / HTTP/1.0", b"Transfer-Encoding: chunked"),
    "duplicate-host": head_of(b"GET / HTTP/1.1", b"Host: a", b"Host: b"),
    "duplicate-host-same": head_of(b"GET / HTTP/1.1", b"Host: a", b"host: a"),
    "two-spaces-request-line": head_of(b"GET  / HTTP/1.1"),
    "two-spaces-before-version": head_of(b"GET /  HTTP/1.1"),
    "trailing-space-request-line": head_of(b"GET / HTTP/1.1 "),
    "leading-space-request-line": head_of(b" GET / HTTP/1.1"),
    "tab-in-request-line": head_of(b"GET\t/ HTTP/1.1"),
    "method-with-slash": head_of(b"GE/T / HTTP/1.1"),
    "method-with-paren": head_of(b"G(T / HTTP/1.1"),
    "method-with-colon": head_of(b"GET: / HTTP/1.1"),
    "method-with-nul": head_of(b"G\x00T / HTTP/1.1"),
    "method-high-byte": head_of(b"G\xc3\xa9T / HTTP/1.1"),
    "empty-method": head_of(b" / HTTP/1.1"),
    "no-version": head_of(b"GET /"),
    "lowercase-http": head_of(b"GET / http/1.1"),
    "version-two-digits": head_of(b"GET / HTTP/1.10"),
    "space-in-target": head_of(b"GET /a b HTTP/1.1"),
    "nul-in-target": head_of(b"GET /a\x00 HTTP/1.1"),
    "no-crlf-at-all": b"GET / HTTP/1.1",
    "header-without-crlf": b"GET / HTTP/1.1\r\nHost: a",
    "blank-line-inside": b"GET / HTTP/1.1\r\nHost: a\r\n\r\nX: b\r\n",
}


@pytest.mark.parametrize("head", BAD_400.values(), ids=BAD_400.keys())
def test_ambiguous_or_malformed_heads_are_400(head: bytes) -> None:
    assert refused(head) == 400


@pytest.mark.parametrize(
    "te", [b"gzip, chunked", b"deflate,chunked", b"identity, chunked", b"GZIP ,\tCHUNKED"]
)
def test_other_codings_before_chunked_are_501(te: bytes) -> None:
    assert refused(head_of(b"POST / HTTP/1.1", b"Transfer-Encoding: " + te)) == 501


def test_te_lines_gzip_then_chunked_are_501() -> None:
    head = head_of(b"POST / HTTP/1.1", b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked")
    assert refused(head) == 501


@pytest.mark.parametrize("version", [b"2.0", b"9.9", b"0.9", b"1.2", b"3.0"])
def test_unsupported_versions_are_505(version: bytes) -> None:
    assert refused(head_of(b"GET / HTTP/" + version, b"Host: a")) == 505


def test_te_in_http10_is_refused_even_with_a_valid_coding() -> None:
    head = head_of(b"POST http://a/ HTTP/1.0", b"Transfer-Encoding: chunked")
    with pytest.raises(FramingError, match=r"HTTP/1\.0"):
        parse(head)


# -- Connection tokens -----------------------------------------------------------------------
def test_conn_tokens() -> None:
    assert conn_tokens(b"Keep-Alive, X-Foo ,\tclose") == {b"keep-alive", b"x-foo", b"close"}
    assert conn_tokens(b"") == {b""}


@pytest.mark.parametrize(
    "value",
    [
        b"content-length",
        b"Content-Length, X-Drop",
        b"transfer-encoding, host, x-drop",
        b"HOST,TRANSFER-ENCODING,CONTENT-LENGTH,x-drop",
        b"close, content-length",
    ],
)
def test_framing_headers_are_never_in_conn_drop(value: bytes) -> None:
    req = parse(
        head_of(b"POST / HTTP/1.1", b"Host: a", b"Connection: " + value, b"Content-Length: 3")
    )
    assert not req.conn_drop & FRAMING
    assert req.conn_drop <= {b"x-drop"}
    assert (req.body, req.content_length) == (BODY_LENGTH, 3)
    wire = forward(req)
    assert b"\r\nHost: a\r\n" in wire
    assert wire.endswith(b"Content-Length: 3\r\n\r\n")
    assert {b"host", b"content-length"} <= set(names(reparse(wire).headers))
    # the response side: a Connection-listed framing header keeps the body framed
    resp = response_framing(200, [(b"Connection", value), (b"Content-Length", b"3")], False)
    assert not resp.conn_drop & FRAMING
    assert resp.body == BODY_LENGTH


def test_proxy_connection_counts_as_connection() -> None:
    req = parse(head_of(b"GET / HTTP/1.1", b"Proxy-Connection: close, X-Drop"))
    assert not req.keep_alive
    assert req.conn_drop == {b"x-drop"}


# -- request_head() --------------------------------------------------------------------------
def test_request_head_drops_client_framing_hop_by_hop_and_connection_named() -> None:
    req = parse(
        head_of(
            b"POST /p?q=1 HTTP/1.1",
            b"Host: a.example",
            b"Connection: keep-alive, X-Secret, x-other",
            b"Keep-Alive: timeout=5",
            b"Proxy-Connection: keep-alive",
            b"Proxy-Authorization: Basic Zm9vOmJhcg==",
            b"TE: trailers",
            b"Trailer: X-T",
            b"Upgrade: h2c",
            b"X-Secret: 1",
            b"X-Other: 2",
            b"Content-Length: 5",
            b"Accept: */*",
        )
    )
    wire = forward(req)
    out = reparse(wire)
    assert wire.startswith(b"POST /p?q=1 HTTP/1.1\r\n")
    assert out.headers == [
        (b"Host", b"a.example"),
        (b"Accept", b"*/*"),
        (b"Via", VIA),
        (b"Content-Length", b"5"),
    ]


def test_request_head_reframes_chunked_and_never_forwards_the_clients_te() -> None:
    req = parse(head_of(b"POST / HTTP/1.1", b"Host: a", b"Transfer-Encoding: chunked"))
    wire = forward(req)
    assert wire.endswith(b"Via: " + VIA + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert wire.lower().count(b"transfer-encoding") == 1
    assert b"content-length" not in wire.lower()


def test_request_head_without_body_has_no_framing_headers() -> None:
    req = parse(head_of(b"GET / HTTP/1.1", b"Host: a"))
    wire = forward(req)
    assert wire == b"GET / HTTP/1.1\r\nHost: a\r\nVia: " + VIA + b"\r\n\r\n"


def test_request_head_with_a_zero_length_body_says_so() -> None:
    req = parse(head_of(b"POST / HTTP/1.1", b"Host: a", b"Content-Length: 0"))
    assert forward(req).endswith(b"Content-Length: 0\r\n\r\n")


def test_request_head_always_speaks_http11() -> None:
    req = parse(head_of(b"GET / HTTP/1.0", b"Content-Length: 2"))
    wire = forward(req, host=b"a.example:8080")
    assert wire.startswith(b"GET / HTTP/1.1\r\nHost: a.example:8080\r\n")
    assert wire.endswith(b"Content-Length: 2\r\n\r\n")


def test_request_head_replaces_host_when_given() -> None:
    req = parse(head_of(b"GET http://b.example/ HTTP/1.1", b"Host: evil.example", b"X: 1"))
    wire = forward(req, host=b"b.example")
    out = reparse(wire)
    assert out.host == b"b.example"
    assert out.headers[0] == (b"Host", b"b.example")
    assert b"evil" not in wire


def test_request_head_appends_via_to_the_clients() -> None:
    req = parse(head_of(b"GET / HTTP/1.1", b"Host: a", b"Via: 1.0 fred, 1.1 p.example"))
    out = reparse(forward(req))
    assert [v for n, v in out.headers if n.lower() == b"via"] == [
        b"1.0 fred, 1.1 p.example, " + VIA
    ]


def test_request_head_keeps_the_order_of_several_via_lines() -> None:
    """RFC 9110 7.6.3: Via lists the hops in the order they forwarded the message; two
    ``Via`` lines are one list, the first line's hops first."""
    req = parse(head_of(b"GET / HTTP/1.1", b"Host: a", b"Via: 1.0 first", b"Via: 1.1 second"))
    out = reparse(forward(req))
    assert [v for n, v in out.headers if n.lower() == b"via"] == [b"1.0 first, 1.1 second, " + VIA]


def test_request_head_upgrade() -> None:
    req = parse(
        head_of(b"GET /ws HTTP/1.1", b"Host: a", b"Connection: Upgrade", b"Upgrade: websocket")
    )
    out = reparse(forward(req))
    assert out.upgrade == b"websocket"
    assert names(out.headers).count(b"upgrade") == 1
    assert names(out.headers).count(b"connection") == 1


# -- response_framing() / response_head() ----------------------------------------------------
@pytest.mark.parametrize(
    ("te", "body"),
    [
        (b"chunked", BODY_CHUNKED),
        (b"gzip, chunked", BODY_CHUNKED),
        (b"CHUNKED", BODY_CHUNKED),
        (b"xchunked", BODY_UNTIL_CLOSE),
        (b"chunkedchunked", BODY_UNTIL_CLOSE),
        (b"chunked, gzip", BODY_UNTIL_CLOSE),
        (b"gzip", BODY_UNTIL_CLOSE),
    ],
)
def test_response_te_final_coding(te: bytes, body: int) -> None:
    assert response_framing(200, [(b"Transfer-Encoding", te)], False).body == body


@pytest.mark.parametrize("status", [204, 304, 100, 103])
def test_responses_without_a_body(status: int) -> None:
    headers = [(b"Content-Length", b"10")]
    assert response_framing(status, headers, False).body == BODY_NONE
    assert response_framing(status, [(b"Transfer-Encoding", b"chunked")], False).body == BODY_NONE


def test_head_responses_have_no_body_whatever_they_say() -> None:
    for headers in ([(b"Content-Length", b"10")], [(b"Transfer-Encoding", b"chunked")], []):
        assert response_framing(200, headers, True).body == BODY_NONE


def test_response_length_and_until_close() -> None:
    assert response_framing(200, [(b"content-length", b"3")], False).body == BODY_LENGTH
    assert response_framing(200, [], False).body == BODY_UNTIL_CLOSE


def test_response_upgrade_and_conn_drop() -> None:
    f = response_framing(
        101, [(b"Connection", b"Upgrade, X-Hop"), (b"Upgrade", b"websocket")], False
    )
    assert f.upgrade == b"websocket"
    assert f.conn_drop == {b"x-hop"}


def test_response_head_drops_hop_by_hop_and_adds_via() -> None:
    headers = [
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"X-Hop"),
        (b"X-Hop", b"1"),
        (b"Keep-Alive", b"timeout=1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Via", b"1.1 origin-cache"),
        (b"Content-Length", b"3"),
    ]
    f = response_framing(200, headers, False)
    wire = response_head(200, b"OK", headers, f, VIA, b"\r\n")
    # chunked wins over Content-Length (RFC 9112 6.3): the length is not sent on
    assert wire == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
        b"Via: 1.1 origin-cache, " + VIA + b"\r\n\r\n"
    )
    none = ResponseFraming()
    assert response_head(404, b"", [], none, VIA, b"\r\n").startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert response_head(599, b"", [], none, VIA, b"\r\n").startswith(b"HTTP/1.1 599 \r\n")


def test_response_head_sends_the_length_the_body_was_framed_by() -> None:
    headers = [(b"Content-Length", b" 3 "), (b"X-A", b"1")]
    f = response_framing(200, headers, False)
    assert f.body == BODY_LENGTH and f.length == b"3"
    headers[0] = (b"Content-Length", b"999")  # an addon's edit cannot unframe the body
    wire = response_head(200, b"OK", headers, f, VIA, b"\r\n")
    assert wire == b"HTTP/1.1 200 OK\r\nX-A: 1\r\nVia: " + VIA + b"\r\nContent-Length: 3\r\n\r\n"


# -- small helpers ---------------------------------------------------------------------------
def test_final_coding_is_chunked() -> None:
    assert final_coding_is_chunked(b"chunked")
    assert final_coding_is_chunked(b" gzip ,  Chunked\t")
    for value in (b"xchunked", b"chunkedchunked", b"chunked, gzip", b"chunked-x", b"", b"gzip"):
        assert not final_coding_is_chunked(value)


def test_error_response_is_framed_and_closes() -> None:
    wire = error_response(403, "no")
    head, _, body = wire.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"Content-Length: 3" in head and b"Connection: close" in head
    assert body == b"no\n"
    assert b"Connection" not in error_response(400, "x", close=False)
    assert error_response(599, "odd").startswith(b"HTTP/1.1 599 Error\r\n")


def test_via_has() -> None:
    token = b"proxyfleet-r1"
    assert via_has([(b"Via", b"1.0 fred, 1.1 proxyfleet-r1 (note)")], token)
    assert via_has([(b"via", b"1.1 a"), (b"VIA", b"HTTP/1.1 proxyfleet-r1")], token)
    assert not via_has([(b"Via", b"1.1 proxyfleet-r10, 1.1 xproxyfleet-r1")], token)
    assert not via_has([(b"X-Via", b"1.1 proxyfleet-r1")], token)
    assert not via_has([(b"Via", b"proxyfleet-r1")], token)  # a pseudonym needs a protocol


def test_hop_by_hop_set_holds_no_framing_header_but_te() -> None:
    assert HOP_BY_HOP & FRAMING == {b"transfer-encoding"}  # ours is always re-added


# -- ChunkedDecoder --------------------------------------------------------------------------
NEXT = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
VALID_CHUNKED = (
    b"5\r\nhello\r\n"
    b"1;ext=val;flag\r\n \r\n"
    b'A; q="quoted ; str"\r\n0123456789\r\n'
    b"000c\r\n_twelve_byte\r\n"
    b"0\r\nX-Trailer: t\r\nOther: u\r\n\r\n"
)
VALID_BODY = b"hello 0123456789_twelve_byte"


def decode_in_pieces(stream: bytes, cuts: list[int]) -> tuple[bytes, int, ChunkedDecoder]:
    """Feed ``stream`` split at ``cuts``; (body, bytes consumed in all, decoder)."""
    dec = ChunkedDecoder()
    body: list[bytes] = []
    consumed = 0
    bounds = [0, *sorted(set(cuts)), len(stream)]
    for a, b in itertools.pairwise(bounds):
        if dec.done:
            break
        piece = stream[a:b]
        if not piece:
            continue
        pieces, used = dec.feed(piece)
        assert 0 <= used <= len(piece)
        if not dec.done:
            assert used == len(piece), "the decoder must take what it was given until it is done"
        body += pieces
        consumed += used
    return b"".join(body), consumed, dec


@pytest.mark.parametrize("step", [1, 2, 3, 4, 5, 7, 11, 64, len(VALID_CHUNKED) + len(NEXT)])
def test_chunked_any_fixed_split_decodes_and_stops_at_the_end(step: int) -> None:
    stream = VALID_CHUNKED + NEXT
    body, consumed, dec = decode_in_pieces(stream, list(range(step, len(stream), step)))
    assert dec.done
    assert body == VALID_BODY
    assert consumed == len(VALID_CHUNKED)
    assert stream[consumed:] == NEXT  # the rest belongs to the next request


def test_chunked_every_single_cut_point() -> None:
    stream = VALID_CHUNKED + NEXT
    for cut in range(1, len(stream)):
        body, consumed, dec = decode_in_pieces(stream, [cut])
        assert (dec.done, body, consumed) == (True, VALID_BODY, len(VALID_CHUNKED)), cut


def test_chunked_every_pair_of_cut_points_in_the_crlfs() -> None:
    stream = b"3\r\nabc\r\n0\r\n\r\n"
    for a in range(1, len(stream)):
        for b in range(a, len(stream)):
            body, consumed, dec = decode_in_pieces(stream + b"X", [a, b])
            assert (dec.done, body, consumed) == (True, b"abc", len(stream)), (a, b)


def test_chunked_trailers_are_dropped() -> None:
    dec = ChunkedDecoder()
    pieces, _ = dec.feed(b"2\r\nok\r\n0\r\nX-T: secret\r\n\r\n")
    assert dec.done and b"".join(pieces) == b"ok"
    assert b"secret" not in b"".join(pieces)


def test_chunked_feed_after_done_consumes_nothing() -> None:
    dec = ChunkedDecoder()
    dec.feed(b"0\r\n\r\n")
    assert dec.done
    assert dec.feed(b"5\r\nhello\r\n") == ([], 0)


def test_chunked_large_chunk_hex_sizes() -> None:
    data = b"x" * 0x1234
    dec = ChunkedDecoder()
    pieces, _ = dec.feed(b"1234\r\n" + data + b"\r\n0\r\n\r\n")
    assert dec.done and b"".join(pieces) == data


BAD_CHUNKED = {
    "negative": b"-1\r\nx\r\n0\r\n\r\n",
    "0x-prefix": b"0x10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n",
    "plus": b"+5\r\nhello\r\n0\r\n\r\n",
    "16-hex-digits": b"0000000000000005\r\nhello\r\n0\r\n\r\n",
    "20-hex-digits": b"f" * 20 + b"\r\n",
    "empty-size": b"\r\nhello\r\n0\r\n\r\n",
    "space-in-size": b"5 5\r\nhello\r\n0\r\n\r\n",
    "leading-space": b" 5\r\nhello\r\n0\r\n\r\n",
    "non-hex": b"g\r\nhello\r\n0\r\n\r\n",
    "missing-crlf-after-data": b"5\r\nhelloXX0\r\n\r\n",
    "lf-only-after-data": b"5\r\nhello\n0\r\n\r\n",
    "cr-only-after-data": b"5\r\nhello\r0\r\n\r\n",
    "data-longer-than-size": b"3\r\nhello\r\n0\r\n\r\n",
    "bare-lf-size-line": b"5\nhello\r\n0\r\n\r\n",
    "bare-lf-last-chunk": b"5\r\nhello\r\n0\n\r\n",
    "ext-bare-cr": b"5;a=b\rc\r\nhello\r\n0\r\n\r\n",
    "ext-bare-lf": b"5;a\nb\r\nhello\r\n0\r\n\r\n",
    "ext-not-token": b"5;(x)\r\nhello\r\n0\r\n\r\n",
    "ext-cr-in-quotes": b'5;a="b\rc"\r\nhello\r\n0\r\n\r\n',
    "ext-empty-name": b"5;\r\nhello\r\n0\r\n\r\n",
    "trailer-obs-fold": b"0\r\nX: a\r\n folded\r\n\r\n",
    "trailer-bare-lf": b"0\r\nX: a\nY: b\r\n\r\n",
    "trailer-no-colon": b"0\r\nnot a field\r\n\r\n",
    "trailer-nul": b"0\r\nX: a\x00\r\n\r\n",
    "size-line-too-long": b"5;" + b"a" * 5000 + b"\r\n",
    "size-line-too-long-unterminated": b"1" + b";a" * 3000,
}


@pytest.mark.parametrize("stream", BAD_CHUNKED.values(), ids=BAD_CHUNKED.keys())
@pytest.mark.parametrize("step", [1, 3, 10_000])
def test_bad_chunked_bodies_raise(stream: bytes, step: int) -> None:
    dec = ChunkedDecoder()
    with pytest.raises(FramingError) as info:
        for i in range(0, len(stream), step):
            dec.feed(stream[i : i + step])
        # a stream the decoder only keeps buffering must at least never end as a body
        assert not dec.done
        raise AssertionError(f"accepted {stream[:60]!r}")
    assert info.value.status == 400


# -- properties ------------------------------------------------------------------------------
_TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(alphabet=_TCHAR, min_size=1, max_size=20).map(str.encode)
# visible characters and inner spaces/tabs (leading/trailing OWS is not part of a value)
_VCHAR = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))
visible = st.sampled_from([bytes([c]) for c in _VCHAR])
field_values = st.one_of(
    st.just(b""),
    st.builds(
        lambda first, middle, last: first + middle + last if middle else first,
        visible,
        st.lists(st.sampled_from([b" ", b"\t", *[bytes([c]) for c in _VCHAR[:200:7]]])).map(
            b"".join
        ),
        visible,
    ),
)
_SPECIAL = {
    b"host",
    b"content-length",
    b"transfer-encoding",
    b"connection",
    b"proxy-connection",
    b"upgrade",
    b"via",
}
plain_names = tokens.filter(lambda n: n.lower() not in _SPECIAL)


@st.composite
def chunked_streams(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(body, its chunked encoding): random chunk sizes, extensions, size spellings, trailers."""
    body = draw(st.binary(max_size=600))
    out: list[bytes] = []
    i = 0
    while i < len(body):
        size = draw(st.integers(1, max(1, len(body) - i)))
        spelled = draw(st.sampled_from(["%x", "%X", "%04x"])) % size
        ext = draw(st.sampled_from([b"", b";a", b";a=b", b';n="v; x"', b";x=1;y"]))
        out.append(spelled.encode() + ext + b"\r\n" + body[i : i + size] + b"\r\n")
        i += size
    trailers = draw(st.lists(st.tuples(plain_names, field_values), max_size=3))
    out.append(draw(st.sampled_from([b"0", b"000"])) + b"\r\n")
    out += [n + b": " + v + b"\r\n" for n, v in trailers]
    out.append(b"\r\n")
    return body, b"".join(out)


@given(
    chunked_streams(),
    st.lists(st.integers(0, 2000), max_size=30),
    st.binary(max_size=40),
)
@settings(max_examples=400, deadline=None)
@example((b"", b"0\r\n\r\n"), [1, 2, 3, 4], b"rest")
@example((b"abc", b"3\r\nabc\r\n0\r\n\r\n"), list(range(16)), NEXT)
def test_property_chunked_any_split_decodes_exactly(
    encoded: tuple[bytes, bytes], cuts: list[int], rest: bytes
) -> None:
    body, wire = encoded
    stream = wire + rest
    cuts = [c % (len(stream) + 1) for c in cuts]
    got, consumed, dec = decode_in_pieces(stream, cuts)
    assert dec.done
    assert got == body
    assert consumed == len(wire)


header_lists = st.lists(st.tuples(plain_names, field_values), max_size=12)
ows = st.sampled_from([b"", b" ", b"  ", b"\t", b" \t "])


@given(
    st.sampled_from([b"GET", b"POST", b"BREW", b"X-CUSTOM", b"M-SEARCH"]) | tokens,
    st.sampled_from([b"/", b"/a?b=c", b"http://h.example:81/x", b"*", b"/%C3%A9"]),
    header_lists,
    st.data(),
    st.one_of(st.none(), st.integers(0, 10**12)),
    st.one_of(st.none(), st.just(b"h.example")),
)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_property_heads_round_trip_and_forwarded_heads_reparse(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    data: st.DataObject,
    length: int | None,
    host: bytes | None,
) -> None:
    all_headers = list(headers)
    if host is not None:
        all_headers.insert(data.draw(st.integers(0, len(all_headers))), (b"Host", host))
    if length is not None:
        all_headers.insert(
            data.draw(st.integers(0, len(all_headers))), (b"Content-Length", b"%d" % length)
        )
    lines = [n + b":" + data.draw(ows) + v + data.draw(ows) for n, v in all_headers]
    req = parse(head_of(method + b" " + target + b" HTTP/1.1", *lines))
    assert (req.method, req.target, req.version) == (method, target, "1.1")
    assert req.headers == all_headers
    assert req.host == host
    assert req.conn_drop == frozenset()
    if length is None:
        assert req.body == BODY_NONE
    else:
        assert (req.body, req.content_length) == (BODY_LENGTH, length)

    wire = forward(req)
    out = reparse(wire)
    end_to_end = [
        (n, v)
        for n, v in all_headers
        if n.lower() not in HOP_BY_HOP and n.lower() != b"content-length"
    ]
    framing = [] if length is None else [(b"Content-Length", b"%d" % length)]
    assert out.headers == [*end_to_end, (b"Via", VIA), *framing]
    assert (out.method, out.target, out.body, out.content_length) == (
        method,
        target,
        req.body,
        req.content_length,
    )


@given(
    header_lists,
    st.lists(plain_names.filter(lambda n: n.lower() != b"close"), min_size=1, max_size=4),
    st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_property_connection_named_headers_never_reach_upstream(
    headers: list[tuple[bytes, bytes]], listed: list[bytes], chunked: bool
) -> None:
    framing_line = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: 4"
    lines = [n + b": " + v for n, v in headers]
    conn = b"Connection: " + b", ".join([*listed, b"content-length", b"transfer-encoding"])
    req = parse(head_of(b"POST / HTTP/1.1", b"Host: h", conn, *lines, framing_line))
    out = reparse(forward(req))
    dropped = {n.lower() for n in listed}
    assert not dropped & set(names(out.headers))
    assert out.body == (BODY_CHUNKED if chunked else BODY_LENGTH)
    assert names(out.headers)[0] == b"host"
    kept = [(n, v) for n, v in headers if n.lower() not in dropped | HOP_BY_HOP]
    assert out.headers[1 : 1 + len(kept)] == kept


def _parse_or_framing_error(data: bytes) -> None:
    try:
        req = parse_request_head(data)
    except FramingError as exc:
        assert exc.status in (400, 501, 505)
        return
    # what is accepted is consistent with itself
    assert req.body in (BODY_NONE, BODY_LENGTH, BODY_CHUNKED)
    assert not req.conn_drop & FRAMING
    reparse(forward(req))


@given(st.binary(max_size=300))
@settings(max_examples=1000, deadline=None)
@example(b"")
@example(b"\r\n")
@example(b"GET / HTTP/1.1\r\n\r\n")
@example(b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n")
@example(b"GET / HTTP/1.1\r\nTransfer-Encoding:\r\n")
@example(b"GET / HTTP/1.1\r\nTransfer-Encoding: ,\r\n")
@example(b"GET / HTTP/1.1\r\nConnection:\r\nUpgrade:\r\n")
def test_property_arbitrary_bytes_only_raise_framing_error(data: bytes) -> None:
    _parse_or_framing_error(data)


VALID_HEADS = [
    head_of(
        b"POST http://h.example/p?q HTTP/1.1",
        b"Host: h.example",
        b"Connection: keep-alive, Upgrade, X-A",
        b"Upgrade: websocket",
        b"Content-Length: 12",
        b"X-A: a",
        b"Via: 1.0 x",
    ),
    head_of(b"PUT /x HTTP/1.1", b"Host: h", b"Transfer-Encoding: chunked", b"Accept: */*"),
    head_of(b"GET / HTTP/1.0", b"A: b"),
]
_NASTY = [b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b",", b"\x00", b"\x7f", b"\xff", b"-", b"0"]


@st.composite
def mutated_heads(draw: st.DrawFn) -> bytes:
    head = bytearray(draw(st.sampled_from(VALID_HEADS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "dup"]))
        i = draw(st.integers(0, len(head)))
        if op == "insert":
            head[i:i] = draw(st.sampled_from(_NASTY) | st.binary(min_size=1, max_size=3))
        elif op == "delete":
            del head[i : i + draw(st.integers(1, 8))]
        elif op == "replace" and i < len(head):
            head[i] = draw(st.integers(0, 255))
        elif op == "dup":
            j = draw(st.integers(i, len(head)))
            head[j:j] = head[i : min(j, i + 40)]
    return bytes(head)


@given(mutated_heads())
@settings(max_examples=1500, deadline=None)
def test_property_mutated_heads_only_raise_framing_error(data: bytes) -> None:
    _parse_or_framing_error(data)


def test_valid_heads_of_the_mutation_test_are_valid() -> None:
    for head in VALID_HEADS:
        parse(head)


def test_response_head_keeps_the_order_of_several_via_lines() -> None:
    headers = [(b"Via", b"1.0 first"), (b"Via", b"1.1 second")]
    wire = response_head(200, b"OK", headers, ResponseFraming(), VIA, b"\r\n")
    assert wire == b"HTTP/1.1 200 OK\r\nVia: 1.0 first, 1.1 second, " + VIA + b"\r\n\r\n"


def test_every_hop_by_hop_and_framing_name_has_a_role_in_any_spelling() -> None:
    from services.proxy import framing

    for name in (*HOP_BY_HOP, *FRAMING, b"via"):
        for spelling in (name, name.upper(), name.title()):
            assert framing._role_of(spelling) != framing.R_PASS, spelling
    assert framing._role_of(b"X-Custom") == framing.R_PASS


def test_the_role_cache_is_bounded() -> None:
    from services.proxy import framing

    for i in range(framing._ROLES_MAX + 10):
        framing._role_of(b"X-Name-%d" % i)
    assert len(framing._ROLES) <= framing._ROLES_MAX
