"""The upstream connection phases of a flow (``timings``: ``dns``, ``connect``, ``tls``),
end to end: real clients through the in-process proxy to real upstreams on 127.0.0.1.

A flow that opened a new upstream connection has the three points (``tls`` only for
https), in order between its start and its request being sent; a flow that reused a
pooled connection has none of them, and its HAR entry says -1 (connection reused). The
store keeps them and the API returns them, in the flow and in its HAR entry.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from libs.common import har
from services.store.main import Store
from tests.integration.conftest import MakeProxy, Watch
from tests.integration.harness import FlowEvents, ProxyUnderTest, Upstream, run_curl
from tests.unit.test_api_support import READ, eventually
from tests.unit.test_har import validate_har

pytestmark = pytest.mark.timeout(60)

CONNECTION = ("dns", "connect", "tls")


def trusting(cafile: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile))


def assert_fresh(t: dict[str, Any], tls: bool) -> None:
    """A new upstream connection: every point in order, ``tls`` only over TLS."""
    assert t["dns"] is not None and t["connect"] is not None
    if tls:
        assert t["tls"] is not None
        assert t["start"] <= t["dns"] <= t["connect"] <= t["tls"] <= t["request_sent"]
    else:
        assert t["tls"] is None
        assert t["start"] <= t["dns"] <= t["connect"] <= t["request_sent"]
    assert t["request_sent"] <= t["first_byte"] <= t["end"]


def assert_reused(t: dict[str, Any]) -> None:
    assert [t[k] for k in CONNECTION] == [None, None, None]
    assert t["start"] <= t["request_sent"] <= t["first_byte"] <= t["end"]


async def test_https_new_connection_then_pooled(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    # one client connection (one CONNECT), two requests: the second finds the upstream
    # connection the first opened back in the pool
    async with httpx.AsyncClient(proxy=proxy.url, verify=trusting(proxy.ca_path)) as client:
        first = await client.get(f"{upstream.https}/echo/first")
        second = await client.get(f"{upstream.https}/echo/second")
    assert first.status_code == second.status_code == 200
    one = await flows.final_for("/echo/first")
    two = await flows.final_for("/echo/second")
    assert one["scheme"] == two["scheme"] == "https"
    assert one["client"] == two["client"]  # the same client connection
    assert_fresh(one["timings"], tls=True)
    assert_reused(two["timings"])

    fresh, reused = (har.entry(e)["timings"] for e in (one, two))
    assert fresh["dns"] >= 0 and fresh["connect"] >= fresh["ssl"] >= 0
    assert reused["dns"] == reused["connect"] == reused["ssl"] == -1
    validate_har(orjson.dumps(har.document([one, two])))  # schema, spec rules (time = sum)


async def test_plain_http_has_no_tls(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        assert (await client.get(f"{upstream.http}/echo/plain")).status_code == 200
        assert (await client.get(f"{upstream.http}/echo/plain-again")).status_code == 200
    one = await flows.final_for("/echo/plain")
    assert_fresh(one["timings"], tls=False)
    assert_reused((await flows.final_for("/echo/plain-again"))["timings"])
    t = har.entry(one)["timings"]
    assert t["dns"] >= 0 and t["connect"] >= 0 and t["ssl"] == -1


async def test_chained_https_connect_includes_the_upstream_proxys_tunnel(
    make_proxy: MakeProxy, upstream: Upstream, watch: Watch
) -> None:
    first = await make_proxy(ignore_hosts=["127.0.0.1"])
    second = await make_proxy(proxy_mode=f"upstream:http://127.0.0.1:{first.port}")
    events = await watch(second)
    rc, _, err = await run_curl(
        "--max-time", "10", "-x", second.url, "--cacert", str(second.ca_path),
        f"{upstream.https}/echo/chained",
    )  # fmt: skip
    assert rc == 0, err
    e = await events.final_for("/echo/chained")
    assert e["server"][1] == first.port
    assert_fresh(e["timings"], tls=True)


async def test_blind_tunnel_has_dns_and_connect(
    make_proxy: MakeProxy, upstream: Upstream, watch: Watch
) -> None:
    proxy = await make_proxy(ignore_hosts=["127.0.0.1"])
    events = await watch(proxy)
    rc, _, err = await run_curl(
        "--max-time", "10", "-x", proxy.url, "--cacert", str(upstream.ca.cert_path),
        f"{upstream.https}/echo/tunnel",
    )  # fmt: skip
    assert rc == 0, err
    t = (await events.wait_for(lambda e: e["kind"] == "tunnel" and e["event"] != "started"))[
        "timings"
    ]
    assert t["start"] <= t["dns"] <= t["connect"] <= t["end"]
    assert t["tls"] is None  # the TLS inside a blind tunnel is the client's own


async def test_store_and_api_keep_the_connection_phases(
    api: httpx.AsyncClient, store: Store, make_proxy: MakeProxy, upstream: Upstream
) -> None:
    proxy = await make_proxy()
    async with httpx.AsyncClient(proxy=proxy.url, verify=trusting(proxy.ca_path)) as client:
        assert (await client.get(f"{upstream.https}/echo/stored")).status_code == 200

    async def stored() -> dict[str, Any] | None:
        page = (await api.get("/api/flows", params={"replica": proxy.id}, headers=READ)).json()
        done = [f for f in page["flows"] if f["state"] != "active"]
        if not done:
            return None
        got: dict[str, Any] = (await api.get(f"/api/flows/{done[0]['id']}", headers=READ)).json()
        return got

    flow: dict[str, Any] = await eventually(stored, 10.0, "the stored flow")
    assert_fresh(flow["timings"], tls=True)
    resp = await api.get(f"/api/flows/{flow['id']}/har", headers=READ)
    assert resp.status_code == 200
    (entry,) = validate_har(resp.content)["log"]["entries"]
    t = entry["timings"]
    assert t["dns"] >= 0 and t["connect"] >= t["ssl"] >= 0 and t["blocked"] == -1
