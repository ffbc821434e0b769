"""Capture under hostile sizes, against a real nats-server with a 1 MiB ``max_payload``
(the NATS default): a response header over 1 MiB, many concurrent 1 MiB downloads, a
stream that refuses big messages, and NATS down with 1 MiB bodies (issue 7, items 1, 8).

What must hold: every message fits the server's limit, nothing is retried unchanged
forever (a later normal flow is still recorded), what could not be sent is counted, and
while NATS is down the capture queue holds a bounded number of bytes.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from libs.common import subjects
from libs.common.natsserver import EmbeddedNats
from tests.integration.conftest import MakeProxy
from tests.integration.harness import FlowEvents, ProxyUnderTest, Upstream, raw_server
from tests.integration.test_control import eventually, read_stream, wait_bus
from tests.integration.test_observability import scrape, value

pytestmark = pytest.mark.timeout(90)

MIB = 1 << 20
P = "proxyfleet_proxy_"


@pytest.fixture
def small_nats(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """A NATS of this test's own with the stock 1 MiB max_payload."""
    server = EmbeddedNats(tmp_path / "nats-1m", max_payload=MIB, log_file=tmp_path / "nats.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _recorder(url: str, p: ProxyUnderTest) -> FlowEvents:
    events = FlowEvents()
    await events.start(url, p.id)
    return events


async def test_huge_header_and_concurrent_downloads_do_not_stop_capture(
    small_nats: EmbeddedNats, make_proxy: MakeProxy, upstream: Upstream
) -> None:
    url = small_nats.url
    p = await make_proxy(nats_url=url, proxy_metrics_listen="127.0.0.1:0")
    assert p.replica.bus is not None and p.replica.bus.max_payload == MIB
    rec = await _recorder(url, p)

    async def huge_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Huge: "
            + b"h" * (1536 * 1024)
            + b"\r\n\r\nok"
        )
        await writer.drain()
        writer.close()

    try:
        async with (
            raw_server(huge_header) as port,
            httpx.AsyncClient(proxy=p.url, timeout=30) as client,
        ):
            # a response head over 1 MiB: relayed (then recorded trimmed) or refused (502)
            resp = await client.get(f"http://127.0.0.1:{port}/huge")
            assert resp.status_code in (200, 502)
            big = await rec.final_for("/huge", timeout=10)
            if big["response"] is not None and big["response"]["status"] == 200:
                assert big["response"]["headers_truncated"] is True
                assert big["response"]["truncated"] is True

            # many 1 MiB downloads at once: their events (1.33 MiB each as base64) are
            # shrunk to fit one message, and batches stay within max_payload
            n = 60
            got = await asyncio.gather(
                *(client.get(f"{upstream.http}/bytes/{MIB}?i={i}") for i in range(n))
            )
            assert all(r.status_code == 200 and len(r.content) == MIB for r in got)

            resp = await client.get(f"{upstream.http}/echo/after")  # capture still works
            assert resp.status_code == 200
            after = await rec.final_for("/echo/after", timeout=20)
            assert after["state"] == "completed"

        finals = rec.final()
        downloads = [e for e in finals.values() if e["path"].startswith(f"/bytes/{MIB}?i=")]
        assert len(downloads) == n
        assert all(e["response"]["truncated"] and e["response"]["size"] == MIB for e in downloads)
        assert all(len(m.data) <= MIB for m in rec.messages)
        cap = p.ctx.capture
        assert cap.truncated >= n and cap.undeliverable == 0
        metrics = p.replica.metrics
        assert metrics is not None
        s = await scrape(metrics.address)
        assert value(s, P + "flow_events_truncated_total") == cap.truncated
        assert value(s, P + "flow_events_undeliverable_total", event="final") == 0
    finally:
        await rec.stop()


async def test_refused_message_is_dropped_counted_and_capture_goes_on(
    small_nats: EmbeddedNats, make_proxy: MakeProxy, upstream: Upstream
) -> None:
    """The FLOWS stream refuses messages over 64 KiB (an operator's max_msg_size): such a
    batch is split, the event that alone is too big is dropped and counted, not retried
    forever; the flows after it are recorded."""
    url = small_nats.url
    p = await make_proxy(nats_url=url, proxy_metrics_listen="127.0.0.1:0")
    nc = await nats.connect(url)
    rec = await _recorder(url, p)
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.FLOWS_STREAM)
        info.config.max_msg_size = 64 * 1024
        await js.update_stream(info.config)
        async with httpx.AsyncClient(proxy=p.url, timeout=30) as client:
            assert (await client.get(f"{upstream.http}/bytes/200000")).status_code == 200
            for i in range(3):
                assert (await client.get(f"{upstream.http}/echo/n{i}")).status_code == 200
            for i in range(3):
                await rec.final_for(f"/echo/n{i}", timeout=10)
        cap = p.ctx.capture

        async def counted() -> bool:
            return cap.undeliverable_final == 1

        await eventually(counted, 10.0, "the refused event counted")
        # the core subscription saw the refused message go by; the stream did not keep it
        normal = {"/echo/n0", "/echo/n1", "/echo/n2"}

        def finals(ev: list[dict[str, Any]]) -> set[str]:
            return {e["path"] for e in ev if e["event"] != "started"}

        stored = await read_stream(url, p.id, lambda ev: finals(ev) >= normal, timeout=10)
        assert finals(stored) == normal
        metrics = p.replica.metrics
        assert metrics is not None
        s = await scrape(metrics.address)
        assert value(s, P + "flow_events_undeliverable_total", event="final") == 1
    finally:
        await rec.stop()
        await nc.close()


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_queue_is_bounded_by_bytes_while_nats_is_down(
    restartable_nats: EmbeddedNats, make_proxy: MakeProxy, upstream: Upstream
) -> None:
    bound = 8 * MIB
    url = restartable_nats.url
    p = await make_proxy(nats_url=url, capture_queue_bytes=bound)
    cap = p.ctx.capture
    await asyncio.to_thread(restartable_nats.stop)
    await wait_bus(p, connected=False)
    n = 64

    async def download(client: httpx.AsyncClient, i: int) -> None:
        resp = await client.get(f"{upstream.http}/bytes/{MIB}?d={i}")
        assert resp.status_code == 200 and len(resp.content) == MIB

    async with httpx.AsyncClient(proxy=p.url, timeout=30) as client:
        await asyncio.gather(*(download(client, i) for i in range(4)))  # warm up allocators
        gc.collect()
        before = _rss()
        for start in range(4, n, 8):
            await asyncio.gather(*(download(client, i) for i in range(start, start + 8)))
            assert cap.queued_bytes <= bound
    gc.collect()
    grown = _rss() - before

    assert cap.queued_bytes <= bound
    assert cap.dropped_final > 0
    alive = {id(f): f for f, _ in cap._queue}.values()
    held = sum(len(c) for f in alive for c in f.req_body + f.resp_body)
    assert held <= bound  # what the queue really keeps alive, not just what it counts
    # unbounded, the queue would keep 64 MiB of bodies; allow the bound plus slack
    assert grown < bound + 24 * MIB, f"RSS grew {grown / MIB:.0f} MiB"

    await asyncio.to_thread(restartable_nats.start)  # what was kept goes out
    rec = FlowEvents()
    await rec.start(url, p.id)
    try:

        async def drained() -> bool:
            return cap.pending == 0

        await eventually(drained, 20.0, "the queue drained after NATS came back")
        assert cap.queued_bytes == 0
    finally:
        await rec.stop()
