"""Real parts for integration tests: upstream servers on 127.0.0.1 (plain and TLS,
signed by a test CA), an in-process proxy replica, and a reader of flow events
from the FLOWS stream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import orjson
from aiohttp import WSMsgType, web

from libs.common import subjects
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
        await web.TCPSite(self._runner, "127.0.0.1", self.http_port).start()
        tls = self.ca.server_context("127.0.0.1")
        await web.TCPSite(self._runner, "127.0.0.1", self.https_port, ssl_context=tls).start()

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
        await self._nc.flush()

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
