"""HTTP/1.1 framing as pure functions over bytes (RFC 9110, RFC 9112).

Nothing here touches a socket, so every rule can be unit- and property-tested.
The relay calls in for three things:

- ``parse_request_head``: one strict parse of a request line and its header
  block, refusing anything a second parser could read differently (request
  smuggling): obs-fold, bare LF, whitespace before a colon, control characters
  in values, ``Content-Length`` that is not one decimal number, ``Content-Length``
  together with ``Transfer-Encoding``, a final transfer coding other than
  ``chunked``, a duplicate ``Host``.
- ``ChunkedDecoder``: the strict chunked body decoder for requests.
- ``request_head`` / ``response_head``: the heads sent on, rebuilt from what was
  parsed. Hop-by-hop headers and those a peer names in ``Connection`` are
  dropped, but never the framing ones (``Content-Length``, ``Transfer-Encoding``,
  ``Host``): the relay re-frames every body from what it parsed itself.

Methods are any RFC 9110 token (``BREW``, ``X-CUSTOM``), as nginx and mitmproxy
relay them; llhttp's fixed method list is why requests are not parsed by it.
"""

from __future__ import annotations

import re
from http import HTTPStatus

MAX_HEAD = 64 * 1024  # request or response line + headers; larger heads are refused
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Never removed because a peer listed them in ``Connection`` (item: request smuggling).
FRAMING = frozenset({b"content-length", b"transfer-encoding", b"host"})
_CONN_KEYWORDS = frozenset({b"close", b"keep-alive", b"upgrade", b""})

STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}

