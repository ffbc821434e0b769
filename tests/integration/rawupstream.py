"""Hostile-corpus helpers: an upstream that logs the raw bytes of every connection and
answers with scripted bytes, a strict HTTP/1.1 parser for what it received, and a
client that reads responses with exact RFC 9112 framing and tells a reset from a FIN.

Candidates for ``harness.py`` once the relay rewrite settles: ``RawUpstream``,
``split_requests``/``framing_problems``, ``parse_response`` and ``WireClient``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tests.integration.harness import FlowEvents, RawClient

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


# -- strict parsing of what the upstream received --------------------------------------------
@dataclass
class Request:
    """One request as it arrived at the upstream (``raw``: its exact bytes)."""

    raw: bytes
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    framing: str  # "length" | "chunked" | "none"

    def all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None


def _codings(values: list[str]) -> list[str]:
    return [c.strip().lower() for v in values for c in v.split(",") if c.strip()]


def _dechunk(data: bytes, pos: int) -> tuple[bytes, int] | None:
    """Decode a chunked body starting at ``pos``: (body, end) or None if incomplete.

    Raises ValueError on anything RFC 9112 section 7.1 does not allow.
    """
    parts = []
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        line = data[pos:eol]
        size_s = line.split(b";", 1)[0]
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size_s) or b"\r" in line or b"\n" in line:
            raise ValueError(f"bad chunk size line {line[:40]!r}")
        size = int(size_s, 16)
        pos = eol + 2
        if size == 0:
            while True:  # trailer section
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    return None
                if eol == pos:
                    return b"".join(parts), eol + 2
                pos = eol + 2
        if len(data) < pos + size + 2:
            return None
        if data[pos + size : pos + size + 2] != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
        parts.append(data[pos : pos + size])
        pos += size + 2


def _partial_chunks(data: bytes, pos: int) -> bytes:
    """The chunk data of an unfinished (or broken) chunked body, as far as it goes."""
    parts = []
    while (eol := data.find(b"\r\n", pos)) >= 0:
        try:
            size = int(data[pos:eol].split(b";", 1)[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        parts.append(data[eol + 2 : eol + 2 + size])
        pos = eol + 2 + size + 2
    return b"".join(parts)


def split_requests(data: bytes) -> tuple[list[Request], bytes]:
    """The complete requests at the start of ``data`` and the bytes left over.

    Framing follows RFC 9112 section 6.3 (final coding chunked, else Content-Length,
    else no body). Stops at the first incomplete or unparseable request.
    """
    reqs: list[Request] = []
    pos = 0
    while True:
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            break
        lines = data[pos:end].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            break
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
        req = Request(
            b"", *(p.decode("latin-1") for p in parts), headers=headers, body=b"", framing="none"
        )
        body_at = end + 4
        te = _codings(req.all("transfer-encoding"))
        if te:
            if te[-1] != "chunked":
                break
            try:
                got = _dechunk(data, body_at)
            except ValueError:
                break
            if got is None:
                break
            req.body, stop = got
            req.framing = "chunked"
        elif lengths := req.all("content-length"):
            if not lengths[0].isdigit():
                break
            n = int(lengths[0])
            if len(data) < body_at + n:
                break
            req.body, stop = data[body_at : body_at + n], body_at + n
            req.framing = "length"
        else:
            stop = body_at
        req.raw = data[pos:stop]
        reqs.append(req)
        pos = stop
    return reqs, data[pos:]


def framing_problems(req: Request) -> list[str]:
    """What is wrong with how the proxy framed ``req`` (empty: a clean HTTP/1.1 request)."""
    problems = []
    head = req.raw.split(b"\r\n\r\n", 1)[0]
    lines = head.split(b"\r\n")
    for line in lines:
        if b"\r" in line or b"\n" in line or b"\x00" in line:
            problems.append(f"bare CR/LF or NUL in {line[:60]!r}")
    if not _TOKEN.match(req.method.encode("latin-1")):
        problems.append(f"method {req.method!r} is not a token")
    if req.version != "HTTP/1.1":
        problems.append(f"version {req.version!r}")
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            problems.append(f"obs-fold line {line[:60]!r}")
        name = line.partition(b":")[0]
        if not _TOKEN.match(name):
            problems.append(f"bad field name {name[:60]!r}")
    if len(req.all("host")) != 1:
        problems.append(f"Host fields: {req.all('host')}")
    cl, te = req.all("content-length"), req.all("transfer-encoding")
    if cl and te:
        problems.append("both Content-Length and Transfer-Encoding")
    if len(cl) > 1 or any("," in v for v in cl):
        problems.append(f"Content-Length fields: {cl}")
    if te and _codings(te) != ["chunked"]:
        problems.append(f"Transfer-Encoding {te}")
    if req.body and not (cl or te):
        problems.append("a body without framing")
    return problems


# -- the upstream ----------------------------------------------------------------------------
class UpstreamConn:
    """One connection the proxy opened: every byte it sent, in ``raw``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.raw = bytearray()
        self.eof = False  # the proxy closed (FIN or reset)
        self.consumed = 0  # bytes the script has taken as requests
        self._changed = asyncio.Event()
        self.pump = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await self.reader.read(65536):
                self.raw += data
                self._changed.set()
        self.eof = True
        self._changed.set()

    @property
    def requests(self) -> list[Request]:
        return split_requests(bytes(self.raw))[0]

    async def wait(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Wait until ``predicate()`` holds (True) or the connection ends / time runs out."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not predicate():
                    if self.eof:
                        return predicate()
                    self._changed.clear()
                    await self._changed.wait()
        return predicate()

    async def wait_closed(self, timeout: float = 5.0) -> bool:
        """True once the proxy has closed this connection (within ``timeout``)."""
        return await self.wait(lambda: self.eof, timeout)

    async def next_request(self, timeout: float = 10.0) -> Request | None:
        """The next complete request (None if the connection ends or time runs out first)."""

        def ready() -> bool:
            return bool(split_requests(bytes(self.raw[self.consumed :]))[0])

        if not await self.wait(ready, timeout):
            return None
        req = split_requests(bytes(self.raw[self.consumed :]))[0][0]
        self.consumed += len(req.raw)
        return req

    def send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> bool:
        """False if the proxy has gone away."""
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            return False
        return not self.writer.is_closing()

    def close(self) -> None:
        """A clean close (FIN)."""
        self.writer.close()

    def reset(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0, then close)."""
        sock = self.writer.get_extra_info("socket")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Script = Callable[[UpstreamConn], Awaitable[None]]


def ok(body: bytes, extra: bytes = b"") -> bytes:
    """A 200 response with ``body`` (Content-Length framed) and extra header lines."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def echo_line(req: Request, extra: bytes = b"") -> bytes:
    """The default answer: ``<method> <target>`` so a client can tell whose response it got."""
    return ok(f"{req.method} {req.target}".encode("latin-1"), extra)


def reply_each(make: Callable[[Request], bytes] = echo_line) -> Script:
    """Answer every request on the connection with ``make(request)``."""

    async def script(conn: UpstreamConn) -> None:
        while (req := await conn.next_request()) is not None:
            conn.send(make(req))
            if not await conn.drain():
                return

    return script


class RawUpstream:
    """A TCP server on 127.0.0.1 that runs ``script`` on each connection and logs all bytes."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.conns: list[UpstreamConn] = []
        self.port = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self._server: asyncio.Server | None = None

    @property
    def requests(self) -> list[Request]:
        """Every complete request received, over all connections, in connection order."""
        return [r for c in self.conns for r in c.requests]

    @property
    def received(self) -> bytes:
        return b"".join(bytes(c.raw) for c in self.conns)

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = UpstreamConn(reader, writer)
        self.conns.append(conn)
        work = asyncio.create_task(self._run(conn))
        self._tasks.append(work)
        with contextlib.suppress(asyncio.CancelledError):
            await work  # cancelled by stop(): the handler itself ends normally

    async def _run(self, conn: UpstreamConn) -> None:
        try:
            await self.script(conn)
            await conn.pump
        except (ConnectionError, OSError):
            pass
        finally:
            conn.writer.close()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for conn in self.conns:
            conn.writer.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task


@contextlib.asynccontextmanager
async def raw_upstream(script: Script | None = None) -> AsyncIterator[RawUpstream]:
    server = RawUpstream(script or reply_each())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# -- the client side ---------------------------------------------------------------------------
@dataclass
class Response:
    """One response as the client received it, de-framed per RFC 9112 section 6.3."""

    version: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    framing: str = "none"  # "length" | "chunked" | "close" | "none"
    complete: bool = False  # framing satisfied (terminator seen / length reached / FIN)
    size: int = 0  # bytes of the whole response on the wire

    def all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None


def parse_response(data: bytes, eof: bool, head_request: bool = False) -> Response | None:
    """The first response in ``data`` (None while its head is incomplete).

    ``eof``: the connection has ended, so a close-delimited body is complete.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name, value.strip()))
    resp = Response(version, int(rest.split(" ", 1)[0]), headers)
    pos = end + 4
    te = _codings(resp.all("transfer-encoding"))
    if head_request or resp.status < 200 or resp.status in (204, 304):
        resp.complete, resp.size = True, pos
    elif te and te[-1] == "chunked":
        resp.framing = "chunked"
        try:
            got = _dechunk(data, pos)
        except ValueError:
            got = None
        if got is not None:
            resp.body, resp.size = got
            resp.complete = True
        else:  # the chunk data that arrived so far
            resp.body, resp.size = _partial_chunks(data, pos), len(data)
    elif not te and (length := resp.header("content-length")) is not None:
        resp.framing = "length"
        n = int(length)
        resp.body = data[pos : pos + n]
        resp.complete = len(resp.body) == n
        resp.size = pos + len(resp.body)
    else:
        resp.framing = "close"
        resp.body, resp.size = data[pos:], len(data)
        resp.complete = eof
    return resp


