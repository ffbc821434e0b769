"""Real parts for integration tests: upstream servers on 127.0.0.1 (plain and TLS,
signed by a test CA), an in-process proxy replica, and a reader of flow events
from the FLOWS stream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import orjson
from aiohttp import WSMsgType, web

from libs.common import subjects
from libs.common.bus import barrier
from libs.common.settings import ProxySettings
from services.proxy.main import Replica
from services.proxy.tls import CertificateAuthority


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port if port != 4222 else free_port()


# -- upstream servers --------------------------------------------------------------------
def upstream_app() -> web.Application:
    """Routes the tests use: echo, sized/chunked bodies, status codes, slow, websocket."""

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.path_qs,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body_len": len(body),
                "body": body.decode("latin-1"),
                "version": f"{request.version.major}.{request.version.minor}",
            }
        )

    async def sized(request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = n
        await resp.prepare(request)
        chunk = b"x" * 65536
        sent = 0
        while sent < n:
            piece = chunk[: min(65536, n - sent)]
            await resp.write(piece)
            sent += len(piece)
        await resp.write_eof()
        return resp

    async def chunked(request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        sent = 0
        while sent < n:
            piece = b"c" * min(1000, n - sent)
            await resp.write(piece)
            sent += len(piece)
        await resp.write_eof()
        return resp

    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code)
        return web.Response(status=code, text=f"status {code}")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "30")))
        return web.Response(text="slow done")

    async def drip(request: web.Request) -> web.StreamResponse:
        """Headers at once, then one byte per ``s`` seconds: a long-running active flow."""
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(int(request.query.get("n", "1000"))):
            await resp.write(b".")
            await asyncio.sleep(float(request.query.get("s", "0.1")))
        await resp.write_eof()
        return resp

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                await sock.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await sock.send_bytes(msg.data)
        return sock

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/echo{tail:.*}", echo)
    app.router.add_get("/bytes/{n}", sized)
    app.router.add_get("/chunked/{n}", chunked)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/slow", slow)
    app.router.add_get("/drip", drip)
    app.router.add_get("/ws", ws)
    return app


class Upstream:
    """The same app served over plain HTTP and over TLS (cert from a test CA)."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.http_port = free_port()
        self.https_port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    async def start(self) -> None:
        self._runner = web.AppRunner(upstream_app(), access_log=None)
        await self._runner.setup()
        tls = self.ca.server_context("127.0.0.1")
        for attempt in range(5):  # a free port can be taken between free_port() and bind
            try:
                await web.TCPSite(self._runner, "127.0.0.1", self.http_port).start()
                break
            except OSError:
                if attempt == 4:
                    raise
                self.http_port = free_port()
        for attempt in range(5):
            try:
                site = web.TCPSite(self._runner, "127.0.0.1", self.https_port, ssl_context=tls)
                await site.start()
                break
            except OSError:
                if attempt == 4:
                    raise
                self.https_port = free_port()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handler: RawHandler) -> AsyncIterator[int]:
    """A hand-written TCP server (for framings aiohttp will not produce); yields its port."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


# -- the proxy under test ----------------------------------------------------------------
class ProxyUnderTest:
    """An in-process replica on a free port with its own data dir."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    @property
    def url(self) -> str:
        return f"http://{self.replica.address}"

    @property
    def port(self) -> int:
        return int(self.replica.address.rsplit(":", 1)[1])

    @property
    def id(self) -> str:
        return self.replica.settings.replica_id

    @property
    def ca_path(self) -> Path:
        assert self.replica.ca is not None
        return self.replica.ca.cert_path

    @property
    def ctx(self) -> Any:
        return self.replica.ctx


def proxy_settings(
    nats_url: str, data_dir: Path, upstream_ca: Path, **overrides: Any
) -> ProxySettings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "data_dir": data_dir,
        "proxy_listen": f"127.0.0.1:{free_port()}",
        "replica_id": f"t{os.getpid()}-{free_port()}",
        "upstream_ca_bundle": upstream_ca,
        "heartbeat_interval": 0.5,
        "drain_timeout": 5.0,
        "nats_connect_timeout": 5.0,
    }
    values.update(overrides)
    return ProxySettings(**values)


