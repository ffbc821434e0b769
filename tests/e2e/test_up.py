"""The whole system as a user runs it: ``proxyfleet up`` (embedded NATS, store on
SQLite, API, one proxy replica) on free ports in a temporary data dir; traffic
through the proxy with real clients; everything read back through the REST API.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.e2e.system import System
from tests.integration.harness import Upstream, run_curl


@pytest.fixture
async def api(system: System) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=system.api, headers={"X-API-Key": system.key}, timeout=15
    ) as client:
        yield client


class StoreRestarting(Exception):
    """The API answered 503: the store is (re)starting; ``_eventually`` retries."""


async def _walk(api: httpx.AsyncClient, limit: int, **filters: Any) -> list[dict[str, Any]]:
    """Every flow matching ``filters``, page by page (newest first)."""
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": limit, **filters, **({"cursor": cursor} if cursor else {})}
        r = await api.get("/api/flows", params=params)
        if r.status_code == 503:
            raise StoreRestarting(r.text)
        assert r.status_code == 200, r.text
        body = r.json()
        out += body["flows"]
        cursor = body["next_cursor"]
        if not cursor:
            return out


async def _eventually(check: Any, timeout: float = 10.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        try:
            result = await check()
        except StoreRestarting:
            result = None
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_http_and_https_flows_with_bodies(
    system: System, api: httpx.AsyncClient, upstream: Upstream
) -> None:
    code, _, err = await run_curl(
        "-x", system.proxy, "--data-binary", "hello-e2e", f"{upstream.http}/echo/e2e-http"
    )
    assert code == 0, err
    ca = str(system.data_dir / "ca.pem")
    code, _, err = await run_curl(
        "-x", system.proxy, "--cacert", ca, f"{upstream.https}/echo/e2e-https"
    )
    assert code == 0, err

    async def find(path: str) -> dict[str, Any] | None:
        flows = await _walk(api, 1000, host="127.0.0.1")
        done = [f for f in flows if f["path"] == path and f["state"] == "completed"]
        return done[0] if done else None

    plain = await _eventually(lambda: find("/echo/e2e-http"))
    secure = await _eventually(lambda: find("/echo/e2e-https"))
    assert plain["scheme"] == "http" and plain["method"] == "POST" and plain["status"] == 200
    assert secure["scheme"] == "https" and secure["port"] == upstream.https_port
    detail = (await api.get(f"/api/flows/{plain['id']}")).json()
    assert detail["request"]["body"] == "hello-e2e"
    assert detail["request"]["encoding"] == "utf-8"
    assert '"body": "hello-e2e"' in detail["response"]["body"].replace('":"', '": "')
    raw = await api.get(f"/api/flows/{plain['id']}/request/body")
    assert raw.content == b"hello-e2e"


async def test_filters_and_pagination_walk_2500_flows(
    system: System, api: httpx.AsyncClient, upstream: Upstream
) -> None:
    sem = asyncio.Semaphore(25)

    async with httpx.AsyncClient(proxy=system.proxy, timeout=30) as client:

        async def one(i: int) -> None:
            async with sem:
                code = 201 if i % 2 else 202
                r = await client.put(f"{upstream.http}/status/{code}")
                assert r.status_code == code

        await asyncio.gather(*(one(i) for i in range(2500)))

    async def all_stored() -> list[dict[str, Any]] | None:
        flows = await _walk(api, 1000, method="PUT")
        return flows if len(flows) >= 2500 else None

    await _eventually(all_stored, timeout=30)
    for limit in (100, 1000):
        flows = await _walk(api, limit, method="PUT")
        ids = [f["id"] for f in flows]
        assert len(ids) == 2500 and len(set(ids)) == 2500, "gaps or repeats"
        assert ids == sorted(ids, reverse=True), "not newest first"
    created = await _walk(api, 1000, method="PUT", status=201)
    accepted = await _walk(api, 1000, method="put", min_status=202, max_status=202)
    assert len(created) == 1250 and len(accepted) == 1250
    assert {f["status"] for f in created} == {201}
    none = await _walk(api, 1000, method="PUT", host="*.example.com")
    assert none == []


async def _active_drip(api: httpx.AsyncClient) -> dict[str, Any] | None:
    """The active ``/drip`` flow, once the store lists it."""
    flows = await _walk(api, 100, state="active", host="127.0.0.1")
    mine = [f for f in flows if f["path"].startswith("/drip")]
    return mine[0] if mine else None


async def test_delete_kills_a_slow_active_flow(
    system: System, api: httpx.AsyncClient, upstream: Upstream
) -> None:
    async with httpx.AsyncClient(proxy=system.proxy, timeout=30) as client:
        async with client.stream("GET", f"{upstream.http}/drip?s=0.05&n=400") as resp:
            assert resp.status_code == 200
            chunks = resp.aiter_bytes()
            await chunks.__anext__()

            flow = await _eventually(lambda: _active_drip(api))
            r = await api.delete(f"/api/flows/{flow['id']}")
            assert r.status_code == 200, r.text
            with pytest.raises(httpx.HTTPError):
                async for _ in chunks:
                    pass

    async def killed() -> bool:
        r = await api.get(f"/api/flows/{flow['id']}")
        return r.status_code == 200 and r.json()["state"] == "killed"

    await _eventually(killed)
    again = await api.delete(f"/api/flows/{flow['id']}")
    assert again.status_code == 409 and again.json()["code"] == "FLOW_NOT_ACTIVE"
    unknown = await api.delete("/api/flows/0123456789abcdef01234567")
    assert unknown.status_code == 404 and unknown.json()["code"] == "FLOW_NOT_FOUND"


async def test_stop_then_start(system: System, api: httpx.AsyncClient, upstream: Upstream) -> None:
    r = await api.post("/api/proxy/stop", json={"deadline": 2})
    assert r.status_code == 200, r.text
    assert (await api.get("/api/proxy/status")).json()["state"] == "stopped"
    host, port = system.proxy.removeprefix("http://").split(":")
    with pytest.raises(OSError):
        _, w = await asyncio.open_connection(host, int(port))
        w.close()
    r = await api.post("/api/proxy/start")
    assert r.status_code == 200, r.text
    assert (await api.get("/api/proxy/status")).json()["state"] == "running"
    async with httpx.AsyncClient(proxy=system.proxy) as client:
        assert (await client.get(f"{upstream.http}/echo/after-start")).status_code == 200


async def test_store_killed_mid_ingest_loses_and_duplicates_nothing(
    system: System, api: httpx.AsyncClient, upstream: Upstream
) -> None:
    store = system.child("store")

    async with httpx.AsyncClient(proxy=system.proxy, timeout=30) as client:

        async def burst(n: int) -> None:
            for _ in range(n):
                r = await client.patch(f"{upstream.http}/echo/ingest")
                assert r.status_code == 200

        sender = asyncio.gather(*(burst(100) for _ in range(10)))
        await asyncio.sleep(0.3)
        store.send_signal(signal.SIGKILL)  # `up` restarts it with backoff
        await sender

    async def all_there() -> list[dict[str, Any]] | None:
        flows = await _walk(api, 1000, method="PATCH")
        return flows if len(flows) >= 1000 else None

    flows = await _eventually(all_there, timeout=40)
    ids = [f["id"] for f in flows]
    assert len(ids) == 1000 and len(set(ids)) == 1000
    assert system.child("store").pid != store.pid


async def test_config_change_applies_without_restart(
    system: System, api: httpx.AsyncClient, upstream: Upstream
) -> None:
    current = await api.get("/api/config")
    etag = current.headers["etag"]
    doc = {**current.json()["config"], "capture_body_limit": 16}
    r = await api.put("/api/config", json=doc, headers={"If-Match": etag})
    assert r.status_code == 200, r.text
    assert r.json()["applied"], r.json()
    stale = await api.put("/api/config", json=doc, headers={"If-Match": etag})
    assert stale.status_code == 412
    ctx = ssl.create_default_context(cafile=str(system.data_dir / "ca.pem"))
    async with httpx.AsyncClient(proxy=system.proxy, verify=ctx) as client:
        resp = await client.post(f"{upstream.https}/echo/limit", content=b"A" * 100)
    assert resp.status_code == 200

    async def recorded() -> dict[str, Any] | None:
        flows = await _walk(api, 100, host="127.0.0.1")
        done = [f for f in flows if f["path"] == "/echo/limit" and f["state"] == "completed"]
        return done[0] if done else None

    flow = await _eventually(recorded)
    detail = (await api.get(f"/api/flows/{flow['id']}")).json()
    assert detail["request"]["size"] == 100
    assert detail["request"]["truncated"] is True
    assert detail["request"]["body"] == "A" * 16


async def test_up_serves_prometheus_metrics(system: System, upstream: Upstream) -> None:
    code, _, err = await run_curl("-x", system.proxy, f"{upstream.http}/echo/e2e-metrics")
    assert code == 0, err

    async def scraped(address: str, needle: str) -> str | None:
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            text = (await client.get(f"http://{address}/metrics")).text
        return text if needle in text and f"{needle} 0.0" not in text else None

    await _eventually(
        lambda: scraped(system.metrics["proxy"], "proxyfleet_proxy_flows_finished_total")
    )
    await _eventually(
        lambda: scraped(system.metrics["store"], "proxyfleet_store_events_ingested_total")
    )
    api = system.api.removeprefix("http://")
    assert await _eventually(lambda: scraped(api, "proxyfleet_api_requests_in_flight"))


async def test_proxy_killed_mid_flow_ends_it_as_error_and_up_brings_a_new_one(
    system: System, api: httpx.AsyncClient, upstream: Upstream
) -> None:
    """Issue 7, item 13: a replica killed with SIGKILL never ends its flows itself; the
    store does once the replica is gone, so the flow is listed as an error and DELETE
    answers 409 instead of waiting forever. ``up`` restarts the proxy."""
    proxy = system.child("proxy")
    async with httpx.AsyncClient(proxy=system.proxy, timeout=30) as client:
        async with client.stream("GET", f"{upstream.http}/drip?s=0.05&n=400") as resp:
            assert resp.status_code == 200
            chunks = resp.aiter_bytes()
            await chunks.__anext__()

            flow = await _eventually(lambda: _active_drip(api))
            proxy.send_signal(signal.SIGKILL)
            with pytest.raises(httpx.HTTPError):
                async for _ in chunks:
                    pass

    async def ended() -> dict[str, Any] | None:
        r = await api.get(f"/api/flows/{flow['id']}")
        body: dict[str, Any] = r.json()
        return body if r.status_code == 200 and body["state"] == "error" else None

    detail = await _eventually(ended, timeout=30)
    assert detail["error"] == f"replica gone: {flow['replica']}"
    again = await api.delete(f"/api/flows/{flow['id']}")
    assert again.status_code == 409 and again.json()["code"] == "FLOW_NOT_ACTIVE"

    async def restarted() -> bool:
        try:
            child = system.child("proxy")
        except AssertionError:
            return False
        status = (await api.get("/api/proxy/status")).json()
        return child.pid != proxy.pid and status["state"] == "running"

    await _eventually(restarted, timeout=30)
    async with httpx.AsyncClient(proxy=system.proxy, timeout=10) as client:
        assert (await client.get(f"{upstream.http}/echo/after-kill")).status_code == 200


async def test_up_prints_the_web_ui_and_it_asks_for_a_key(system: System) -> None:
    printed = (system.data_dir / "up.log").read_text()
    line = next(ln for ln in printed.splitlines() if ln.strip().startswith("web UI:"))
    url = line.split()[2]
    assert url == f"{system.api}/ui"
    async with httpx.AsyncClient() as client:
        first = await client.get(url)
        assert first.status_code == 303 and first.headers["location"] == "/ui/flows"
        login = await client.get(f"{system.api}/ui/flows")
        assert login.status_code == 303 and login.headers["location"].startswith("/ui/login")
