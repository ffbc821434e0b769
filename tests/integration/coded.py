"""An upstream that answers with content-coded, binary and corrupt bodies, for the tests
of ``decode=true`` and the HAR export (the shared harness upstream sends none of these)."""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import brotli
import zstandard
from aiohttp import web

from tests.integration.harness import free_port

TEXT = ("coded body: héllo wörld " * 64).encode()
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
BIG = os.urandom(64 << 10)  # random: gzip cannot shrink it below a small capture limit
CODERS = {
    "gzip": lambda d: gzip.compress(d, mtime=0),  # the same bytes whenever it is made
    "deflate": zlib.compress,
    "br": brotli.compress,
    "zstd": lambda d: zstandard.ZstdCompressor().compress(d),
    "gzip, br": lambda d: brotli.compress(gzip.compress(d, mtime=0)),
}
SLUGS = {name: name.replace(", ", "-") for name in CODERS}  # URL path segment per coding


def coded_app() -> web.Application:
    async def coded(request: web.Request) -> web.Response:
        name = next(n for n, slug in SLUGS.items() if slug == request.match_info["slug"])
        return web.Response(
            body=CODERS[name](TEXT),
            headers={"Content-Type": "text/plain; charset=utf-8", "Content-Encoding": name},
        )

    async def corrupt(request: web.Request) -> web.Response:
        return web.Response(
            body=b"\x1f\x8b\x08\x00 this is not a gzip stream",
            headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"},
        )

    async def big(request: web.Request) -> web.Response:
        return web.Response(
            body=gzip.compress(BIG),
            headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
        )

    async def png(request: web.Request) -> web.Response:
        return web.Response(body=PNG, headers={"Content-Type": "image/png"})

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(
            body=body,
            headers={
                "Content-Type": request.headers.get("Content-Type", "application/octet-stream"),
                "Set-Cookie": "sid=abc123; Path=/; Max-Age=60; HttpOnly",
            },
        )

    app = web.Application()
    app.router.add_get("/coded/{slug}", coded)
    app.router.add_get("/corrupt", corrupt)
    app.router.add_get("/big", big)
    app.router.add_get("/png", png)
    app.router.add_route("*", "/raw-echo", echo)
    return app


@asynccontextmanager
async def coded_upstream() -> AsyncIterator[str]:
    """Serve ``coded_app`` on 127.0.0.1; yields its base URL."""
    runner = web.AppRunner(coded_app(), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
