"""Completion-to-visible latency: how long after a response reaches the client is
its flow listed by ``GET /api/flows``? (Target: p99 <= 200 ms.)

Starts ``proxyfleet up`` (embedded NATS, store, API, proxy) on free ports in a
temporary data dir and an aiohttp upstream, then sends requests one at a time
through the proxy; after each response it polls the API every 2 ms until the
flow is listed as completed. Usage: python bench/visibility.py [N]
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from aiohttp import web

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def main(n: int) -> None:
    data = Path(tempfile.mkdtemp(prefix="pf-visibility-"))
    proxy, api = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_DATA_DIR=str(data), FLEET_PROXY_LISTEN=proxy, FLEET_API_LISTEN=api)
    env["FLEET_LOG_LEVEL"] = "WARNING"
    up = await asyncio.create_subprocess_exec(
        str(BIN / "proxyfleet"), "up", env=env, stdout=subprocess.DEVNULL
    )
    app = web.Application()
    app.router.add_get("/{tail:.*}", lambda r: web.Response(text="ok"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        key_file = data / "api-key"
        async with httpx.AsyncClient(base_url=f"http://{api}", timeout=10) as client:
            for _ in range(300):
                if key_file.exists():
                    client.headers["X-API-Key"] = key_file.read_text().strip()
                    try:
                        if (await client.get("/api/flows?limit=1")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                await asyncio.sleep(0.1)
            latencies = []
            async with httpx.AsyncClient(proxy=f"http://{proxy}") as traffic:
                for i in range(n):
                    path = f"/visible/{i}"
                    await traffic.get(f"http://127.0.0.1:{port}{path}")
                    done = time.perf_counter()
                    while True:
                        r = await client.get(
                            "/api/flows", params={"limit": 5, "state": "completed"}
                        )
                        if any(f["path"] == path for f in r.json()["flows"]):
                            latencies.append((time.perf_counter() - done) * 1000)
                            break
                        await asyncio.sleep(0.002)
        latencies.sort()
        p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)]
        print(
            f"completion-to-visible over {n} flows: p50 {statistics.median(latencies):.1f} ms, "
            f"p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms (target p99 <= 200 ms)"
        )
    finally:
        await runner.cleanup()
        up.send_signal(signal.SIGINT)
        await asyncio.wait_for(up.wait(), 30)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 300))
