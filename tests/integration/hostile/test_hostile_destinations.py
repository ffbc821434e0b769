"""The control plane is not reachable through the data plane (issue 7, item 9): the fleet's
own endpoints are refused however they are spelled, on absolute-form HTTP and on CONNECT;
private destinations are refused on a public listener; Via is added and detects loops."""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.integration.conftest import MakeProxy, Watch
from tests.integration.harness import FlowEvents, ProxyUnderTest, Upstream, free_port
from tests.integration.rawupstream import (
    UpstreamConn,
    WireClient,
    flow_of,
    open_tunnel,
    raw_upstream,
)

pytestmark = pytest.mark.timeout(90)

# Spellings of this host that a name check misses (and one that is not loopback but
# reaches it: connect() to 0.0.0.0 lands on a local listener).
FORMS = [
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f000001",
    "[::ffff:127.0.0.1]",
    "localhost",
    "localhost.",
    "0.0.0.0",
]

LEAKS = (b"INFO {", b"# HELP", b"# TYPE", b"fleet-api")  # NATS, metrics, the fake API


def nats_port(nats_url: str) -> int:
    port = urlsplit(nats_url.split(",")[0]).port
    assert port is not None
    return port


async def http_refusals(
    proxy: ProxyUnderTest, flows: FlowEvents, port: int, forms: list[str] = FORMS, path: str = "/"
) -> list[str]:
    """Absolute-form GETs to ``form:port``: what went wrong for each (empty: all refused)."""
    problems = []
    for form in forms:
        async with await WireClient.connect(proxy.port) as client:
            request = f"GET http://{form}:{port}{path} HTTP/1.1\r\nHost: {form}\r\n\r\n"
            await client.send(request.encode())
            try:
                resp = await client.response(timeout=5)
            except (EOFError, TimeoutError) as exc:
                problems.append(f"{form}: no response ({exc!r})")
                continue
            rest = b""
            with contextlib.suppress(TimeoutError):
                rest = await client.rest(timeout=0.5)
        if not 400 <= resp.status < 500:
            problems.append(f"{form}: {resp.status} {resp.body[:80]!r}")
        if any(leak in resp.body + rest for leak in LEAKS):
            problems.append(f"{form}: the protected endpoint answered: {resp.body[:80]!r}")
        try:
            ev = await flow_of(flows, client)
        except AssertionError:
            problems.append(f"{form}: not recorded")
            continue
        if ev["state"] != "error":
            problems.append(f"{form}: recorded {ev['state']}")
    return problems


async def connect_refusals(proxy: ProxyUnderTest, port: int, forms: list[str] = FORMS) -> list[str]:
    """CONNECTs to ``form:port``: what went wrong for each (empty: all refused)."""
    problems = []
    for form in forms:
        try:
            client, answer = await open_tunnel(proxy.port, f"{form}:{port}")
        except EOFError as exc:
            problems.append(f"{form}: no answer to CONNECT ({exc})")
            continue
        async with client:
            with contextlib.suppress(TimeoutError):
                await client.read_until(b"\n", timeout=1.0)  # a speak-first server would
            rest = bytes(client.buf)
        if not 400 <= answer.status < 500:
            problems.append(f"{form}: CONNECT answered {answer.status}")
        if any(leak in rest for leak in LEAKS):
            problems.append(f"{form}: the tunnel reached the endpoint: {rest[:60]!r}")
    return problems


# -- the fleet's own endpoints ----------------------------------------------------------------
async def test_nats_is_refused_over_http_in_every_spelling(
    proxy: ProxyUnderTest, flows: FlowEvents, nats_url: str
) -> None:
    assert await http_refusals(proxy, flows, nats_port(nats_url)) == []


async def test_nats_is_refused_over_connect_in_every_spelling(
    make_proxy: MakeProxy, nats_url: str
) -> None:
    proxy = await make_proxy(intercept_tls=False)
    assert await connect_refusals(proxy, nats_port(nats_url)) == []


async def test_nats_is_refused_over_connect_to_an_ignored_host(
    make_proxy: MakeProxy, nats_url: str
) -> None:
    proxy = await make_proxy(ignore_hosts=["*"])
    assert await connect_refusals(proxy, nats_port(nats_url), ["127.0.0.1", "127.1"]) == []


