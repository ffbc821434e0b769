"""The flows view in a real browser: sign in with a key, see a flow arrive live, filter
(with the error shown where it is), open a flow's detail, and what a read key may not do."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Page, expect

from tests.browser.conftest import sign_in, through_proxy
from tests.e2e.system import System
from tests.integration.harness import run_curl


async def test_sign_in_see_a_flow_arrive_live_and_open_it(
    page: Page, system: System, site: str
) -> None:
    await sign_in(page, system)
    assert page.url.endswith("/ui/flows")
    await expect(page.locator("#live-state")).to_have_text("live")
    tag = uuid.uuid4().hex[:10]
    assert await through_proxy(system, f"{site}/json/live-{tag}") == 200
    row = page.locator("#flow-rows tr", has_text=f"/json/live-{tag}")
    await expect(row).to_have_count(1, timeout=10_000)  # arrived without a reload
    await expect(row.locator("td.st")).to_have_text("200", timeout=10_000)
    await row.locator("td.path a").click()
    await page.wait_for_url(re.compile(r"/ui/flows/[^/]+$"))
    await expect(page.locator("#flow-status")).to_contain_text("200")
    body = page.locator("#response-body pre.text")
    await expect(body).to_contain_text('"hello": "browser"')  # pretty-printed JSON
    await expect(page.locator("#waterfall tr[data-phase=wait] .bar")).to_have_count(1)
    await page.get_by_role("button", name="Copy as curl").click()
    await expect(page.locator("#curl")).to_contain_text(f"/json/live-{tag}")
    async with page.expect_download() as download_info:
        await page.click("#flow-har")
    download = await download_info.value
    saved = await download.path()
    har = json.loads(await asyncio.to_thread(Path(saved).read_bytes))
    (entry,) = har["log"]["entries"]
    assert entry["request"]["url"].endswith(f"/json/live-{tag}")
    assert entry["response"]["status"] == 200


async def test_filter_narrows_the_page_and_shows_the_error_in_place(
    page: Page, system: System, site: str
) -> None:
    tag = uuid.uuid4().hex[:10]
    for code in (201, 503):
        assert await through_proxy(system, f"{site}/status/{code}/f-{tag}") == code
    await sign_in(page, system)
    rows = page.locator("#flow-rows tr")
    await page.fill("#filter", f"~u f-{tag} & ~c 503")
    await page.press("#filter", "Enter")
    await expect(rows).to_have_count(1, timeout=10_000)
    await expect(rows.first.locator("td.st")).to_have_text("503")
    # the page's waterfall: the row from the store draws its phases (send, wait, receive)
    await expect(rows.first.locator(".wfbar i.wait")).to_have_count(1)
    assert "q=" in page.url  # the filter is in the address: a reload keeps it
    await page.fill("#filter", "~c 200 & (~d")
    await page.press("#filter", "Enter")
    error = page.locator("#filter-error")
    await expect(error).to_be_visible()
    await expect(error.locator("pre.caret")).to_contain_text("^")
    caret_line = (await error.locator("pre.caret").inner_text()).splitlines()[1]
    assert caret_line.index("^") == len("~c 200 & (~d")  # at the end: something is missing
    await expect(rows).to_have_count(1)  # the last good page stays, and its live feed
    await page.wait_for_timeout(500)
    await expect(page.locator("#live-state")).to_have_text("live")
    await page.click("#help-toggle")
    await expect(page.locator("#filter-help")).to_contain_text("~d")


async def test_image_gzip_and_hostile_bodies(page: Page, system: System, site: str) -> None:
    for path in ("/image.png", "/gzip", "/binary"):
        assert await through_proxy(system, site + path) == 200
    # a path a browser would take for markup, sent as is (curl does not escape it)
    code, out, err = await run_curl(
        "-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", system.proxy,
        f"{site}/hostile/<img/src=x/onerror=window.__pwned=3>",
    )  # fmt: skip
    assert code == 0 and out == b"200", err
    await sign_in(page, system)
    await page.fill("#filter", "~u /image.png")
    await page.press("#filter", "Enter")
    first = page.locator("#flow-rows tr td.path a").first
    await expect(first).to_have_text("/image.png")  # the filtered page is drawn
    await first.click()
    await expect(page.locator("#response-body img.preview")).to_be_visible()
    assert await page.locator("#response-body img.preview").evaluate("i => i.naturalWidth") == 1

    await page.goto(f"{system.api}/ui/flows?q=~u%20/gzip")
    await expect(page.locator("#flow-rows tr td.path a").first).to_have_text("/gzip")
    await page.locator("#flow-rows tr td.path a").first.click()
    await expect(page.locator("#response-body")).to_contain_text("decoded from gzip")
    await expect(page.locator("#response-body pre.text")).to_contain_text("unzipped in the UI")

    await page.goto(f"{system.api}/ui/flows?q=~u%20/binary")
    await expect(page.locator("#flow-rows tr td.path a").first).to_have_text("/binary")
    await page.locator("#flow-rows tr td.path a").first.click()
    hexdump = page.locator("#response-body pre.hex")
    await expect(hexdump).to_contain_text("00000000  00 01 02 03 04 05 06 07")
    await expect(hexdump).to_contain_text("000000f0  f0 f1 f2")

    await page.goto(f"{system.api}/ui/flows?q=~u%20/hostile")
    link = page.locator("#flow-rows tr td.path a").first
    await expect(link).to_contain_text("<img/src=x/onerror")  # shown as text, not markup
    await link.click()
    await expect(page.locator("#response-body pre.text")).to_contain_text("<script>")
    assert await page.evaluate("window.__pwned") is None
    # the recorded page opened directly runs sandboxed: no same-origin API access
    flow_id = page.url.rsplit("/", 1)[1]
    raw = await page.goto(f"{system.api}/api/flows/{flow_id}/response/body")
    assert raw is not None and "sandbox" in raw.headers["content-security-policy"]


async def test_a_read_key_sees_everything_and_cannot_act(
    page: Page, system: System, site: str
) -> None:
    async with httpx.AsyncClient() as client:
        made = await client.post(
            f"{system.api}/api/keys",
            headers={"X-API-Key": system.key},
            json={"scope": "read", "name": "viewer"},
        )
    assert made.status_code == 201, made.text
    assert await through_proxy(system, f"{site}/json/read-only") == 200
    await sign_in(page, system, key=made.json()["secret"])
    await expect(page.locator("#scope")).to_have_text("read")
    await page.fill("#filter", "~u /json/read-only")
    await page.press("#filter", "Enter")
    first = page.locator("#flow-rows tr td.path a").first
    await expect(first).to_have_text("/json/read-only")
    await first.click()
    await expect(page.get_by_role("button", name="Replay")).to_be_disabled()
    await expect(page.get_by_role("button", name="Kill")).to_have_count(0)  # it is over
    # and the API refuses anyway, CSRF token and all
    status = await page.evaluate(
        """async () => {
            const csrf = document.querySelector('meta[name="csrf-token"]').content;
            const r = await fetch(location.pathname.replace('/ui/', '/api/') + '/replay',
                {method: 'POST', headers: {'X-CSRF-Token': csrf}});
            return [r.status, (await r.json()).code];
        }"""
    )
    assert status == [403, "AUTH_FORBIDDEN"]


async def test_session_cookie_csrf_and_sign_out(page: Page, system: System) -> None:
    await page.goto(f"{system.api}/ui/login")
    await page.fill("#key", "not-a-key")
    await page.click("button[type=submit]")
    await expect(page.locator(".error")).to_contain_text("not valid")
    assert "/ui/login" in page.url

    await sign_in(page, system, target="//evil.example/x")  # no open redirect
    assert page.url == f"{system.api}/ui/flows"
    cookies = await page.context.cookies()
    (session,) = [c for c in cookies if c["name"] == "fleet_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert system.key not in session["value"]
    assert await page.evaluate("document.cookie") == ""  # scripts cannot read it
    # a mutating call without the page's CSRF token is refused, with it allowed
    codes = await page.evaluate(
        """async () => {
            const csrf = document.querySelector('meta[name="csrf-token"]').content;
            const bad = await fetch('/api/approvals/cached', {method: 'DELETE'});
            const good = await fetch('/api/approvals/cached',
                {method: 'DELETE', headers: {'X-CSRF-Token': csrf}});
            return [bad.status, (await bad.json()).code, good.status];
        }"""
    )
    assert codes == [403, "CSRF_FAILED", 204]

    await page.click("text=Sign out")
    await page.wait_for_url(re.compile(r"/ui/login"))
    # the old session is over on the server too, not just forgotten by this browser
    async with httpx.AsyncClient(cookies={"fleet_session": session["value"]}) as client:
        stale = await client.get(f"{system.api}/api/flows?limit=1")
    assert stale.status_code == 401
    await page.goto(f"{system.api}/ui/flows")
    assert "/ui/login?next=" in page.url


async def test_api_docs_render_from_local_assets(page: Page, system: System) -> None:
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    await sign_in(page, system, target="/api/docs")
    await expect(page.locator(".swagger-ui .title")).to_contain_text(
        "proxyfleet management API", timeout=15_000
    )
    await expect(page.locator(".opblock-summary-path", has_text="/api/flows").first).to_be_visible()
    assert all(url.startswith(system.api) for url in requested), requested  # no CDN


async def test_kill_an_active_flow_from_its_page(page: Page, system: System, site: str) -> None:
    tag = uuid.uuid4().hex[:10]

    async def endless() -> None:
        async with httpx.AsyncClient(proxy=system.proxy, timeout=60) as client:
            async with client.stream("GET", f"{site}/trickle/{tag}") as r:
                async for _ in r.aiter_bytes():
                    pass

    client = asyncio.create_task(endless())
    try:
        await sign_in(page, system, target=f"/ui/flows?q=~u%20{tag}")
        row = page.locator("#flow-rows tr", has_text=tag)
        await expect(row).to_have_class(re.compile("active"), timeout=10_000)
        await row.locator("td.path a").click()
        await page.get_by_role("button", name="Kill").click()
        await expect(page.locator("#notice")).to_contain_text("Killed.")
        with pytest.raises(httpx.HTTPError):  # the client's connection was cut
            await asyncio.wait_for(client, 10)
    finally:
        client.cancel()


async def test_signing_out_in_one_tab_ends_the_live_view_in_another(
    page: Page, system: System, site: str
) -> None:
    await sign_in(page, system)
    await expect(page.locator("#live-state")).to_have_text("live")
    other = await page.context.new_page()
    await other.goto(f"{system.api}/ui/keys")
    await other.click("text=Sign out")
    await other.wait_for_url(re.compile(r"/ui/login"))
    await asyncio.sleep(2.5)  # a stream rechecks its session at most every 2 s
    assert await through_proxy(system, f"{site}/json/after-sign-out") == 200
    await page.wait_for_url(re.compile(r"/ui/login\?next="), timeout=15_000)
    await expect(page.locator("#key")).to_be_visible()


async def test_pause_stops_the_live_rows_and_live_resumes_them(
    page: Page, system: System, site: str
) -> None:
    await sign_in(page, system)
    badge, toggle = page.locator("#live-state"), page.locator("#live-toggle")
    await expect(badge).to_have_text("live")
    await toggle.click()
    await expect(badge).to_have_text("paused")
    await expect(toggle).to_have_text("Live")
    tag = uuid.uuid4().hex[:10]
    assert await through_proxy(system, f"{site}/json/paused-{tag}") == 200
    await page.wait_for_timeout(1000)
    await expect(page.locator("#flow-rows tr", has_text=f"paused-{tag}")).to_have_count(0)
    await toggle.click()
    await expect(badge).to_have_text("live")
    assert await through_proxy(system, f"{site}/json/resumed-{tag}") == 200
    await expect(page.locator("#flow-rows tr", has_text=f"resumed-{tag}")).to_have_count(1)
