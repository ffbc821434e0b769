"""The management API on a real uvicorn server in the test's event loop, and an SSE reader.

httpx's ASGITransport hands a response over only when the app has finished, so an
endless SSE stream needs a real HTTP server; uvicorn runs here as ``proxyfleet api``
runs it (``services.api.main._Server``), on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import uvicorn

from libs.common.settings import ApiSettings
from services.api.app import create_app, end_streams
from services.api.main import _Server, bind


@dataclass
class ApiServer:
    url: str
    app: Any
    server: uvicorn.Server


@contextlib.asynccontextmanager
async def serve_api(settings: ApiSettings) -> AsyncIterator[ApiServer]:
    """The API on 127.0.0.1:<free port> until the block ends."""
    sock = bind("127.0.0.1:0")
    app = create_app(settings)
    config = uvicorn.Config(app, lifespan="on", log_config=None, access_log=False)
    config.timeout_graceful_shutdown = 5
    server = _Server(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the API server did not start")
            await asyncio.sleep(0.01)
        host, port = sock.getsockname()[:2]
        yield ApiServer(f"http://{host}:{port}", app, server)
    finally:
        end_streams(app)
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)
        sock.close()


@dataclass
class Event:
    """One SSE event as a client sees it."""

    event: str = "message"
    id: str | None = None
    data: str = ""
    comments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return orjson.loads(self.data)


def parse(lines: list[str]) -> Event | None:
    """One SSE event from its lines (None if it has no data: only comments)."""
    ev = Event()
    data: list[str] = []
    for line in lines:
        if line.startswith(":"):
            ev.comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "id":
            ev.id = value
        elif name == "event":
            ev.event = value
    if not data:
        return None
    ev.data = "\n".join(data)
    return ev


class SSEClient:
    """Reads a ``text/event-stream`` response event by event (httpx, streaming)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.comments: list[str] = []
        self._lines = response.aiter_lines()

    async def next(self, timeout: float = 5.0) -> Event:
        """The next event with data (comments are collected in ``comments``)."""
        async with asyncio.timeout(timeout):
            block: list[str] = []
            async for line in self._lines:
                if line:
                    block.append(line)
                    continue
                ev = parse(block)
                self.comments += [ln[1:].strip() for ln in block if ln.startswith(":")]
                block = []
                if ev is not None:
                    return ev
            raise EOFError("the stream ended")

    async def take(self, n: int, timeout: float = 5.0) -> list[Event]:
        return [await self.next(timeout) for _ in range(n)]

    async def until(self, predicate: Any, timeout: float = 10.0) -> list[Event]:
        """Events up to and including the first that satisfies ``predicate``."""
        out: list[Event] = []
        async with asyncio.timeout(timeout):
            while True:
                ev = await self.next(timeout)
                out.append(ev)
                if predicate(ev):
                    return out


@contextlib.asynccontextmanager
async def sse(
    base: str, path: str, headers: dict[str, str], params: dict[str, Any] | None = None
) -> AsyncIterator[SSEClient]:
    """An open SSE stream of ``path`` (a 200 ``text/event-stream`` response)."""
    async with (
        httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(30.0)) as client,
        client.stream("GET", path, headers=headers, params=params) as resp,
    ):
        assert resp.status_code == 200, (await resp.aread()).decode()
        assert resp.headers["content-type"].startswith("text/event-stream")
        stream = SSEClient(resp)
        yield stream