async def test_nats_stays_refused_when_loopback_is_allowed(
    make_proxy: MakeProxy, watch: Watch, nats_url: str
) -> None:
    proxy = await make_proxy(destination_allow=["127.0.0.0/8", "::1"], intercept_tls=False)
    flows = await watch(proxy)
    port = nats_port(nats_url)
    assert await http_refusals(proxy, flows, port, ["127.0.0.1", "127.1"]) == []
    assert await connect_refusals(proxy, port, ["127.0.0.1", "127.1"]) == []


async def test_nats_is_refused_as_a_websocket_target(
    proxy: ProxyUnderTest, flows: FlowEvents, nats_url: str
) -> None:
    port = nats_port(nats_url)
    async with await WireClient.connect(proxy.port) as client:
        resp = await client.request(
            f"GET ws://127.1:{port}/ HTTP/1.1\r\nHost: 127.1:{port}\r\nConnection: Upgrade\r\n"
            "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
        )
        rest = b""
        with contextlib.suppress(TimeoutError):
            rest = await client.rest(timeout=1)
    assert 400 <= resp.status < 500
    assert b"INFO {" not in resp.body + rest


async def test_own_listener_is_refused_in_every_spelling_without_a_loop(
    make_proxy: MakeProxy, watch: Watch
) -> None:
    proxy = await make_proxy()
    flows = await watch(proxy)
    assert await http_refusals(proxy, flows, proxy.port) == []
    await asyncio.sleep(0.3)  # an inner flow (the proxy calling itself) would be in by now
    finals = flows.final()
    assert len(finals) == len(FORMS), [(e["client"], e["error"]) for e in finals.values()]


