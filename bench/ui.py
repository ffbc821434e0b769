"""Web UI benchmark, through a real browser (Debian's chromium driven by Playwright).

    .venv/bin/python bench/ui.py [--db-flows 1000000] [--minutes 10] [--rate 500]
        [--reuse-db FILE] [--keep-db FILE]

1. Fills a SQLite flow database with ``--db-flows`` synthetic flows over six days (the
   store benchmark's generator), then runs ``proxyfleet up`` on it (free ports, a
   temporary data dir) and signs a browser in.
2. Time to first page: ``/ui/flows`` opened in a fresh tab until its 100 rows are drawn
   (wall time seen by the driver; median and worst of ``--loads``).
3. Time to apply a filter: typed into the filter bar, Enter, until the page is redrawn,
   for a few kinds of filter (indexed host, status, a combination, a URL substring).
4. Live traffic: ``--rate`` requests/s through the proxy (a load process of its own, to a
   local upstream) for ``--minutes`` with the flows view open and live; every 30 s the
   tab's JS heap, DOM node count and renderer RSS, and how many live events it received.

Prints a summary and writes ``bench/.run/ui.json``. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import httpx  # noqa: E402
import psutil  # noqa: E402
from playwright.async_api import Page, async_playwright  # noqa: E402

from bench.infra import free_port  # noqa: E402
from bench.store_ingest import fill  # noqa: E402

BIN = Path(sys.executable).parent
OUT = ROOT / "bench" / ".run" / "ui.json"
FILTERS = {
    "host (indexed)": "~d api.svc3.example.com",
    "status": "~c 503",
    "method & host & status": "~m POST & ~d svc1.example.com & ~c 200",
    "URL substring": "~u site42",
}

LOAD = r"""
import asyncio, sys, time
import aiohttp
from aiohttp import web

async def main(proxy, rate, seconds, port_file):
    async def ok(request):
        return web.Response(text="ok " * 50, content_type="text/plain")
    app = web.Application()
    app.router.add_get("/{tail:.*}", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    sent = 0
    conn = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def one(i):
            async with session.get(f"http://127.0.0.1:{port}/live/{i}", proxy=proxy) as r:
                await r.read()
        start = time.monotonic()
        tasks = set()
        while time.monotonic() - start < seconds:
            due = int((time.monotonic() - start) * rate)
            while sent < due:
                t = asyncio.ensure_future(one(sent))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks, return_exceptions=True)
    print(sent, flush=True)
    await runner.cleanup()

asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), None))
"""


def log(msg: str) -> None:
    print(f"[ui-bench] {msg}", flush=True)


def start_system(data: Path) -> tuple[subprocess.Popen[bytes], str, str, str]:
    proxy, api = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        FLEET_DATA_DIR=str(data),
        FLEET_PROXY_LISTEN=proxy,
        FLEET_API_LISTEN=api,
        FLEET_PROXY_METRICS_LISTEN=f"127.0.0.1:{free_port()}",
        FLEET_STORE_METRICS_LISTEN=f"127.0.0.1:{free_port()}",
        FLEET_LOG_LEVEL="WARNING",
    )
    out = (data / "up.log").open("wb")
    proc = subprocess.Popen([str(BIN / "proxyfleet"), "up"], env=env, stdout=out, stderr=out)
    key_file = data / "api-key"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit((data / "up.log").read_text()[-2000:])
        if key_file.exists():
            key = key_file.read_text().strip()
            try:
                r = httpx.get(f"http://{api}/api/flows?limit=1", headers={"X-API-Key": key})
                if r.status_code == 200:
                    return proc, f"http://{proxy}", f"http://{api}", key
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    raise SystemExit("proxyfleet up did not become ready")


async def first_page(page: Page, api: str) -> float:
    t0 = time.perf_counter()
    await page.goto(f"{api}/ui/flows?live=0")
    await page.wait_for_selector("#app[data-loaded] #flow-rows tr")
    return (time.perf_counter() - t0) * 1000


async def apply_filter(page: Page, q: str) -> tuple[float, int]:
    before = await page.get_attribute("#app", "data-loaded")
    await page.fill("#filter", q)
    t0 = time.perf_counter()
    await page.press("#filter", "Enter")
    await page.wait_for_function(
        "b => document.getElementById('app').dataset.loaded !== b", arg=before, timeout=60_000
    )
    took = (time.perf_counter() - t0) * 1000
    return took, await page.locator("#flow-rows tr").count()


def renderer_rss(browser_pid: int) -> int:
    best = 0
    for p in psutil.Process(browser_pid).children(recursive=True):
        try:
            if "--type=renderer" in " ".join(p.cmdline()):
                best = max(best, p.memory_info().rss)
        except psutil.Error:
            continue
    return best


async def sample(page: Page, cdp: Any, browser_pid: int) -> dict[str, Any]:
    metrics = {m["name"]: m["value"] for m in (await cdp.send("Performance.getMetrics"))["metrics"]}
    return {
        "js_heap_mb": round(metrics.get("JSHeapUsedSize", 0) / 2**20, 1),
        "dom_nodes": int(metrics.get("Nodes", 0)),
        "renderer_rss_mb": round(renderer_rss(browser_pid) / 2**20, 1),
        "rows": await page.locator("#flow-rows tr").count(),
        "live_events": int(await page.get_attribute("#app", "data-seen") or 0),
        "final_events": int(await page.get_attribute("#app", "data-finals") or 0),
    }


async def run(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    db = data / "flows.db"
    if args.reuse_db:
        shutil.copy(args.reuse_db, db)
        log(f"database copied from {args.reuse_db}")
    else:
        log(f"filling {args.db_flows:,} flows ...")
        t0 = time.perf_counter()
        await fill(db, args.db_flows)
        log(f"filled in {time.perf_counter() - t0:.0f}s ({db.stat().st_size >> 20} MiB)")
        if args.keep_db:
            shutil.copy(db, args.keep_db)
    proc, proxy, api, key = start_system(data)
    result: dict[str, Any] = {"db_flows": args.db_flows, "rate": args.rate}
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                args=["--no-sandbox", "--disable-gpu"],
            )
            browser_pid = next(
                p.pid
                for p in psutil.Process().children(recursive=True)
                if "chromium" in p.name() and "--type=" not in " ".join(p.cmdline())
            )
            context = await browser.new_context(viewport={"width": 1400, "height": 900})
            page = await context.new_page()
            await page.goto(f"{api}/ui/login?next=/ui/flows%3Flive%3D0")
            await page.fill("#key", key)
            await page.click("button[type=submit]")
            await page.wait_for_selector("#app[data-loaded]")

            loads = [await first_page(page, api) for _ in range(args.loads)]
            result["first_page_ms"] = {
                "median": round(statistics.median(loads), 1),
                "max": round(max(loads), 1),
            }
            log(f"first page: median {statistics.median(loads):.0f} ms, max {max(loads):.0f} ms")
            result["filters"] = {}
            for name, q in FILTERS.items():
                times = []
                rows = 0
                for _ in range(3):
                    await first_page(page, api)
                    took, rows = await apply_filter(page, q)
                    times.append(took)
                result["filters"][name] = {
                    "q": q,
                    "median_ms": round(statistics.median(times), 1),
                    "max_ms": round(max(times), 1),
                    "rows": rows,
                }
                log(f"filter {q!r}: median {statistics.median(times):.0f} ms ({rows} rows)")

            if args.minutes > 0:
                await page.goto(f"{api}/ui/flows")
                await page.wait_for_selector("#live-state[data-state=live]")
                cdp = await context.new_cdp_session(page)
                await cdp.send("Performance.enable")
                seconds = args.minutes * 60
                load = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    LOAD,
                    proxy,
                    str(args.rate),
                    str(seconds),
                    stdout=asyncio.subprocess.PIPE,
                )
                samples = [{"t": 0, **await sample(page, cdp, browser_pid)}]
                t0 = time.monotonic()
                while load.returncode is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(load.wait(), min(30, max(1, seconds / 10)))
                    s = {"t": round(time.monotonic() - t0), **await sample(page, cdp, browser_pid)}
                    samples.append(s)
                    log(f"live {s}")
                sent = int((await load.stdout.read() if load.stdout else b"0").strip() or 0)
                await asyncio.sleep(3)
                final = {"t": round(time.monotonic() - t0), **await sample(page, cdp, browser_pid)}
                samples.append(final)
                result["live"] = {
                    "minutes": args.minutes,
                    "requests_sent": sent,
                    "events_received": final["live_events"],
                    "final_events_received": final["final_events"],
                    "samples": samples,
                }
            await browser.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return result


def report(result: dict[str, Any]) -> None:
    print()
    print(f"Web UI, {result['db_flows']:,} flows in the store (SQLite), Debian chromium headless")
    fp = result["first_page_ms"]
    print(f"  time to first page (100 rows): median {fp['median']:.0f} ms, max {fp['max']:.0f} ms")
    for name, f in result["filters"].items():
        print(f"  apply filter {name:<24} {f['median_ms']:>6.0f} ms median ({f['q']})")
    live = result.get("live")
    if live:
        first, last = live["samples"][0], live["samples"][-1]
        peak = max(s["js_heap_mb"] for s in live["samples"])
        print(
            f"  live {live['minutes']} min at {result['rate']:.0f} flows/s: "
            f"{live['requests_sent']:,} requests; the tab received {live['events_received']:,} "
            f"events, {live['final_events_received']:,} of them flows ending"
        )
        print(
            f"    JS heap {first['js_heap_mb']} -> {last['js_heap_mb']} MiB (peak {peak}), "
            f"DOM nodes {first['dom_nodes']} -> {last['dom_nodes']}, renderer RSS "
            f"{first['renderer_rss_mb']} -> {last['renderer_rss_mb']} MiB, rows {last['rows']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db-flows", type=int, default=1_000_000)
    parser.add_argument("--minutes", type=float, default=10.0, help="live traffic (0: skip)")
    parser.add_argument("--rate", type=float, default=500.0, help="live requests per second")
    parser.add_argument("--loads", type=int, default=5, help="first-page loads to time")
    parser.add_argument("--reuse-db", help="copy this flows.db instead of filling one")
    parser.add_argument("--keep-db", help="copy the filled flows.db here (for --reuse-db)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ui-bench-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2))
    report(result)
    print(f"\n(written to {OUT})")


if __name__ == "__main__":
    main()
