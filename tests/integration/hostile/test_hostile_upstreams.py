"""Hostile upstreams (issue 7, items 3 to 7): response framing the proxy must not trust,
oversized heads, stray bytes after a response, resets mid-body, unsolicited 101."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.integration.harness import FlowEvents, ProxyUnderTest, Upstream
from tests.integration.rawupstream import (
    Request,
    UpstreamConn,
    WireClient,
    echo_line,
    flow_of,
    ok,
    raw_upstream,
    reply_each,
)

pytestmark = pytest.mark.timeout(60)


FAKE = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nhijack!"  # stray bytes a hostile upstream adds


def get(up_url: str, authority: str, path: str, extra: str = "") -> bytes:
    return f"GET {up_url}{path} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n".encode()


# -- item 3: Connection in a response may not remove its framing -------------------------------
def body_of(req: Request) -> bytes:
    return f"body of {req.target}".encode()


@pytest.mark.parametrize(
    "make",
    [
        lambda r: ok(body_of(r), b"Connection: Content-Length\r\n"),
        lambda r: ok(body_of(r), b"Connection: keep-alive, Content-Length\r\n"),
        lambda r: (
            b"HTTP/1.1 200 OK\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body_of(r)), body_of(r))
        ),
    ],
    ids=["Connection: Content-Length", "Connection: keep-alive, Content-Length", "Connection: TE"],
)
async def test_upstream_connection_header_cannot_unframe_the_response(
    proxy: ProxyUnderTest, flows: FlowEvents, make: object
) -> None:
    async with raw_upstream(reply_each(make)) as up:  # type: ignore[arg-type]
        async with await WireClient.connect(proxy.port) as client:
            first = await client.request(get(up.url, up.authority, "/one"))
            second = await client.request(get(up.url, up.authority, "/two"))
            ev = await flow_of(flows, client)
    assert (first.status, first.body, first.complete) == (200, b"body of /one", True)
    assert first.framing in ("length", "chunked")
    assert (second.status, second.body, second.complete) == (200, b"body of /two", True)
    assert ev["state"] == "completed"
    assert ev["response"]["size"] == len(b"body of /one")


# -- the classic response-splitting set -----------------------------------------------------
async def test_response_with_cl_and_te_is_refused_or_reframed(
    proxy: ProxyUnderTest, flows: FlowEvents
) -> None:
    """RFC 9112 6.3: a response with both is an error (502) or is read as chunked and sent
    on without Content-Length; either way the next response is its own."""

    def both(req: Request) -> bytes:
        body = body_of(req)
        return (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        )

    async with raw_upstream(reply_each(both)) as up:
        async with await WireClient.connect(proxy.port) as client:
            first = await client.request(get(up.url, up.authority, "/one"))
            ev = await flow_of(flows, client)
            if first.status == 502:
                assert ev["state"] == "error"
                assert await up.conns[0].wait_closed(5), "kept a connection of unknown framing"
            else:
                assert (first.status, first.body, first.complete) == (200, b"body of /one", True)
                assert not first.all("content-length"), first.headers
            if "close" in ",".join(first.all("connection")).lower():
                assert await client.closed_by_peer(2.0)
                client = await WireClient.connect(proxy.port)
            second = await client.request(get(up.url, up.authority, "/two"))
            client.close()
    assert second.status == first.status
    if second.status == 200:
        assert second.body == b"body of /two"


@pytest.mark.parametrize(
    "length",
    ["Content-Length: 5\r\nContent-Length: 6", "Content-Length: 5, 6", "Content-Length: +5"],
    ids=["two different", "list different", "plus sign"],
)
async def test_response_with_invalid_content_length_is_502(
    proxy: ProxyUnderTest, flows: FlowEvents, length: str
) -> None:
    async def bad(conn: UpstreamConn) -> None:
        await conn.next_request()
        conn.send(b"HTTP/1.1 200 OK\r\n%s\r\n\r\nhello!" % length.encode())
        await conn.drain()

    async with raw_upstream(bad) as up:
        async with await WireClient.connect(proxy.port) as client:
            resp = await client.request(get(up.url, up.authority, "/badcl"))
            ev = await flow_of(flows, client)
        assert resp.status == 502, resp
        assert await up.conns[0].wait_closed(5), "kept a connection with unknown framing"
    assert ev["state"] == "error"


async def test_response_obs_fold_is_unfolded_or_502(proxy: ProxyUnderTest) -> None:
    async with raw_upstream(reply_each(lambda r: ok(b"folded", b"X-Folded: a\r\n b\r\n"))) as up:
        async with await WireClient.connect(proxy.port) as client:
            resp = await client.request(get(up.url, up.authority, "/fold"))
        raw_names = [n for n, _ in resp.headers]
    if resp.status != 502:
        assert (resp.status, resp.body) == (200, b"folded")
        assert all(n and n[0] not in " \t" for n in raw_names), resp.headers


@pytest.mark.parametrize("status", [204, 304])
async def test_body_after_a_bodiless_status_is_stray(proxy: ProxyUnderTest, status: int) -> None:
    def bodiless_then_fake(req: Request) -> bytes:
        if req.target == "/a":
            return b"HTTP/1.1 %d Nothing\r\n\r\n" % status + FAKE
        return echo_line(req)

    async with raw_upstream(reply_each(bodiless_then_fake)) as up:
        async with await WireClient.connect(proxy.port) as a:
            first = await a.request(get(up.url, up.authority, "/a"))
            assert first.status == status
            async with await WireClient.connect(proxy.port) as b:
                second = await b.request(get(up.url, up.authority, "/b"))
        assert (second.status, second.body) == (200, b"GET /b")
        assert [[r.target for r in c.requests] for c in up.conns] == [["/a"], ["/b"]]


# -- item 4: response heads are capped ---------------------------------------------------------
async def assert_others_served(proxy: ProxyUnderTest, upstream: Upstream) -> None:
    async with httpx.AsyncClient(proxy=proxy.url, timeout=5) as client:
        resp = await client.get(f"{upstream.http}/echo/meanwhile")
    assert resp.status_code == 200
    assert resp.json()["path"] == "/echo/meanwhile"


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (2 << 20) + b"\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(2100))
        + b"Content-Length: 2\r\n\r\nok",
    ],
    ids=["one 2 MiB header line", "2100 headers of 1 KB"],
)
async def test_oversized_response_head_is_502(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents, head: bytes
) -> None:
    async def big(conn: UpstreamConn) -> None:
        await conn.next_request()
        conn.send(head)
        await conn.drain()

    async with raw_upstream(big) as up:
        async with await WireClient.connect(proxy.port) as client:
            resp = await client.request(get(up.url, up.authority, "/bighead"), timeout=5)
            ev = await flow_of(flows, client)
    assert resp.status == 502, resp.body[:200]
    assert ev["state"] == "error"
    assert ev["response"]["status"] == 502
    assert ev["error"]
    assert proxy.ctx.upstream_faults["head_too_large"] == 1  # counted (metrics read it)
    await assert_others_served(proxy, upstream)


async def test_endless_response_head_is_cut_while_others_are_served(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    """A header line that never ends (up to 64 MiB): the proxy answers 502 once its cap
    is passed, without waiting for the end; other clients are served meanwhile."""
    sending = asyncio.Event()

    async def endless(conn: UpstreamConn) -> None:
        await conn.next_request()
        conn.send(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        for _ in range(1024):  # 64 KiB at a time, 64 MiB at most
            conn.send(b"a" * 65536)
            sending.set()
            if not await conn.drain() or conn.eof:
                return

    async with raw_upstream(endless) as up:
        async with await WireClient.connect(proxy.port) as client:
            await client.send(get(up.url, up.authority, "/endless"))
            await asyncio.wait_for(sending.wait(), 5)
            await assert_others_served(proxy, upstream)
            resp = await client.response(timeout=5)
            ev = await flow_of(flows, client)
        assert resp.status == 502
        assert await up.conns[0].wait_closed(5), "the upstream connection was kept open"
    assert ev["state"] == "error"
    assert ev["response"]["status"] == 502


# -- item 5: stray bytes after a response ------------------------------------------------------


async def test_clean_upstream_connection_is_reused(proxy: ProxyUnderTest) -> None:
    """The control for the stray-bytes tests: without stray bytes the pool reuses."""
    async with raw_upstream() as up:
        async with await WireClient.connect(proxy.port) as a:
            assert (await a.request(get(up.url, up.authority, "/a"))).body == b"GET /a"
            async with await WireClient.connect(proxy.port) as b:
                assert (await b.request(get(up.url, up.authority, "/b"))).body == b"GET /b"
        assert len(up.conns) == 1


async def test_stray_bytes_after_a_response_never_reach_the_next_exchange(
    proxy: ProxyUnderTest, flows: FlowEvents
) -> None:
    def with_stray(req: Request) -> bytes:
        return echo_line(req) + (FAKE if req.target == "/a" else b"")

    async with raw_upstream(reply_each(with_stray)) as up:
        async with await WireClient.connect(proxy.port) as a:
            first = await a.request(get(up.url, up.authority, "/a"))
            assert (first.status, first.body) == (200, b"GET /a")
            async with await WireClient.connect(proxy.port) as b:
                second = await b.request(get(up.url, up.authority, "/b"))
                ev = await flow_of(flows, b)
        assert (second.status, second.body) == (200, b"GET /b")
        assert [[r.target for r in c.requests] for c in up.conns] == [["/a"], ["/b"]]
    assert ev["state"] == "completed"
    assert ev["response"]["status"] == 200


async def test_stray_bytes_on_an_idle_pooled_connection_discard_it(
    proxy: ProxyUnderTest,
) -> None:
    stray_sent = asyncio.Event()

    async def late_stray(conn: UpstreamConn) -> None:
        while (req := await conn.next_request()) is not None:
            conn.send(echo_line(req))
            await conn.drain()
            if req.target == "/a":
                await asyncio.sleep(0.2)  # the connection now idles in the pool
                conn.send(FAKE)
                await conn.drain()
                stray_sent.set()

    async with raw_upstream(late_stray) as up:
        async with await WireClient.connect(proxy.port) as a:
            assert (await a.request(get(up.url, up.authority, "/a"))).body == b"GET /a"
            await asyncio.wait_for(stray_sent.wait(), 5)
            await asyncio.sleep(0.2)  # let the proxy see them
            async with await WireClient.connect(proxy.port) as b:
                second = await b.request(get(up.url, up.authority, "/b"))
        assert (second.status, second.body) == (200, b"GET /b")
        assert [[r.target for r in c.requests] for c in up.conns] == [["/a"], ["/b"]]


# -- item 6: a reset is not an end -------------------------------------------------------------
async def test_reset_mid_close_delimited_body_is_visible_and_an_error(
    proxy: ProxyUnderTest, flows: FlowEvents
) -> None:
    got_partial = asyncio.Event()

    async def reset_midway(conn: UpstreamConn) -> None:
        await conn.next_request()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial-")
        await conn.drain()
        await asyncio.wait_for(got_partial.wait(), 5)
        conn.reset()

    async with raw_upstream(reset_midway) as up:
        async with await WireClient.connect(proxy.port) as client:
            await client.send(get(up.url, up.authority, "/rst"))
            assert await client.read_until(b"partial-")
            got_partial.set()
            resp = await client.response(timeout=5)
            ev = await flow_of(flows, client)
    assert resp.status == 200
    assert resp.body == b"partial-"
    if resp.framing == "close":  # no framing to miss: only a reset can say it
        assert client.reset, "the truncated body ended with a clean FIN"
    else:
        assert not resp.complete, f"the truncated body was delivered as complete ({resp.framing})"
        assert client.eof, "the connection was kept open after a truncated body"
    assert ev["state"] == "error"
    assert ev["error"]


async def test_reset_mid_body_to_an_http10_client_aborts_the_connection(
    proxy: ProxyUnderTest, flows: FlowEvents
) -> None:
    got_partial = asyncio.Event()

    async def reset_midway(conn: UpstreamConn) -> None:
        await conn.next_request()
        conn.send(b"HTTP/1.1 200 OK\r\n\r\npartial-")
        await conn.drain()
        await asyncio.wait_for(got_partial.wait(), 5)
        conn.reset()

    async with raw_upstream(reset_midway) as up:
        async with await WireClient.connect(proxy.port) as client:
            await client.send(
                f"GET {up.url}/rst10 HTTP/1.0\r\nHost: {up.authority}\r\n\r\n".encode()
            )
            assert await client.read_until(b"partial-")
            got_partial.set()
            await client.rest(timeout=5)
            ev = await flow_of(flows, client)
    assert client.reset, "an HTTP/1.0 client was given a clean end of a truncated body"
    assert ev["state"] == "error"


async def test_fin_at_end_of_close_delimited_body_is_a_clean_completion(
    proxy: ProxyUnderTest, flows: FlowEvents
) -> None:
    async def fin(conn: UpstreamConn) -> None:
        await conn.next_request()
        conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nwhole body")
        await conn.drain()
        conn.close()

    async with raw_upstream(fin) as up:
        async with await WireClient.connect(proxy.port) as client:
            resp = await client.request(get(up.url, up.authority, "/fin"))
            ev = await flow_of(flows, client)
    assert (resp.status, resp.body, resp.complete) == (200, b"whole body", True)
    assert not client.reset
    assert ev["state"] == "completed"
    assert ev["error"] is None
    assert ev["response"]["size"] == len(b"whole body")


# -- item 7: response Transfer-Encoding, unsolicited 101 ---------------------------------------
@pytest.mark.parametrize("te", ["xchunked", "chunkedchunked", "chunked, gzip"])
async def test_response_whose_final_coding_is_not_chunked_is_read_until_close(
    proxy: ProxyUnderTest, flows: FlowEvents, te: str
) -> None:
    payload = b"5\r\nhello\r\n0\r\n\r\nand the rest until close"

    async def send(conn: UpstreamConn) -> None:
        await conn.next_request()
        conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\n\r\n%s" % (te.encode(), payload))
        await conn.drain()
        conn.close()

    async with raw_upstream(send) as up:
        async with await WireClient.connect(proxy.port) as client:
            resp = await client.request(get(up.url, up.authority, "/te"))
            ev = await flow_of(flows, client)
    assert resp.status == 200
    assert (resp.body, resp.complete) == (payload, True)
    assert ev["state"] == "completed"
    assert ev["response"]["size"] == len(payload)


async def test_unsolicited_101_is_502(proxy: ProxyUnderTest, flows: FlowEvents) -> None:
    async def switch(conn: UpstreamConn) -> None:
        await conn.next_request()
        conn.send(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: evil\r\n\r\n"
            b"raw bytes of another protocol"
        )
        await conn.drain()

    async with raw_upstream(switch) as up:
        async with await WireClient.connect(proxy.port) as client:
            resp = await client.request(get(up.url, up.authority, "/no-upgrade"))
            ev = await flow_of(flows, client)
        assert resp.status == 502
        assert await up.conns[0].wait_closed(5), "the switched upstream connection was kept"
    assert ev["state"] == "error"
    assert ev["response"]["status"] == 502
