"""``upstream:http://host:port`` mode: a replica that chains through another proxy.

Two replicas on the shared NATS: ``first`` is a regular forward proxy (standing in for
a corporate proxy), ``second`` runs with ``proxy_mode=upstream:http://<first>``.
Plain requests go to ``first`` in absolute form; HTTPS (intercepted by ``second``) and
blind tunnels go through ``first``'s ``CONNECT``. Both record what they relayed. A
``CONNECT`` that ``first`` refuses is a 502 at ``second``'s client.

``first``'s listener is ``second``'s upstream proxy: that address is allowed on
purpose (it is not a destination), while the destinations ``second``'s clients ask
for are still ``second``'s to police.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.integration.conftest import MakeProxy, Watch
from tests.integration.harness import (
    FlowEvents,
    ProxyUnderTest,
    RawClient,
    Upstream,
    run_curl,
)

pytestmark = pytest.mark.timeout(60)

# the same check on a regular replica (the control) and on a chained one
CHAINED = pytest.mark.parametrize("chain", [False, True], ids=["regular-control", "chained"])


def chained(first: ProxyUnderTest) -> str:
    return f"upstream:http://127.0.0.1:{first.port}"


def status(event: dict[str, Any]) -> int | None:
    return None if event["response"] is None else int(event["response"]["status"])


def final_where(events: FlowEvents, **fields: Any) -> Awaitable[dict[str, Any]]:
    return events.wait_for(
        lambda e: e["event"] != "started" and all(e.get(k) == v for k, v in fields.items())
    )


def bundle(tmp_path: Path, *cas: Path) -> Path:
    """One CA file trusting every CA in ``cas``."""
    path = tmp_path / "bundle.pem"
    path.write_bytes(b"".join(ca.read_bytes() for ca in cas))
    return path


async def curl_json(*args: str) -> dict[str, Any]:
    rc, out, err = await run_curl("--max-time", "10", *args, timeout=20)
    assert rc == 0, err
    data: dict[str, Any] = orjson.loads(out)
    return data


def via_hops(echo: dict[str, Any]) -> list[str]:
    """The received-by pseudonyms the origin saw in ``Via``, in order."""
    values = [v for k, v in echo["headers"] if k.lower() == "via"]
    return [hop.split()[1] for v in values for hop in v.split(",")]


# -- plain HTTP ------------------------------------------------------------------------------
async def test_plain_http_goes_through_the_first_proxy(
    make_proxy: MakeProxy, upstream: Upstream, watch: Watch
) -> None:
    first = await make_proxy()
    second = await make_proxy(proxy_mode=chained(first))
    ev1, ev2 = await watch(first), await watch(second)

    echo = await curl_json("-x", second.url, f"{upstream.http}/echo/plain?x=1")
    assert echo["path"] == "/echo/plain?x=1"
    # the origin saw both proxies, the second first
    assert via_hops(echo) == [f"proxyfleet-{second.id}", f"proxyfleet-{first.id}"]

    e2 = await final_where(ev2, path="/echo/plain?x=1")
    e1 = await final_where(ev1, path="/echo/plain?x=1")
    for event in (e1, e2):
        assert event["state"] == "completed" and status(event) == 200
        assert event["scheme"] == "http"
        assert (event["host"], event["port"]) == ("127.0.0.1", upstream.http_port)
    # the second's connection went to the first, not to the origin
    assert e2["server"][1] == first.port
    assert e1["server"][1] == upstream.http_port
    assert e1["request"]["headers"]  # the first recorded the request it got


async def test_plain_http_keep_alive_and_bodies_through_the_chain(
    make_proxy: MakeProxy, upstream: Upstream, watch: Watch
) -> None:
    first = await make_proxy()
    second = await make_proxy(proxy_mode=chained(first))
    ev1 = await watch(first)
    async with aiohttp.ClientSession() as session:
        for i in range(3):
            async with session.post(
                f"{upstream.http}/echo/post{i}", data=b"z" * (1000 * (i + 1)), proxy=second.url
            ) as resp:
                assert resp.status == 200
                echo = await resp.json()
            assert echo["body_len"] == 1000 * (i + 1)
        async with session.get(f"{upstream.http}/chunked/5000", proxy=second.url) as resp:
            assert await resp.read() == b"c" * 5000
    for i in range(3):
        assert (await final_where(ev1, path=f"/echo/post{i}"))["request"]["size"] == 1000 * (i + 1)


async def test_plain_http_refused_by_the_first_is_relayed_as_its_answer(
    make_proxy: MakeProxy, watch: Watch
) -> None:
    """The first proxy's own refusal (its listener is a fleet endpoint for it) is an
    ordinary response to the second, passed on to the client."""
    first = await make_proxy()
    second = await make_proxy(proxy_mode=chained(first))
    ev2 = await watch(second)
    rc, out, err = await run_curl(
        "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "-x", second.url,
        f"http://127.0.0.1:{first.port}/refused-plain",
    )  # fmt: skip
    assert rc == 0, err
    assert out == b"403"
    assert status(await final_where(ev2, path="/refused-plain")) == 403


# -- HTTPS: intercepted by the second, tunnelled through the first ---------------------------
async def test_https_intercepted_by_the_second_through_a_first_that_tunnels(
    make_proxy: MakeProxy, upstream: Upstream, watch: Watch
) -> None:
    first = await make_proxy(ignore_hosts=["127.0.0.1"])
    second = await make_proxy(proxy_mode=chained(first))
    ev1, ev2 = await watch(first), await watch(second)

    echo = await curl_json(
        "-x", second.url, "--cacert", str(second.ca_path), f"{upstream.https}/echo/tls"
    )
    assert echo["path"] == "/echo/tls"
    assert via_hops(echo) == [f"proxyfleet-{second.id}"]  # the first only relayed bytes

    e2 = await final_where(ev2, path="/echo/tls")
    assert e2["scheme"] == "https" and e2["state"] == "completed" and status(e2) == 200
    assert e2["server"][1] == first.port
    opened = await ev1.wait_for(lambda e: e["kind"] == "tunnel")
    assert opened["method"] == "CONNECT"
    assert (opened["host"], opened["port"]) == ("127.0.0.1", upstream.https_port)
    # the second keeps its upstream connection (the tunnel) for reuse; once it lets it
    # go, the first's tunnel ends
    second.ctx.pool.clear()
    tunnel = await final_where(ev1, kind="tunnel")
    assert tunnel["id"] == opened["id"] and tunnel["state"] == "completed"
    assert tunnel["stats"]["bytes_server_to_client"] > 0


async def test_https_intercepted_by_both(
    make_proxy: MakeProxy, upstream: Upstream, watch: Watch, tmp_path: Path
) -> None:
    """The first intercepts the second's CONNECT too: the second trusts the first's CA
    (and the origin's, as the fixtures do) for its upstream TLS."""
    first = await make_proxy()
    second = await make_proxy(
        proxy_mode=chained(first),
        upstream_ca_bundle=bundle(tmp_path, first.ca_path, upstream.ca.cert_path),
    )
    ev1, ev2 = await watch(first), await watch(second)

    echo = await curl_json(
        "-x", second.url, "--cacert", str(second.ca_path), f"{upstream.https}/echo/both"
    )
    assert echo["path"] == "/echo/both"
    assert via_hops(echo) == [f"proxyfleet-{second.id}", f"proxyfleet-{first.id}"]
    for events in (ev1, ev2):
        event = await final_where(events, path="/echo/both")
        assert event["scheme"] == "https" and event["state"] == "completed"
        assert (event["host"], event["port"]) == ("127.0.0.1", upstream.https_port)


async def test_https_with_a_first_the_second_does_not_trust_is_502(
    make_proxy: MakeProxy, upstream: Upstream, watch: Watch
) -> None:
    """The upstream certificate is checked through the chain: an intercepting first
    proxy whose CA the second does not trust is refused, not silently accepted."""
    first = await make_proxy()
    second = await make_proxy(proxy_mode=chained(first))
    ev2 = await watch(second)
    rc, out, err = await run_curl(
        "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "-x", second.url,
        "--cacert", str(second.ca_path), f"{upstream.https}/echo/untrusted",
    )  # fmt: skip
    assert rc == 0, err
    assert out == b"502"
    event = await final_where(ev2, path="/echo/untrusted")
    assert event["state"] == "error" and "certificate" in event["error"]


# -- tunnels ---------------------------------------------------------------------------------
async def test_tunnel_goes_through_the_first_connect(
    make_proxy: MakeProxy, upstream: Upstream, watch: Watch
) -> None:
    first = await make_proxy(ignore_hosts=["127.0.0.1"])
    second = await make_proxy(proxy_mode=chained(first), intercept_tls=False)
    ev1, ev2 = await watch(first), await watch(second)

    echo = await curl_json(
        "-x", second.url, "--cacert", str(upstream.ca.cert_path), f"{upstream.https}/echo/tun"
    )
    assert echo["path"] == "/echo/tun"
    assert "via" not in {k.lower() for k, _ in echo["headers"]}  # nobody looked inside
    for events in (ev1, ev2):
        tunnel = await final_where(events, kind="tunnel")
        assert tunnel["method"] == "CONNECT" and tunnel["state"] == "completed"
        assert (tunnel["host"], tunnel["port"]) == ("127.0.0.1", upstream.https_port)
        assert tunnel["stats"]["bytes_client_to_server"] > 0


async def test_tunnel_through_an_intercepting_first(
    make_proxy: MakeProxy, upstream: Upstream, watch: Watch
) -> None:
    """The second tunnels blindly; the first intercepts: the client trusts the first's CA
    and the first records the request inside."""
    first = await make_proxy()
    second = await make_proxy(proxy_mode=chained(first), intercept_tls=False)
    ev1, ev2 = await watch(first), await watch(second)
    echo = await curl_json(
        "-x", second.url, "--cacert", str(first.ca_path), f"{upstream.https}/echo/inside"
    )
    assert via_hops(echo) == [f"proxyfleet-{first.id}"]
    inner = await final_where(ev1, path="/echo/inside")
    assert inner["scheme"] == "https" and inner["state"] == "completed"
    assert (await final_where(ev2, kind="tunnel"))["state"] == "completed"


@pytest.mark.parametrize("chain", [False, True], ids=["first-alone", "chained"])
async def test_server_first_protocol_through_the_chained_tunnel(
    make_proxy: MakeProxy, chain: bool
) -> None:
    """A server that speaks first (SMTP-like, issue 7 item 12): its banner crosses both
    tunnels, even when it follows the upstream proxy's ``200`` at once. ``first-alone``
    is the control: the same tunnel through the first proxy only."""

    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hello\r\n")
        line = await reader.readline()
        writer.write(b"250 " + line)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(banner, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        first = await make_proxy(ignore_hosts=["127.0.0.1"])
        second = await make_proxy(proxy_mode=chained(first), intercept_tls=False)
        entry = second if chain else first
        reader, writer = await asyncio.open_connection("127.0.0.1", entry.port)
        try:
            async with asyncio.timeout(5):
                writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
                assert await reader.readline() == b"220 hello\r\n"
                writer.write(b"EHLO me\r\n")
                assert await reader.readline() == b"250 EHLO me\r\n"
                assert await reader.read() == b""
        finally:
            writer.close()
    finally:
        server.close()


# -- refusals --------------------------------------------------------------------------------
async def test_connect_refused_by_the_first_is_502_for_a_tunnel(
    make_proxy: MakeProxy, watch: Watch
) -> None:
    first = await make_proxy()
    second = await make_proxy(proxy_mode=chained(first), intercept_tls=False)
    ev2 = await watch(second)
    # the first's own listener: a fleet endpoint it always refuses
    async with await RawClient.connect(second.port) as client:
        await client.send(f"CONNECT 127.0.0.1:{first.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        resp = await client.read_response()
    assert resp.status == 502
    assert b"refused CONNECT" in resp.body
    event = await final_where(ev2, method="CONNECT")
    assert event["state"] == "error" and status(event) == 502


async def test_connect_refused_by_the_first_is_502_for_an_intercepted_request(
    make_proxy: MakeProxy, watch: Watch
) -> None:
    first = await make_proxy()
    second = await make_proxy(proxy_mode=chained(first))
    ev2 = await watch(second)
    rc, out, err = await run_curl(
        "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "-x", second.url,
        "--cacert", str(second.ca_path), f"https://127.0.0.1:{first.port}/refused-tls",
    )  # fmt: skip
    assert rc == 0, err
    assert out == b"502"
    event = await final_where(ev2, path="/refused-tls")
    assert event["state"] == "error" and status(event) == 502


async def test_first_proxy_down_is_502(make_proxy: MakeProxy, upstream: Upstream) -> None:
    first = await make_proxy()
    second = await make_proxy(proxy_mode=chained(first))
    await first.replica.stop(drain=0.1)
    rc, out, err = await run_curl(
        "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "-x", second.url,
        f"{upstream.http}/echo/down",
    )  # fmt: skip
    assert rc == 0, err
    assert out == b"502"


@CHAINED
async def test_second_still_refuses_its_protected_endpoints(
    make_proxy: MakeProxy, upstream: Upstream, watch: Watch, chain: bool
) -> None:
    """DESIGN, Security model: "the fleet's own endpoints are always refused". In upstream
    mode the second must still refuse the endpoints it protects (a corporate proxy does
    not know them); only the upstream proxy's own address is exempt."""
    first = await make_proxy()
    second = await make_proxy(
        proxy_mode=chained(first) if chain else "regular",
        protected_endpoints=[f"127.0.0.1:{upstream.http_port}"],
    )
    ev1 = await watch(first)
    rc, out, err = await run_curl(
        "--max-time", "10", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-x", second.url,
        f"{upstream.http}/echo/protected",
    )  # fmt: skip
    assert rc == 0, err
    assert out == b"403"
    await asyncio.sleep(0.3)
    assert not [e for e in ev1.events if e["path"] == "/echo/protected"]


def denying(first: ProxyUnderTest, upstream: Upstream, chain: bool = True) -> dict[str, Any]:
    return {
        "proxy_mode": chained(first) if chain else "regular",
        "destination_deny": [
            f"127.0.0.1:{upstream.http_port}",
            f"127.0.0.1:{upstream.https_port}",
        ],
    }


@CHAINED
async def test_second_still_applies_its_destination_deny_to_plain_http(
    make_proxy: MakeProxy, upstream: Upstream, watch: Watch, chain: bool
) -> None:
    """``destination_deny`` is the second's policy: chaining through another proxy must
    not switch it off (``regular-control``: the same replica without chaining)."""
    first = await make_proxy()
    second = await make_proxy(**denying(first, upstream, chain))
    ev1 = await watch(first)
    rc, out, err = await run_curl(
        "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "-x", second.url,
        f"{upstream.http}/echo/denied",
    )  # fmt: skip
    assert rc == 0, err
    assert out == b"403"
    await asyncio.sleep(0.3)
    assert ev1.events == []


@CHAINED
@pytest.mark.parametrize("intercept", [False, True], ids=["tunnel", "intercept"])
async def test_second_still_applies_its_destination_deny_to_connect(
    make_proxy: MakeProxy, upstream: Upstream, watch: Watch, intercept: bool, chain: bool
) -> None:
    first = await make_proxy(ignore_hosts=["127.0.0.1"])
    second = await make_proxy(intercept_tls=intercept, **denying(first, upstream, chain))
    ev1 = await watch(first)
    async with await RawClient.connect(second.port) as client:
        authority = f"127.0.0.1:{upstream.https_port}"
        await client.send(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        resp = await client.read_response(head=True)
    assert resp.status == 403
    await asyncio.sleep(0.3)
    assert ev1.events == []


# -- WebSocket -------------------------------------------------------------------------------
async def test_websocket_through_the_chain(
    make_proxy: MakeProxy, upstream: Upstream, watch: Watch
) -> None:
    first = await make_proxy()
    second = await make_proxy(proxy_mode=chained(first))
    ev1 = await watch(first)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"ws://127.0.0.1:{upstream.http_port}/ws", proxy=second.url) as ws,
    ):
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "echo:hi"
    event = await final_where(ev1, kind="websocket")
    assert event["path"] == "/ws" and event["state"] == "completed"
