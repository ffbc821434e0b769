"""CONNECT tunnels and reverse mode (issue 7, items 11 and 12): plain HTTP inside a
tunnel, servers that speak first, and a reverse proxy that is never an open proxy."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.integration.conftest import MakeProxy, Watch
from tests.integration.harness import FlowEvents, ProxyUnderTest, Upstream, run_curl
from tests.integration.rawupstream import (
    UpstreamConn,
    WireClient,
    flow_of,
    framing_problems,
    open_tunnel,
    raw_upstream,
)

pytestmark = pytest.mark.timeout(90)


# -- item 12: plain HTTP inside CONNECT, TLS detected by its first bytes ---------------------
async def test_curl_proxytunnel_plain_http_is_relayed_and_recorded(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    rc, out, err = await run_curl(
        "--max-time", "5", "-p", "-x", proxy.url, f"{upstream.http}/echo/inside", timeout=10
    )  # fmt: skip
    assert rc == 0, err.decode()
    assert orjson.loads(out)["path"] == "/echo/inside"
    ev = await flows.final_for("/echo/inside")
    assert (ev["kind"], ev["scheme"], ev["state"]) == ("http", "http", "completed")
    assert (ev["host"], ev["port"]) == ("127.0.0.1", upstream.http_port)
    assert ev["response"]["status"] == 200


async def test_raw_connect_then_plain_get_is_relayed_as_http11(
    proxy: ProxyUnderTest, flows: FlowEvents
) -> None:
    async with raw_upstream() as up:
        client, answer = await open_tunnel(proxy.port, up.authority)
        async with client:
            assert answer.status == 200
            host = up.authority.encode()
            first = await client.request(b"GET /raw HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
            second = await client.request(
                b"POST /raw2 HTTP/1.1\r\nHost: %s\r\nContent-Length: 2\r\n\r\nhi" % host
            )
            ev = await flows.final_for("/raw")
        assert (first.status, first.body) == (200, b"GET /raw")
        assert (second.status, second.body) == (200, b"POST /raw2")
        reqs = up.requests
        assert [(r.method, r.target, r.body) for r in reqs] == [
            ("GET", "/raw", b""),
            ("POST", "/raw2", b"hi"),
        ]
        assert all(framing_problems(r) == [] for r in reqs)
    assert (ev["kind"], ev["scheme"], ev["state"]) == ("http", "http", "completed")
    assert (ev["host"], ev["port"], ev["method"]) == ("127.0.0.1", up.port, "GET")


async def test_plain_http_sent_with_the_connect_in_one_segment(
    proxy: ProxyUnderTest, flows: FlowEvents
) -> None:
    """The client does not wait for the 200: CONNECT and its first request arrive together."""
    async with raw_upstream() as up:
        async with await WireClient.connect(proxy.port) as client:
            host = up.authority.encode()
            await client.send(
                b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (host, host)
                + b"GET /eager HTTP/1.1\r\nHost: %s\r\n\r\n" % host
            )
            established = await client.response(head_request=True)
            resp = await client.response()
        assert established.status == 200
        assert (resp.status, resp.body) == (200, b"GET /eager")
        assert [r.target for r in up.requests] == ["/eager"]
    ev = await flows.final_for("/eager")
    assert ev["state"] == "completed"


async def test_connect_with_client_hello_is_still_intercepted(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    rc, out, err = await run_curl(
        "--max-time", "5", "--cacert", str(proxy.ca_path), "-x", proxy.url,
        f"{upstream.https}/echo/still-tls", timeout=10,
    )  # fmt: skip
    assert rc == 0, err.decode()
    assert orjson.loads(out)["path"] == "/echo/still-tls"
    ev = await flows.final_for("/echo/still-tls")
    assert (ev["scheme"], ev["state"]) == ("https", "completed")


BANNER = b"220 mail.example ESMTP ready\r\n"


async def speak_first(conn: UpstreamConn) -> None:
    conn.send(BANNER)
    await conn.drain()


@pytest.mark.parametrize(
    "settings",
    [{"intercept_tls": False}, {"ignore_hosts": ["127.0.0.1"]}],
    ids=["intercept_tls off", "ignore_hosts"],
)
async def test_tunnel_to_a_server_that_speaks_first_delivers_its_banner(
    make_proxy: MakeProxy, watch: Watch, settings: dict[str, Any]
) -> None:
    proxy = await make_proxy(**settings)
    flows = await watch(proxy)
    missed = 0
    async with raw_upstream(speak_first) as up:
        for _ in range(20):
            client, answer = await open_tunnel(proxy.port, up.authority)
            async with client:
                assert answer.status == 200
                try:
                    if not await client.read_until(BANNER, timeout=2):
                        missed += 1
                except TimeoutError:
                    missed += 1
        assert len(up.conns) == 20
    assert missed == 0, f"the banner was lost in {missed} of 20 tunnels"
    ev = await flow_of(flows, client)
    assert ev["kind"] == "tunnel"
    assert ev["stats"]["bytes_server_to_client"] >= len(BANNER)


# -- item 11: reverse mode ---------------------------------------------------------------------
async def test_reverse_mode_sends_origin_form_to_the_upstream(
    make_proxy: MakeProxy, watch: Watch
) -> None:
    async with raw_upstream() as up:
        proxy = await make_proxy(proxy_mode=f"reverse:{up.url}")
        flows = await watch(proxy)
        async with await WireClient.connect(proxy.port) as client:
            resp = await client.request(b"GET /x HTTP/1.1\r\nHost: site.example\r\n\r\n")
            ev = await flow_of(flows, client)
    assert (resp.status, resp.body) == (200, b"GET /x")
    assert (ev["port"], ev["state"]) == (up.port, "completed")


async def test_reverse_mode_sends_absolute_form_to_the_upstream_too(
    make_proxy: MakeProxy, watch: Watch
) -> None:
    async with raw_upstream() as up, raw_upstream() as decoy:
        proxy = await make_proxy(proxy_mode=f"reverse:{up.url}")
        flows = await watch(proxy)
        async with await WireClient.connect(proxy.port) as client:
            resp = await client.request(
                f"GET {decoy.url}/y HTTP/1.1\r\nHost: {decoy.authority}\r\n\r\n".encode()
            )
            ev = await flow_of(flows, client)
        assert decoy.conns == [], "reverse mode connected where the URL said"
        assert [r.target for r in up.requests] == ["/y"]
        assert framing_problems(up.requests[0]) == []
    assert (resp.status, resp.body) == (200, b"GET /y")
    assert (ev["host"], ev["port"], ev["state"]) == ("127.0.0.1", up.port, "completed")


async def test_reverse_mode_refuses_connect_with_405(make_proxy: MakeProxy, watch: Watch) -> None:
    async with raw_upstream() as up, raw_upstream() as decoy:
        proxy = await make_proxy(proxy_mode=f"reverse:{up.url}")
        flows = await watch(proxy)
        client, answer = await open_tunnel(proxy.port, decoy.authority)
        async with client:
            assert answer.status == 405
            ev = await flow_of(flows, client)
        assert decoy.conns == [] and up.conns == []
    assert ev["state"] == "error"
    assert ev["response"]["status"] == 405