# Body framing of a message, as parsed.
BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_UNTIL_CLOSE = range(4)

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e\x80-\xff]+) HTTP/([0-9])\.([0-9])")
# A whole header block in one match: token names, a colon right after them, values
# without control characters (HTAB allowed), every line ended by CRLF. Anything else
# (obs-fold, bare CR or LF, NUL, "name :") fails the match.
_HEADER_BLOCK = re.compile(rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_CHUNK_EXT = re.compile(
    rb"(?:[\t ]*;[\t ]*" + _TOKEN + rb"(?:=(?:" + _TOKEN + rb'|"[^"\\\r\n]*"))?)*[\t ]*'
)
_OWS = b" \t"


_REQUEST_START = re.compile(rb"(?:" + _TOKEN + rb")?(?: |$)")


def plausible_request_start(buf: bytes) -> bool:
    """False if ``buf`` (an incomplete head) cannot begin a request line: a TLS
    ClientHello or other binary sent to the plain port is refused at once."""
    return _REQUEST_START.match(buf[:32]) is not None


class FramingError(Exception):
    """Input that cannot be relayed safely; ``status`` is the answer owed to the peer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def conn_tokens(value: bytes) -> set[bytes]:
    """The lower-case tokens of a ``Connection`` value (comma-separated)."""
    return {t.strip(_OWS) for t in value.lower().split(b",")}


def final_coding_is_chunked(value: bytes) -> bool:
    """True if the last transfer coding of a ``Transfer-Encoding`` value is ``chunked``.

    The coding is compared as a whole token: ``xchunked`` and ``chunkedchunked`` are
    not chunked, ``gzip, chunked`` is.
    """
    return value.rpartition(b",")[2].strip(_OWS).lower() == b"chunked"


class RequestHead:
    """A parsed request head: the line, the headers in order, and the body framing."""

    __slots__ = (
        "body",
        "conn_drop",
        "content_length",
        "headers",
        "host",
        "keep_alive",
        "method",
        "target",
        "upgrade",
        "version",
        "via",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = BODY_NONE
        self.content_length = 0
        self.keep_alive = True
        self.host: bytes | None = None  # the Host header's value
        self.upgrade: bytes | None = None  # the Upgrade value when Connection names upgrade
        self.conn_drop: frozenset[bytes] = frozenset()  # extra names listed in Connection
        self.via = False  # a Via header came with it (then loops are looked for)


def _content_length(values: list[bytes]) -> int:
    """One length from every ``Content-Length`` value; identical repeats collapse."""
    lengths = set()
    for value in values:
        for part in value.split(b","):
            part = part.strip(_OWS)
            if _DIGITS.fullmatch(part) is None:
                raise FramingError(400, f"invalid Content-Length {value[:40]!r}")
            lengths.add(int(part))
    if len(lengths) != 1:
        raise FramingError(400, "conflicting Content-Length values")
    return lengths.pop()


# What the relay does with a header, by name: most names pass end to end; the others
# frame the message, are hop-by-hop, or are ours to rebuild. Names are looked up as sent
# (one dict lookup for the usual spellings); a new spelling is lowered once and
# remembered, up to a bound (a peer sending endless distinct names).
R_PASS, R_HOP, R_LENGTH, R_TE, R_CONN, R_UPGRADE, R_VIA, R_HOST = range(8)
_ROLE_BY_LNAME = {
    b"content-length": R_LENGTH,
    b"transfer-encoding": R_TE,
    b"connection": R_CONN,
    b"proxy-connection": R_CONN,
    b"upgrade": R_UPGRADE,
    b"via": R_VIA,
    b"host": R_HOST,
    **{n: R_HOP for n in (b"keep-alive", b"proxy-authenticate", b"proxy-authorization")},
    **{n: R_HOP for n in (b"te", b"trailer")},
}
_ROLES: dict[bytes, int] = {}
_ROLES_MAX = 4096


def _role_of(name: bytes) -> int:
    role = _ROLE_BY_LNAME.get(name.lower(), R_PASS)
    if len(_ROLES) >= _ROLES_MAX:
        _ROLES.clear()
    _ROLES[name] = role
    return role


def parse_request_head(head: bytes) -> RequestHead:
    """Parse ``head`` (request line and headers, each ended by CRLF, without the blank line).

    Raises ``FramingError`` with the status owed (400, 501 or 505) for anything
    ambiguous or malformed.
    """
    line_end = head.find(b"\r\n")
    if line_end < 0:
        raise FramingError(400, "malformed request: no CRLF after the request line")
    m = _REQUEST_LINE.fullmatch(head, 0, line_end)
    if m is None:
        line = head[:line_end]
        if b"\n" in line or b"\r" in line:
            raise FramingError(400, "malformed request: bare CR or LF")
        raise FramingError(400, f"malformed request line {line[:100]!r}")
    req = RequestHead()
    req.method, req.target, major, minor = m.groups()
    if major != b"1" or minor not in (b"0", b"1"):
        raise FramingError(
            505, f"HTTP/{major.decode()}.{minor.decode()} is not supported: use HTTP/1.1"
        )
    http11 = minor == b"1"
    req.version = "1.1" if http11 else "1.0"
    block_start = line_end + 2
    if _HEADER_BLOCK.fullmatch(head, block_start) is None:
        raise FramingError(400, "malformed request headers")
    headers = req.headers
    te: bytes | None = None
    lengths: list[bytes] | None = None
    conn = b""
    upgrade: bytes | None = None
    host_count = 0
    if len(head) > block_start:
        roles = _ROLES
        for line in head[block_start:-2].split(b"\r\n"):
            name, _, value = line.partition(b":")
            value = value.strip(_OWS)
            headers.append((name, value))
            role = roles.get(name)
            if role is None:
                role = _role_of(name)
            if role <= R_HOP:
                continue
            if role == R_LENGTH:
                if lengths is None:
                    lengths = []
                lengths.append(value)
            elif role == R_HOST:
                host_count += 1
                req.host = value
            elif role == R_CONN:
                conn += b"," + value
            elif role == R_TE:
                te = value if te is None else te + b"," + value
            elif role == R_UPGRADE:
                upgrade = value
            else:  # R_VIA
                req.via = True
    if host_count > 1:
        raise FramingError(400, "more than one Host header")
    if te is not None:
        if lengths is not None:
            raise FramingError(400, "both Content-Length and Transfer-Encoding")
        if not http11:
            raise FramingError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip(_OWS).lower() for c in te.split(b",")]
        if not final_coding_is_chunked(te) or codings.count(b"chunked") > 1:
            raise FramingError(400, f"unsupported Transfer-Encoding {te[:60]!r}")
        if te.strip(_OWS).lower() != b"chunked":
            raise FramingError(501, f"transfer codings other than chunked: {te[:60]!r}")
        req.body = BODY_CHUNKED
    elif lengths is not None:
        req.content_length = _content_length(lengths)
        req.body = BODY_LENGTH
    tokens = conn_tokens(conn) if conn else set()
    if http11:
        req.keep_alive = b"close" not in tokens
    else:
        req.keep_alive = b"keep-alive" in tokens and b"close" not in tokens
    if tokens:
        drop = tokens - _CONN_KEYWORDS - FRAMING
        if drop:
            req.conn_drop = frozenset(drop)
        if upgrade is not None and b"upgrade" in tokens:
            req.upgrade = upgrade
    return req


def request_head(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    host: bytes | None,
    body: int,
    content_length: int,
    conn_drop: frozenset[bytes],
    upgrade: bytes | None,
    via: bytes,
) -> bytes:
    """The request head sent upstream, re-framed from what was parsed.

    ``host`` replaces any Host header (absolute-form and reverse mode); ``None``
    keeps the client's. The body framing header is ours: ``Content-Length`` for a
    length-delimited body, ``Transfer-Encoding: chunked`` for a chunked one.
    """
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    if host is not None:
        parts += (b"Host: ", host, b"\r\n")
    vias: list[bytes] = []
    roles = _ROLES
    for name, value in headers:
        role = roles.get(name)
        if role is None:
            role = _role_of(name)
        if role:  # framing, hop-by-hop and ours are rebuilt below; Host and Via kept
            if role == R_VIA:  # earlier hops, in order, then ours (RFC 9110 7.6.3)
                vias.append(value)
            elif role == R_HOST and host is None:
                parts += (name, b": ", value, b"\r\n")
            continue
        if conn_drop and name.lower() in conn_drop:
            continue
        parts += (name, b": ", value, b"\r\n")
    vias.append(via)
    parts += (b"Via: ", b", ".join(vias), b"\r\n")
    if upgrade is not None:
        parts += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    if body == BODY_CHUNKED:
        parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
    elif body == BODY_LENGTH:
        parts.append(b"Content-Length: %d\r\n\r\n" % content_length)
    else:
        parts.append(b"\r\n")
    return b"".join(parts)


class ResponseFraming:
    """What the relay needs to know of a response head before sending it on."""

    __slots__ = ("body", "conn_drop", "length", "upgrade")

    def __init__(self) -> None:
        self.body = BODY_UNTIL_CLOSE
        self.conn_drop: frozenset[bytes] = frozenset()
        self.length: bytes | None = None  # the Content-Length llhttp framed the body by
        self.upgrade: bytes | None = None


def response_framing(
    status: int, headers: list[tuple[bytes, bytes]], is_head: bool
) -> ResponseFraming:
    """Classify a response's body framing the way llhttp reads it (RFC 9112 §6.3).

    llhttp has already refused conflicting or invalid ``Content-Length`` values and
    ``Content-Length`` with ``Transfer-Encoding``; a final coding other than
    ``chunked`` means the body runs until the connection closes.
    """
    out = ResponseFraming()
    te: bytes | None = None
    has_length = False
    conn = b""
    roles = _ROLES
    for name, value in headers:
        role = roles.get(name)
        if role is None:
            role = _role_of(name)
        if role <= R_HOP:
            continue
        if role == R_TE:
            te = value if te is None else te + b"," + value
        elif role == R_LENGTH:
            has_length = True
            out.length = value.strip(_OWS)
        elif role == R_CONN:
            conn += b"," + value
        elif role == R_UPGRADE:
            out.upgrade = value
    if conn:
        out.conn_drop = frozenset(conn_tokens(conn) - _CONN_KEYWORDS - FRAMING)
    if is_head or status in (204, 304) or 100 <= status < 200:
        out.body = BODY_NONE
    elif te is not None:
        out.body = BODY_CHUNKED if final_coding_is_chunked(te) else BODY_UNTIL_CLOSE
        out.length = None  # a message with both is framed by its coding (or refused)
    elif has_length:
        out.body = BODY_LENGTH
    return out


def response_head(
    status: int,
    reason: bytes,
    headers: list[tuple[bytes, bytes]],
    framing: ResponseFraming,
    via: bytes,
    tail: bytes,
) -> bytes:
    """The response head sent to the client; ``tail`` holds our framing and
    connection headers and the blank line. ``Content-Length`` is the one the body
    was framed by, whatever an addon left in ``headers``."""
    if reason:
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    else:
        parts = [STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
    vias: list[bytes] = []
    conn_drop = framing.conn_drop
    roles = _ROLES
    for name, value in headers:
        role = roles.get(name)
        if role is None:
            role = _role_of(name)
        if role:  # framing and hop-by-hop are ours; Via gathered; Host passes
            if role == R_VIA:
                vias.append(value)
            elif role == R_HOST:
                parts += (name, b": ", value, b"\r\n")
            continue
        if conn_drop and name.lower() in conn_drop:
            continue
        parts += (name, b": ", value, b"\r\n")
    vias.append(via)
    parts += (b"Via: ", b", ".join(vias), b"\r\n")
    if framing.length is not None:
        parts += (b"Content-Length: ", framing.length, b"\r\n")
    parts.append(tail)
    return b"".join(parts)


def error_response(status: int, message: str, close: bool = True) -> bytes:
    """A small plain-text answer of our own (refusals, upstream failures)."""
    body = (message + "\n").encode()
    return b"".join(
        (
            STATUS_LINES.get(status) or b"HTTP/1.1 %d Error\r\n" % status,
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body),
            b"Connection: close\r\n\r\n" if close else b"\r\n",
            body,
        )
    )


def via_has(headers: list[tuple[bytes, bytes]], token: bytes) -> bool:
    """True if a ``Via`` header names ``token`` as a received-by pseudonym (a loop)."""
    for name, value in headers:
        if len(name) == 3 and name.lower() == b"via":
            for hop in value.split(b","):
                fields = hop.split()
                if len(fields) >= 2 and fields[1] == token:
                    return True
    return False


# Chunked decoder states
_SIZE, _DATA, _DATA_CRLF, _TRAILER, _DONE = range(5)


class ChunkedDecoder:
    """Decodes a chunked request body strictly (RFC 9112 §7.1).

    ``feed`` returns the body pieces found and how many bytes it consumed; after
    the last chunk and the trailer section, ``done`` is True and the rest of the
    data belongs to the next request. Chunk sizes are hex digits only (no sign,
    no ``0x``, at most 15 digits), lines end with CRLF, extensions are tokens.
    Trailers are read and dropped (they are not relayed).
    """

    __slots__ = ("_line", "_need", "_state", "done")

    def __init__(self) -> None:
        self._state = _SIZE
        self._need = 0
        self._line = b""
        self.done = False

    def _take_line(self, data: bytes, i: int) -> tuple[bytes | None, int]:
        """A CRLF-ended line starting at ``data[i]`` (buffered across calls)."""
        if self._line[-1:] == b"\r" and data[i : i + 1] == b"\n":  # CRLF split between reads
            line, self._line = self._line[:-1], b""
            return line, i + 1
        end = data.find(b"\r\n", i)
        if end < 0:
            self._line += data[i:]
            if len(self._line) > MAX_CHUNK_LINE:
                raise FramingError(400, "chunk line too long")
            return None, len(data)
        line = self._line + data[i:end]
        self._line = b""
        if len(line) > MAX_CHUNK_LINE:
            raise FramingError(400, "chunk line too long")
        return line, end + 2

    def feed(self, data: bytes) -> tuple[list[bytes], int]:
        pieces: list[bytes] = []
        i, n = 0, len(data)
        while i < n and not self.done:
            state = self._state
            if state == _DATA:
                take = min(self._need, n - i)
                pieces.append(data[i : i + take] if take < n or i else data)
                self._need -= take
                i += take
                if not self._need:
                    self._state = _DATA_CRLF
            elif state == _SIZE:
                line, i = self._take_line(data, i)
                if line is None:
                    break
                size, sep, ext = line.partition(b";")
                if sep:  # BWS before the extension is allowed (RFC 9112 7.1.1)
                    size = size.rstrip(_OWS)
                if _HEX.fullmatch(size) is None:
                    raise FramingError(400, f"invalid chunk size {line[:40]!r}")
                if sep and _CHUNK_EXT.fullmatch(b";" + ext) is None:
                    raise FramingError(400, "invalid chunk extension")
                self._need = int(size, 16)
                self._state = _DATA if self._need else _TRAILER
            elif state == _DATA_CRLF:
                had = len(self._line)
                pending = self._line + data[i : i + 2 - had]
                if pending != b"\r\n"[: len(pending)]:
                    raise FramingError(400, "chunk data not followed by CRLF")
                i += len(pending) - had
                if len(pending) < 2:
                    self._line = pending
                    break
                self._line = b""
                self._state = _SIZE
            else:  # _TRAILER: field lines until an empty one
                line, i = self._take_line(data, i)
                if line is None:
                    break
                if not line:
                    self.done = True
                    self._state = _DONE
                elif _HEADER_BLOCK.fullmatch(line + b"\r\n") is None:
                    raise FramingError(400, "malformed trailer field")
        return pieces, i
