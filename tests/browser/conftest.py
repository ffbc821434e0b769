"""Browser tests: Debian's Chromium (``/usr/bin/chromium``, installed by ``make browser``,
never a downloaded browser build) driven by Playwright, against a whole ``proxyfleet up``
per test module. Without the browser these tests fail; they never skip."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.e2e.conftest import system, upstream, upstream_ca
from tests.e2e.system import System

__all__ = ["system", "upstream", "upstream_ca"]


def chromium_path() -> str:
    """Debian's chromium (``FLEET_TEST_CHROMIUM`` names another binary)."""
    found = os.environ.get("FLEET_TEST_CHROMIUM") or shutil.which("chromium")
    if not found:
        pytest.fail("no chromium: run `make browser` (apt-get install chromium)", pytrace=False)
    return found


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(
            executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh browser context (no cookies) and page; a script error fails the test."""
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        await context.close()
    assert not errors, f"script errors in the page: {errors}"


async def sign_in(page: Page, system: System, key: str | None = None, target: str = "") -> None:
    """Sign in through the form (the key typed in, as a person would)."""
    await page.goto(f"{system.api}/ui/login" + (f"?next={target}" if target else ""))
    await page.fill("#key", key if key is not None else system.key)
    await page.click("button[type=submit]")
    await page.wait_for_url(lambda url: "/ui/login" not in url)


# A 1x1 red PNG: enough for the detail view to show an image.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de"
    "0000000c4944415408d763f8cfc000000301010018dd8db40000000049454e44ae426082"
)
HOSTILE_HTML = (
    b"<html><body><script>window.__pwned = 1; fetch('/api/keys', {method: 'POST'})</script>"
    b"<img src=x onerror='window.__pwned = 2'></body></html>"
)


@pytest.fixture
async def site() -> AsyncIterator[str]:
    """A website of the test's own (real aiohttp on 127.0.0.1): JSON, gzip, an image,
    hostile HTML, and a path that answers whatever status it names."""
    import gzip

    from aiohttp import web

    async def json_page(request: web.Request) -> web.Response:
        return web.json_response({"hello": "browser", "items": [1, 2, 3], "path": request.path})

    async def gzipped(request: web.Request) -> web.Response:
        body = gzip.compress(b'{"compressed": true, "text": "unzipped in the UI"}')
        return web.Response(
            body=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    async def binary(request: web.Request) -> web.Response:
        return web.Response(body=bytes(range(256)), content_type="application/octet-stream")

    async def hostile(request: web.Request) -> web.Response:
        return web.Response(body=HOSTILE_HTML, content_type="text/html")

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="status")

    async def trickle(request: web.Request) -> web.StreamResponse:
        """A response that never ends by itself (a byte a second): a flow to kill."""
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        for _ in range(120):
            await resp.write(b".")
            await asyncio.sleep(1)
        return resp

    app = web.Application()
    app.router.add_get("/json{tail:.*}", json_page)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/image.png", image)
    app.router.add_get("/binary", binary)
    app.router.add_get("/hostile{tail:.*}", hostile)
    app.router.add_route("*", "/status/{code}{tail:.*}", status)
    app.router.add_get("/trickle{tail:.*}", trickle)
    runner = web.AppRunner(app)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    port = tcp._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def through_proxy(system: System, url: str, method: str = "GET") -> int:
    """One request through the fleet's proxy (a real client); its status."""
    import httpx

    async with httpx.AsyncClient(proxy=system.proxy, timeout=15) as client:
        return (await client.request(method, url)).status_code
