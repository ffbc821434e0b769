"""HTTP/1.1 relaying through the proxy, end to end: real clients (httpx, curl, raw
sockets), the in-process proxy, real upstream servers on 127.0.0.1, and the flow
events the proxy publishes to NATS."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import pytest
from aiohttp import web

from tests.integration.conftest import MakeProxy
from tests.integration.harness import (
    FlowEvents,
    ProxyUnderTest,
    RawClient,
    Upstream,
    free_port,
    raw_server,
    run_curl,
)


# -- helpers -----------------------------------------------------------------------------
def b64(data: str) -> bytes:
    return base64.b64decode(data)


def header_values(pairs: list[list[str]], name: str) -> list[str]:
    lname = name.lower()
    return [v for n, v in pairs if n.lower() == lname]


def upstream_host(upstream: Upstream) -> str:
    return f"127.0.0.1:{upstream.http_port}"


@contextlib.asynccontextmanager
async def recording(nats_url: str, proxy: ProxyUnderTest) -> AsyncIterator[FlowEvents]:
    """The flow events of a replica started with ``make_proxy``."""
    events = FlowEvents()
    await events.start(nats_url, proxy.id)
    try:
        yield events
    finally:
        await events.stop()


@pytest.fixture
async def peer_upstream() -> AsyncIterator[int]:
    """An upstream whose ``/peer`` answers the client port it sees (the proxy's side)."""

    async def peer(request: web.Request) -> web.Response:
        peername = request.transport.get_extra_info("peername") if request.transport else None
        assert peername is not None
        return web.Response(text=str(peername[1]))

    app = web.Application()
    app.router.add_get("/peer", peer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()


def absolute_get(url: str, host: str, version: str = "1.1", extra: str = "") -> bytes:
    return f"GET {url} HTTP/{version}\r\nHost: {host}\r\n{extra}\r\n".encode()


# -- Content-Length bodies, recorded in full ----------------------------------------------
async def test_get_recorded_in_full(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        resp = await client.get(
            f"{upstream.http}/echo/get?q=1", headers={"X-Test": "get", "Accept": "*/*"}
        )
    assert resp.status_code == 200
    echo = resp.json()
    assert echo["method"] == "GET"
    assert echo["path"] == "/echo/get?q=1"
    assert echo["body_len"] == 0

    ev = await flows.final_for("/echo/get?q=1")
    assert ev["event"] == "completed" and ev["state"] == "completed" and ev["error"] is None
    assert ev["kind"] == "http"
    assert ev["method"] == "GET"
    assert ev["scheme"] == "http"
    assert ev["host"] == "127.0.0.1"
    assert ev["port"] == upstream.http_port
    assert ev["http_version"] == "1.1"
    assert ev["server"] == ["127.0.0.1", upstream.http_port]
    req = ev["request"]
    assert ["X-Test", "get"] in [[n, v] for n, v in req["headers"]]
    assert header_values(req["headers"], "host") == [upstream_host(upstream)]
    assert req["size"] == 0 and req["body_b64"] == "" and req["truncated"] is False
    r = ev["response"]
    assert r["status"] == 200
    assert r["reason"] == "OK"
    assert r["http_version"] == "1.1"
    assert b64(r["body_b64"]) == resp.content
    assert r["size"] == len(resp.content)
    assert r["truncated"] is False
    assert header_values(r["headers"], "content-length") == [str(len(resp.content))]
    t = ev["timings"]
    assert t["start"] <= t["request_sent"] <= t["first_byte"] <= t["end"]
    assert t["end"] - t["start"] < 5


async def test_post_content_length_httpx(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    payload = os.urandom(3000)
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        resp = await client.post(
            f"{upstream.http}/echo/post",
            content=payload,
            headers={"Content-Type": "application/octet-stream"},
        )
    assert resp.status_code == 200
    echo = resp.json()
    assert echo["method"] == "POST"
    assert echo["body_len"] == len(payload)
    assert echo["body"].encode("latin-1") == payload
    assert header_values(echo["headers"], "content-length") == ["3000"]
    assert header_values(echo["headers"], "transfer-encoding") == []

    ev = await flows.final_for("/echo/post")
    assert ev["state"] == "completed"
    assert ev["method"] == "POST"
    req = ev["request"]
    assert req["size"] == len(payload)
    assert req["truncated"] is False
    assert b64(req["body_b64"]) == payload
    assert header_values(req["headers"], "content-length") == ["3000"]
    r = ev["response"]
    assert r["status"] == 200
    assert r["size"] == len(resp.content) and r["truncated"] is False
    assert b64(r["body_b64"]) == resp.content
    t = ev["timings"]
    assert t["start"] <= t["first_byte"] <= t["end"]


async def test_curl_post_with_repeated_headers(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents, tmp_path: Path
) -> None:
    payload = bytes(range(256)) * 3  # 768 bytes: below curl's Expect threshold
    body_file = tmp_path / "body.bin"
    body_file.write_bytes(payload)
    rc, out, err = await run_curl(
        "-x",
        proxy.url,
        "-H",
        "X-Dup: one",
        "-H",
        "X-Dup: two",
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        f"@{body_file}",
        f"{upstream.http}/echo/curl-post",
    )
    assert rc == 0, err
    echo = orjson.loads(out)
    assert echo["method"] == "POST"
    assert echo["body_len"] == len(payload)
    assert echo["body"].encode("latin-1") == payload
    assert header_values(echo["headers"], "x-dup") == ["one", "two"]

    ev = await flows.final_for("/echo/curl-post")
    assert ev["state"] == "completed"
    assert ev["method"] == "POST"
    assert ev["http_version"] == "1.1"
    headers = ev["request"]["headers"]
    # the client's headers, in order, repeated names kept
    names = [n.lower() for n, _ in headers]
    assert names.index("host") < names.index("x-dup")
    dups = [[n, v] for n, v in headers if n.lower() == "x-dup"]
    assert dups == [["X-Dup", "one"], ["X-Dup", "two"]]
    assert b64(ev["request"]["body_b64"]) == payload
    assert ev["request"]["size"] == len(payload)
    assert ev["response"]["status"] == 200
    assert b64(ev["response"]["body_b64"]) == out


async def test_curl_get(proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents) -> None:
    rc, out, err = await run_curl("-x", proxy.url, f"{upstream.http}/bytes/20000")
    assert rc == 0, err
    assert out == b"x" * 20000
    ev = await flows.final_for("/bytes/20000")
    assert ev["response"]["size"] == 20000
    assert b64(ev["response"]["body_b64"]) == out


# -- chunked bodies ---------------------------------------------------------------------
async def test_chunked_request_curl(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents, tmp_path: Path
) -> None:
    payload = os.urandom(100_000)
    body_file = tmp_path / "chunked.bin"
    body_file.write_bytes(payload)
    rc, out, err = await run_curl(
        "-x",
        proxy.url,
        "-H",
        "Transfer-Encoding: chunked",
        "-H",
        "Expect:",
        "--data-binary",
        f"@{body_file}",
        f"{upstream.http}/echo/chunked-in",
    )
    assert rc == 0, err
    echo = orjson.loads(out)
    assert echo["body_len"] == len(payload)
    assert echo["body"].encode("latin-1") == payload
    assert header_values(echo["headers"], "transfer-encoding") == ["chunked"]

    ev = await flows.final_for("/echo/chunked-in")
    assert ev["state"] == "completed"
    assert ev["request"]["size"] == len(payload)
    assert ev["request"]["truncated"] is False
    assert b64(ev["request"]["body_b64"]) == payload


async def test_chunked_request_httpx_generator(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    pieces = [os.urandom(n) for n in (1, 1000, 17, 65536, 3)]

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece
            await asyncio.sleep(0.01)

    async with httpx.AsyncClient(proxy=proxy.url) as client:
        resp = await client.post(f"{upstream.http}/echo/gen", content=body())
    assert resp.status_code == 200
    echo = resp.json()
    expected = b"".join(pieces)
    assert echo["body_len"] == len(expected)
    assert echo["body"].encode("latin-1") == expected
    ev = await flows.final_for("/echo/gen")
    assert ev["request"]["size"] == len(expected)
    assert b64(ev["request"]["body_b64"]) == expected


async def test_chunked_response_to_http11_client(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        resp = await client.get(f"{upstream.http}/chunked/30000")
    assert resp.status_code == 200
    assert resp.headers["transfer-encoding"] == "chunked"
    assert resp.content == b"c" * 30000

    # on the wire: chunked framing, then the connection is still usable
    async with await RawClient.connect(proxy.port) as raw:
        host = upstream_host(upstream)
        await raw.send(absolute_get(f"{upstream.http}/chunked/12345", host))
        r = await raw.read_response()
        assert r.status == 200
        assert r.chunked
        assert r.header("content-length") is None
        assert r.body == b"c" * 12345
        await raw.send(absolute_get(f"{upstream.http}/echo/after-chunked", host))
        r2 = await raw.read_response()
        assert r2.status == 200
        assert b'"/echo/after-chunked"' in r2.body

    ev = await flows.final_for("/chunked/12345")
    assert ev["response"]["size"] == 12345
    assert b64(ev["response"]["body_b64"]) == b"c" * 12345


# -- capture limit ------------------------------------------------------------------------
async def test_bodies_above_capture_limit(
    make_proxy: MakeProxy, upstream: Upstream, nats_url: str
) -> None:
    proxy = await make_proxy(capture_body_limit=1000)
    payload = os.urandom(50_000)
    async with recording(nats_url, proxy) as flows:
        async with httpx.AsyncClient(proxy=proxy.url) as client:
            resp = await client.post(f"{upstream.http}/echo/big", content=payload)
            down = await client.get(f"{upstream.http}/bytes/51200")
        assert resp.status_code == 200
        assert resp.json()["body_len"] == len(payload)
        assert resp.json()["body"].encode("latin-1") == payload
        assert down.content == b"x" * 51200

        up_ev = await flows.final_for("/echo/big")
        req = up_ev["request"]
        assert req["size"] == 50_000
        assert req["truncated"] is True
        assert b64(req["body_b64"]) == payload[:1000]
        r = up_ev["response"]
        assert r["size"] == len(resp.content) > 1000
        assert r["truncated"] is True
        assert b64(r["body_b64"]) == resp.content[:1000]

        down_ev = await flows.final_for("/bytes/51200")
        r = down_ev["response"]
        assert r["size"] == 51200
        assert r["truncated"] is True
        assert b64(r["body_b64"]) == b"x" * 1000
        assert down_ev["request"]["truncated"] is False


# -- keep-alive ---------------------------------------------------------------------------
async def test_keep_alive_curl_two_urls(proxy: ProxyUnderTest, peer_upstream: int) -> None:
    url = f"http://127.0.0.1:{peer_upstream}/peer"
    rc, out, err = await run_curl("-x", proxy.url, "-w", " %{num_connects}\n", url, url)
    assert rc == 0, err
    lines = out.decode().split("\n")
    first_port, first_connects = lines[0].split()
    second_port, second_connects = lines[1].split()
    assert (first_connects, second_connects) == ("1", "0")  # client side: one connection
    assert first_port == second_port  # upstream side: one connection


async def test_keep_alive_httpx_both_sides(
    proxy: ProxyUnderTest, peer_upstream: int, flows: FlowEvents
) -> None:
    url = f"http://127.0.0.1:{peer_upstream}/peer"
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(proxy=proxy.url, limits=limits) as client:
        ports = [(await client.get(url)).text for _ in range(4)]
    assert len(set(ports)) == 1, ports  # the proxy reused its upstream connection
    await flows.wait_for(lambda e: len(flows.final()) >= 4)
    events = list(flows.final().values())
    assert len(events) == 4
    assert all(e["state"] == "completed" for e in events)
    client_ports = {tuple(e["client"]) for e in events}
    assert len(client_ports) == 1, client_ports  # one client connection carried all four


# -- bodiless responses, Expect, HTTP/1.0, read-until-close --------------------------------
async def test_head_keeps_length_and_connection(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    host = upstream_host(upstream)
    async with await RawClient.connect(proxy.port) as raw:
        head = f"HEAD {upstream.http}/bytes/12345 HTTP/1.1\r\nHost: {host}\r\n\r\n"
        await raw.send(head.encode())
        r = await raw.read_response(head=True)
        assert r.status == 200
        assert r.header("content-length") == "12345"
        assert r.header("transfer-encoding") is None
        # no body bytes follow: the next response starts right away
        await raw.send(absolute_get(f"{upstream.http}/echo/after-head", host))
        r2 = await raw.read_response()
        assert r2.status == 200
        assert b'"/echo/after-head"' in r2.body
        assert raw.buf == b""
    ev = await flows.final_for("/bytes/12345")
    assert ev["method"] == "HEAD"
    assert ev["state"] == "completed"
    assert ev["response"]["size"] == 0


async def test_204_and_304_have_no_body(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    host = upstream_host(upstream)
    async with await RawClient.connect(proxy.port) as raw:
        for code in (204, 304):
            await raw.send(absolute_get(f"{upstream.http}/status/{code}", host))
            r = await raw.read_response()
            assert r.status == code
            assert r.header("transfer-encoding") is None
        await raw.send(absolute_get(f"{upstream.http}/echo/after-204", host))
        r = await raw.read_response()
        assert r.status == 200
        assert b'"/echo/after-204"' in r.body
        assert raw.buf == b""
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        assert (await client.get(f"{upstream.http}/status/204")).content == b""
    for code in (204, 304):
        ev = await flows.final_for(f"/status/{code}")
        assert ev["response"]["status"] == code
        assert ev["response"]["size"] == 0


async def test_expect_100_continue_is_fast(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents, tmp_path: Path
) -> None:
    # curl (7.88+) sends Expect: 100-continue for bodies over 1 MB, then waits up to 1 s
    payload = os.urandom(2_000_000)
    body_file = tmp_path / "expect.bin"
    body_file.write_bytes(payload)
    rc, out, err = await run_curl(
        "-x",
        proxy.url,
        "--data-binary",
        f"@{body_file}",
        "-w",
        "\n%{time_total}",
        f"{upstream.http}/echo/expect",
    )
    assert rc == 0, err
    body, _, total_b = out.rpartition(b"\n")
    total = float(total_b)
    echo = orjson.loads(body)
    assert header_values(echo["headers"], "expect") == ["100-continue"]
    assert echo["body_len"] == len(payload)
    assert echo["body"].encode("latin-1") == payload
    assert total < 0.9, f"curl waited {total}s: 100 Continue was not relayed"
    ev = await flows.final_for("/echo/expect")
    assert ev["state"] == "completed"
    assert ev["response"]["status"] == 200
    assert ev["request"]["size"] == len(payload)
    assert b64(ev["request"]["body_b64"]) == payload[: 1 << 20]  # default capture limit


async def test_http10_client_gets_response_then_close(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    host = upstream_host(upstream)
    async with await RawClient.connect(proxy.port) as raw:
        await raw.send(absolute_get(f"{upstream.http}/echo/ten", host, version="1.0"))
        r = await raw.read_response()
        assert r.status == 200
        assert b'"/echo/ten"' in r.body
        assert await raw.closed_by_peer(2.0), "proxy kept an HTTP/1.0 connection open"

    # a chunked upstream response reaches an HTTP/1.0 client close-delimited
    async with await RawClient.connect(proxy.port) as raw:
        await raw.send(absolute_get(f"{upstream.http}/chunked/5000", host, version="1.0"))
        data = await raw.read_until_eof(2.0)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") or head.startswith(b"HTTP/1.0 200")
    assert b"transfer-encoding" not in head.lower()
    assert body == b"c" * 5000

    ev = await flows.final_for("/echo/ten")
    assert ev["http_version"] == "1.0"
    assert ev["state"] == "completed"

    rc, out, err = await run_curl("-0", "-x", proxy.url, f"{upstream.http}/bytes/3000")
    assert rc == 0, err
    assert out == b"x" * 3000


async def test_read_until_close_response_rechunked(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    pieces = [b"a" * 10_000, b"b" * 70_000, b"c" * 5]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.close()

    async with raw_server(handler) as port:
        async with await RawClient.connect(proxy.port) as raw:
            await raw.send(absolute_get(f"http://127.0.0.1:{port}/eof", f"127.0.0.1:{port}"))
            r = await raw.read_response()
            assert r.status == 200
            assert r.chunked
            assert r.body == b"".join(pieces)
            # the client connection survives the upstream's close
            host = upstream_host(upstream)
            await raw.send(absolute_get(f"{upstream.http}/echo/after-eof", host))
            r2 = await raw.read_response()
            assert r2.status == 200 and b'"/echo/after-eof"' in r2.body

        async with httpx.AsyncClient(proxy=proxy.url) as client:
            resp = await client.get(f"http://127.0.0.1:{port}/eof2")
        assert resp.content == b"".join(pieces)

    ev = await flows.final_for("/eof")
    assert ev["state"] == "completed"
    assert ev["response"]["size"] == sum(map(len, pieces))
    assert ev["response"]["http_version"] == "1.0"


# -- hop-by-hop headers -----------------------------------------------------------------
async def test_hop_by_hop_headers_removed(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    host = upstream_host(upstream)
    request = (
        f"GET {upstream.http}/echo/hop HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "Connection: keep-alive, X-Hop\r\n"
        "X-Hop: 1\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "Keep-Alive: timeout=5\r\n"
        "X-End: e2e\r\n"
        "User-Agent: raw-test\r\n"
        "\r\n"
    ).encode()
    async with await RawClient.connect(proxy.port) as raw:
        await raw.send(request)
        r = await raw.read_response()
        assert r.status == 200
        seen = orjson.loads(r.body)["headers"]
        names = {n.lower() for n, _ in seen}
        for hop in ("x-hop", "proxy-connection", "keep-alive"):
            assert hop not in names, f"{hop} reached the upstream: {seen}"
        for conn_value in header_values(seen, "connection"):
            assert "x-hop" not in conn_value.lower()
        assert header_values(seen, "x-end") == ["e2e"]
        assert header_values(seen, "user-agent") == ["raw-test"]
        assert header_values(seen, "host") == [host]
        # the client asked for keep-alive: the connection stays usable
        await raw.send(absolute_get(f"{upstream.http}/echo/hop2", host))
        assert (await raw.read_response()).status == 200

    ev = await flows.final_for("/echo/hop")
    # the recorded request is what the client sent
    assert header_values(ev["request"]["headers"], "x-hop") == ["1"]


# -- large download ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_large_download_streams_in_bounded_memory(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    size = 1 << 30
    proc = psutil.Process()
    async with httpx.AsyncClient(proxy=proxy.url, timeout=60) as client:
        await client.get(f"{upstream.http}/bytes/{1 << 20}")  # warm up both sides
        baseline = proc.memory_info().rss
        peak = baseline
        received = 0
        started = time.monotonic()
        async with client.stream("GET", f"{upstream.http}/bytes/{size}") as resp:
            assert resp.status_code == 200
            assert resp.headers["content-length"] == str(size)
            n = 0
            async for chunk in resp.aiter_raw():
                received += len(chunk)
                n += 1
                if n % 64 == 0:
                    peak = max(peak, proc.memory_info().rss)
        elapsed = time.monotonic() - started
        peak = max(peak, proc.memory_info().rss)
    print(f"1 GiB through the proxy in {elapsed:.1f}s ({size / elapsed / 2**20:.0f} MiB/s)")
    assert received == size
    growth = peak - baseline
    assert growth < 50 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB during the download"
    ev = await flows.final_for(f"/bytes/{size}", timeout=10)
    assert ev["state"] == "completed"
    assert ev["response"]["size"] == size
    assert ev["response"]["truncated"] is True


# -- reverse mode -----------------------------------------------------------------------
async def test_reverse_mode(make_proxy: MakeProxy, upstream: Upstream, nats_url: str) -> None:
    proxy = await make_proxy(proxy_mode=f"reverse:{upstream.http}")
    async with recording(nats_url, proxy) as flows:
        async with httpx.AsyncClient() as client:
            resp = await client.get(f"{proxy.url}/echo/r?a=b", headers={"X-Rev": "1"})
        assert resp.status_code == 200
        echo: dict[str, Any] = resp.json()
        assert echo["path"] == "/echo/r?a=b"
        assert header_values(echo["headers"], "host") == [upstream_host(upstream)]
        assert header_values(echo["headers"], "x-rev") == ["1"]

        ev = await flows.final_for("/echo/r?a=b")
        assert ev["state"] == "completed"
        assert ev["scheme"] == "http"
        assert ev["host"] == "127.0.0.1"
        assert ev["port"] == upstream.http_port
        assert ev["response"]["status"] == 200
