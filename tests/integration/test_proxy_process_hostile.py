"""The hostile cases a user would meet first, against a real ``proxyfleet proxy`` process
on an authenticated NATS, with curl and raw sockets: smuggling through ``Connection``,
the raw NATS port through the proxy, and recording that keeps going afterwards."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.integration.harness import PROXYFLEET, FlowEvents, cli_env, free_port, run_curl
from tests.integration.rawupstream import WireClient, raw_upstream

pytestmark = pytest.mark.timeout(60)


async def test_real_process_refuses_smuggling_and_the_nats_port(
    nats_url: str, tmp_path: Path
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    replica = f"proc-{free_port()}"
    env = cli_env(
        tmp_path, FLEET_NATS_URL=nats_url, FLEET_PROXY_LISTEN=listen, FLEET_REPLICA_ID=replica
    )
    flows = FlowEvents()
    await flows.start(nats_url, replica)
    proc = await asyncio.create_subprocess_exec(
        str(PROXYFLEET), "proxy", stdout=asyncio.subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        assert listen in (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        port = int(listen.rsplit(":", 1)[1])
        async with raw_upstream() as up:
            # the body hides a second request; Connection tries to strip its framing
            hidden = f"GET /hidden HTTP/1.1\r\nHost: {up.authority}\r\n\r\n".encode()
            smuggle = (
                f"POST {up.url}/outer HTTP/1.1\r\nHost: {up.authority}\r\n"
                f"Connection: Content-Length\r\nContent-Length: {len(hidden)}\r\n\r\n"
            ).encode() + hidden
            async with await WireClient.connect(port) as client:
                await client.send(smuggle)
                resp = await client.response(timeout=5)
            assert resp is not None and resp.status == 200
            assert resp.body == b"POST /outer"
            rc, out, err = await run_curl("-x", f"http://{listen}", f"{up.url}/after")
            assert rc == 0, err
            assert out == b"GET /after"
            targets = [r.target for r in up.requests]
            assert targets == ["/outer", "/after"], targets  # /hidden never became a request
            outer = up.requests[0]
            assert outer.header("content-length") == str(len(hidden))
            assert outer.body == hidden
        # the raw NATS port through the proxy: refused, nothing relayed
        nats = urlsplit(nats_url)
        rc, out, _ = await run_curl(
            "-x", f"http://{listen}", "-s", "-o", "-", "-w", "%{http_code}",
            f"http://127.0.0.1:{nats.port}/",
        )  # fmt: skip
        assert out.endswith(b"403") and b"INFO" not in out, out
        await flows.wait_for(lambda e: e["path"] == "/after" and e["event"] == "completed")
        refused = await flows.wait_for(lambda e: e["event"] == "error" and e["port"] == nats.port)
        assert "proxyfleet endpoint" in refused["error"]
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 20)
        await flows.stop()
    assert proc.returncode == 0