# -- reading flow events -----------------------------------------------------------------
class FlowEvents:
    """Collects the flow events one replica publishes (core subscription on its subject)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.messages: list[Any] = []
        self._changed = asyncio.Event()
        self._nc: Any = None

    async def start(self, nats_url: str, replica: str) -> None:
        self._nc = await nats.connect(nats_url)

        async def on_msg(msg: Any) -> None:
            self.messages.append(msg)
            self.events.extend(orjson.loads(msg.data))
            self._changed.set()

        await self._nc.subscribe(subjects.flows_subject(replica), cb=on_msg)
        await barrier(self._nc)

    async def stop(self) -> None:
        if self._nc is not None:
            await self._nc.close()

    def final(self) -> dict[str, dict[str, Any]]:
        """Final (non-``started``) events by flow id."""
        return {e["id"]: e for e in self.events if e["event"] != "started"}

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> dict[str, Any]:
        """The first event matching ``predicate``, waiting up to ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        seen = 0
        while True:
            for e in self.events[seen:]:
                if predicate(e):
                    return e
            seen = len(self.events)
            left = end - loop.time()
            if left <= 0:
                raise AssertionError(f"no matching flow event in {timeout}s; got {self.events}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def final_for(self, path: str, timeout: float = 5.0) -> dict[str, Any]:
        """The final event of the flow whose path is ``path``."""
        return await self.wait_for(lambda e: e["event"] != "started" and e["path"] == path, timeout)


# -- raw clients -------------------------------------------------------------------------
async def run_curl(*args: str, timeout: float = 30.0) -> tuple[int, bytes, bytes]:
    """Run ``curl -sS args...`` without blocking the loop the proxy runs on.

    Returns (exit code, stdout, stderr); the process is killed after ``timeout``.
    """
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "--silent",
        "--show-error",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


class RawResponse:
    """One HTTP/1.x response as read off the wire (body already de-chunked)."""

    def __init__(
        self, version: str, status: int, headers: list[tuple[str, str]], body: bytes, chunked: bool
    ) -> None:
        self.version = version
        self.status = status
        self.headers = headers
        self.body = body
        self.chunked = chunked  # the body came with Transfer-Encoding: chunked

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]


class RawClient:
    """A plain TCP client on the running loop: exact bytes out, bytes and EOF in.

    Reads go through the socket directly (not a StreamReader), so bytes received
    before a connection reset are still returned.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray()
        self.eof = False

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        return cls(sock)

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    @property
    def local_port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    async def send(self, data: bytes) -> bool:
        """Send ``data``; False if the peer closed or reset the connection meanwhile."""
        try:
            await self.loop.sock_sendall(self.sock, data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def shutdown_write(self) -> None:
        """Half-close: the peer sees EOF, we can still read."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()

    async def _fill(self) -> bool:
        """Read more into ``buf``; False at EOF (or a reset)."""
        if self.eof:
            return False
        try:
            data = await self.loop.sock_recv(self.sock, 65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    async def read_until_eof(self, timeout: float = 2.0) -> bytes:
        """All bytes until the peer closes; TimeoutError if it is still open at ``timeout``."""
        async with asyncio.timeout(timeout):
            while await self._fill():
                pass
        data = bytes(self.buf)
        self.buf.clear()
        return data

    async def closed_by_peer(self, timeout: float = 2.0) -> bool:
        """True if the peer closes within ``timeout`` without sending anything more."""
        try:
            rest = await self.read_until_eof(timeout)
        except TimeoutError:
            return False
        return rest == b""

    async def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self._fill():
                raise EOFError(f"connection closed: wanted {n} bytes, have {len(self.buf)}")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def _line(self, sep: bytes = b"\r\n") -> bytes:
        while (i := self.buf.find(sep)) < 0:
            if not await self._fill():
                raise EOFError(f"connection closed before {sep!r}; have {bytes(self.buf)[:200]!r}")
        return await self._take(i + len(sep))

    async def read_response(self, head: bool = False, timeout: float = 5.0) -> RawResponse:
        """Read one response; ``head``: it answers a HEAD request (no body follows)."""
        async with asyncio.timeout(timeout):
            raw = await self._line(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            version, _, rest = lines[0].partition(" ")
            status = int(rest.split(" ", 1)[0])
            headers = []
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers.append((name, value.strip()))
            resp = RawResponse(version, status, headers, b"", False)
            te = (resp.header("transfer-encoding") or "").lower()
            length = resp.header("content-length")
            if head or status < 200 or status in (204, 304):
                return resp
            if "chunked" in te:
                resp.chunked = True
                parts = []
                while True:
                    size = int((await self._line()).split(b";")[0].strip(), 16)
                    if size == 0:
                        while await self._line() != b"\r\n":  # trailers
                            pass
                        break
                    parts.append((await self._take(size + 2))[:-2])
                resp.body = b"".join(parts)
            elif length is not None:
                resp.body = await self._take(int(length))
            else:
                while await self._fill():
                    pass
                resp.body = bytes(self.buf)
                self.buf.clear()
            return resp


# -- the CLI as a process ----------------------------------------------------------------
PROXYFLEET = Path(sys.executable).parent / "proxyfleet"


def cli_env(tmp_path: Path, **values: str) -> dict[str, str]:
    """This environment without FLEET_* variables, plus a data dir and ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_DATA_DIR=str(tmp_path / "data"), FLEET_NATS_CONNECT_TIMEOUT="5")
    env.update(values)
    return env


async def run_cli_to_exit(
    command: str, env: dict[str, str], timeout: float = 15.0
) -> tuple[int, str]:
    """Run ``proxyfleet <command>`` until it exits; (exit code, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        str(PROXYFLEET),
        command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err.decode()


def reason_line(command: str, stderr: str) -> str:
    """The one line the CLI prints on a start-up failure (the last one on stderr)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    reasons = [line for line in lines if line.startswith(f"proxyfleet {command}:")]
    assert reasons == [lines[-1]], stderr
    return lines[-1]