async def test_own_listener_is_refused_over_connect(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(intercept_tls=False)
    assert await connect_refusals(proxy, proxy.port) == []


async def test_metrics_listener_is_refused(make_proxy: MakeProxy, watch: Watch) -> None:
    metrics = free_port()
    proxy = await make_proxy(proxy_metrics_listen=f"127.0.0.1:{metrics}", intercept_tls=False)
    flows = await watch(proxy)
    forms = ["127.0.0.1", "127.1", "localhost."]
    assert await http_refusals(proxy, flows, metrics, forms, path="/metrics") == []
    assert await connect_refusals(proxy, metrics, ["127.0.0.1", "2130706433"]) == []


async def test_configured_protected_endpoint_is_refused(
    make_proxy: MakeProxy, watch: Watch
) -> None:
    async def fake_api(conn: UpstreamConn) -> None:
        conn.send(b"fleet-api\r\n")  # speaks first, so a tunnel would show it
        await conn.drain()

    async with raw_upstream(fake_api) as api:
        proxy = await make_proxy(protected_endpoints=[api.authority], intercept_tls=False)
        flows = await watch(proxy)
        assert await http_refusals(proxy, flows, api.port, ["127.0.0.1", "127.1"]) == []
        assert await connect_refusals(proxy, api.port, ["127.0.0.1", "[::ffff:127.0.0.1]"]) == []
        assert api.conns == []


async def test_refusal_is_403_and_recorded(
    proxy: ProxyUnderTest, flows: FlowEvents, nats_url: str
) -> None:
    async with await WireClient.connect(proxy.port) as client:
        port = nats_port(nats_url)
        resp = await client.request(
            f"GET http://127.1:{port}/ HTTP/1.1\r\nHost: 127.1:{port}\r\n\r\n".encode()
        )
        ev = await flow_of(flows, client)
    assert resp.status == 403
    assert ev["state"] == "error"
    assert ev["response"]["status"] == 403
    assert ev["error"]


# -- ordinary destinations ----------------------------------------------------------------------
async def test_loopback_upstream_works_on_a_loopback_listener(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    async with httpx.AsyncClient(proxy=proxy.url, timeout=5) as client:
        resp = await client.get(f"{upstream.http}/echo/local")
    assert resp.status_code == 200
    ev = await flows.final_for("/echo/local")
    assert ev["state"] == "completed"


async def test_loopback_upstream_is_refused_on_a_public_listener(
    make_proxy: MakeProxy, watch: Watch
) -> None:
    async with raw_upstream() as up:
        port = free_port()
        proxy = await make_proxy(proxy_listen=f"0.0.0.0:{port}", intercept_tls=False)
        flows = await watch(proxy)
        async with await WireClient.connect(port) as client:
            resp = await client.request(
                f"GET {up.url}/private HTTP/1.1\r\nHost: {up.authority}\r\n\r\n".encode()
            )
            ev = await flow_of(flows, client)
        client2, answer = await open_tunnel(port, up.authority)
        client2.close()
        assert up.conns == []
    assert 400 <= resp.status < 500
    assert 400 <= answer.status < 500
    assert ev["state"] == "error"


async def test_destination_allow_opens_loopback_on_a_public_listener(
    make_proxy: MakeProxy,
) -> None:
    async with raw_upstream() as up:
        port = free_port()
        await make_proxy(proxy_listen=f"0.0.0.0:{port}", destination_allow=["127.0.0.1"])
        async with await WireClient.connect(port) as client:
            resp = await client.request(
                f"GET {up.url}/allowed HTTP/1.1\r\nHost: {up.authority}\r\n\r\n".encode()
            )
    assert (resp.status, resp.body) == (200, b"GET /allowed")


async def test_destination_deny_refuses_on_a_loopback_listener(make_proxy: MakeProxy) -> None:
    async with raw_upstream() as up:
        proxy = await make_proxy(destination_deny=[f"127.0.0.1:{up.port}"])
        async with await WireClient.connect(proxy.port) as client:
            resp = await client.request(
                f"GET http://127.1:{up.port}/denied HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
        assert up.conns == []
    assert 400 <= resp.status < 500


# -- Via ------------------------------------------------------------------------------------------
VIA_ENTRY = re.compile(r"^1\.1 [!#$%&'*+\-.^_`|~0-9A-Za-z:\[\]]+( \(.*\))?$")


def via_entries(values: list[str]) -> list[str]:
    return [e.strip() for v in values for e in v.split(",") if e.strip()]


async def via_roundtrip(proxy: ProxyUnderTest, extra: str = "") -> tuple[Any, Any]:
    """One GET through the proxy: (the request the upstream saw, the client's response)."""
    async with raw_upstream() as up:
        async with await WireClient.connect(proxy.port) as client:
            resp = await client.request(
                f"GET {up.url}/via HTTP/1.1\r\nHost: {up.authority}\r\n{extra}\r\n".encode()
            )
        assert len(up.requests) == 1, up.received[:300]
        return up.requests[0], resp


async def test_via_is_added_to_requests_and_responses(proxy: ProxyUnderTest) -> None:
    req, resp = await via_roundtrip(proxy)
    assert resp.status == 200
    sent = via_entries(req.all("via"))
    assert len(sent) == 1 and VIA_ENTRY.match(sent[0]), req.all("via")
    back = via_entries(resp.all("via"))
    assert back and VIA_ENTRY.match(back[-1]), resp.all("via")


async def test_via_appends_to_an_existing_chain(proxy: ProxyUnderTest) -> None:
    req, _ = await via_roundtrip(proxy, "Via: 1.0 corp-proxy\r\n")
    entries = via_entries(req.all("via"))
    assert entries[0] == "1.0 corp-proxy" and len(entries) == 2, entries
    assert VIA_ENTRY.match(entries[1])


async def test_request_carrying_our_via_is_refused_as_a_loop(
    proxy: ProxyUnderTest, flows: FlowEvents
) -> None:
    req, _ = await via_roundtrip(proxy)
    assert req.all("via"), "no Via on the relayed request"
    ours = via_entries(req.all("via"))[-1]
    async with raw_upstream() as up:
        async with await WireClient.connect(proxy.port) as client:
            resp = await client.request(
                f"GET {up.url}/looped HTTP/1.1\r\nHost: {up.authority}\r\n"
                f"Via: 1.1 other, {ours}\r\n\r\n".encode()
            )
            ev = await flow_of(flows, client)
        assert up.conns == [], "a looping request was relayed"
    assert resp.status in (400, 403, 508), resp.status
    assert ev["state"] == "error"
    assert "loop" in (ev["error"] or "").lower()