class WireClient(RawClient):
    """``RawClient`` that remembers whether the connection ended with a reset, and reads
    responses with exact framing rules (the final transfer coding, not a substring)."""

    reset = False

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.port: int = sock.getsockname()[1]  # kept: flows are matched by it after close

    async def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = await self.loop.sock_recv(self.sock, 65536)
        except ConnectionResetError:
            self.reset = True
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def request(self, data: bytes, timeout: float = 5.0) -> Response:
        await self.send(data)
        return await self.response(timeout=timeout)

    async def response(self, head_request: bool = False, timeout: float = 5.0) -> Response:
        """The next response; TimeoutError if it is not complete within ``timeout``.

        A response cut short by the connection ending is returned with ``complete`` False.
        """
        async with asyncio.timeout(timeout):
            while True:
                resp = parse_response(bytes(self.buf), self.eof, head_request)
                if resp is not None and (resp.complete or self.eof):
                    del self.buf[: resp.size]
                    return resp
                if not await self._fill() and resp is None:
                    raise EOFError(f"closed before a response head; got {bytes(self.buf)[:200]!r}")

    async def read_until(self, marker: bytes, timeout: float = 5.0) -> bool:
        """Fill until ``marker`` is in the buffer (False if the connection ends first)."""
        async with asyncio.timeout(timeout):
            while marker not in self.buf:
                if not await self._fill():
                    return False
        return True

    async def rest(self, timeout: float = 5.0) -> bytes:
        """Everything until the connection ends (FIN or reset)."""
        async with asyncio.timeout(timeout):
            while await self._fill():
                pass
        data = bytes(self.buf)
        self.buf.clear()
        return data


async def open_tunnel(proxy_port: int, authority: str) -> tuple[WireClient, Response]:
    """A CONNECT to ``authority`` through the proxy: the client and the proxy's answer."""
    client = await WireClient.connect(proxy_port)
    await client.send(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    async with asyncio.timeout(5):
        while b"\r\n\r\n" not in client.buf:
            if not await client._fill():
                break
    end = client.buf.find(b"\r\n\r\n")
    if end < 0:
        raise EOFError(f"no answer to CONNECT; got {bytes(client.buf)!r}")
    resp = parse_response(bytes(client.buf[: end + 4]), False, head_request=True)
    assert resp is not None
    del client.buf[: end + 4]
    return client, resp


# -- flows -------------------------------------------------------------------------------------
async def flow_of(events: FlowEvents, client: WireClient, timeout: float = 5.0) -> dict[str, Any]:
    """The final event of the (first) flow that came from ``client``'s connection."""
    port = client.port
    return await events.wait_for(
        lambda e: e["event"] != "started" and (e.get("client") or [None, None])[1] == port,
        timeout,
    )
