"""``decode=true`` on ``GET /api/flows/{id}`` and the raw body routes, and bodies of active
flows, end to end: real traffic through a real proxy replica into a real store, read
back through the API in process."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.integration.coded import BIG, CODERS, PNG, SLUGS, TEXT, coded_upstream
from tests.integration.conftest import MakeProxy
from tests.integration.harness import Upstream
from tests.integration.test_api import nats_url  # noqa: F401  (fixture: a NATS of its own)
from tests.unit.test_api_support import READ, eventually

# every test runs against the real store of test_api (its own NATS per test)
pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("store")]


@pytest.fixture
async def coded() -> AsyncIterator[str]:
    async with coded_upstream() as base:
        yield base


async def fetch_raw(client: httpx.AsyncClient, url: str) -> int:
    """GET through the proxy without decoding (a corrupt body would fail httpx)."""
    async with client.stream("GET", url) as resp:
        async for _ in resp.aiter_raw():
            pass
        return resp.status_code


async def stored(api: httpx.AsyncClient, path: str, state: str = "completed") -> dict[str, Any]:
    """The listing entry of the flow with ``path`` once the store has it in ``state``."""

    async def probe() -> dict[str, Any] | None:
        resp = await api.get("/api/flows", params={"limit": 100}, headers=READ)
        for f in resp.json()["flows"]:
            if f["path"] == path and f["state"] == state:
                return dict(f)
        return None

    found: dict[str, Any] = await eventually(probe, 10.0, f"flow {path} {state}")
    return found


async def test_each_coding_is_decoded_on_request(
    api: httpx.AsyncClient, make_proxy: MakeProxy, coded: str
) -> None:
    proxy = await make_proxy()
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
        for slug in SLUGS.values():
            assert await fetch_raw(client, f"{coded}/coded/{slug}") == 200
    for name, slug in SLUGS.items():
        flow_id = (await stored(api, f"/coded/{slug}"))["id"]
        wire = CODERS[name](TEXT)
        plain = (await api.get(f"/api/flows/{flow_id}", headers=READ)).json()["response"]
        assert base64.b64decode(plain["body"]) == wire and plain["encoding"] == "base64"
        assert "decoded" not in plain and "content_encoding" not in plain  # as before
        resp = await api.get(f"/api/flows/{flow_id}", params={"decode": "true"}, headers=READ)
        part = resp.json()["response"]
        assert part["body"] == TEXT.decode() and part["encoding"] == "utf-8", name
        assert part["decoded"] is True and part["content_encoding"] == name
        assert part["decoded_size"] == len(TEXT) and part["size"] == len(wire)
        assert "decode_error" not in part
        assert resp.json()["request"]["decoded"] is False  # nothing to undo there
        raw = await api.get(
            f"/api/flows/{flow_id}/response/body", params={"decode": "true"}, headers=READ
        )
        assert raw.status_code == 200 and raw.content == TEXT
        assert raw.headers["x-flow-decoded"] == name
        assert "x-flow-content-encoding" not in raw.headers
        assert "content-encoding" not in raw.headers
        assert raw.headers["x-flow-body-size"] == str(len(wire))
        raw = await api.get(f"/api/flows/{flow_id}/response/body", headers=READ)
        assert raw.content == wire and raw.headers["x-flow-content-encoding"] == name


async def test_undecodable_bodies_are_served_as_recorded_saying_why(
    api: httpx.AsyncClient, make_proxy: MakeProxy, coded: str
) -> None:
    proxy = await make_proxy(capture_body_limit=1000)
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
        assert await fetch_raw(client, f"{coded}/corrupt") == 200
        assert await fetch_raw(client, f"{coded}/big") == 200
    cases = {"/corrupt": "invalid", "/big": "truncated"}
    for path, why in cases.items():
        flow_id = (await stored(api, path))["id"]
        resp = await api.get(f"/api/flows/{flow_id}", params={"decode": "true"}, headers=READ)
        assert resp.status_code == 200
        part = resp.json()["response"]
        assert part["decoded"] is False and part["decode_error"] == why
        assert part["content_encoding"] == "gzip" and part["encoding"] == "base64"
        recorded = base64.b64decode(part["body"])
        raw = await api.get(
            f"/api/flows/{flow_id}/response/body", params={"decode": "true"}, headers=READ
        )
        assert raw.status_code == 200 and raw.content == recorded
        assert raw.headers["x-flow-decode-error"] == why
        assert raw.headers["x-flow-content-encoding"] == "gzip"
        assert "x-flow-decoded" not in raw.headers
    big = (await stored(api, "/big"))["id"]
    part = (await api.get(f"/api/flows/{big}", params={"decode": "true"}, headers=READ)).json()
    assert part["response"]["truncated"] is True and part["response"]["size"] > len(BIG) // 2
    assert len(base64.b64decode(part["response"]["body"])) == 1000


async def test_binary_decoded_body_is_base64(
    api: httpx.AsyncClient, make_proxy: MakeProxy, coded: str
) -> None:
    proxy = await make_proxy()
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
        assert (await client.get(f"{coded}/png")).status_code == 200
    flow_id = (await stored(api, "/png"))["id"]
    resp = await api.get(f"/api/flows/{flow_id}", params={"decode": "true"}, headers=READ)
    part = resp.json()["response"]
    assert part["encoding"] == "base64" and base64.b64decode(part["body"]) == PNG
    assert part["decoded"] is False and part["content_encoding"] is None


@pytest.mark.parametrize(
    "route", ["/api/flows/{id}", "/api/flows/{id}/request/body", "/api/flows/{id}/response/body"]
)
async def test_decode_takes_only_true_or_false_and_nothing_else_is_accepted(
    api: httpx.AsyncClient, make_proxy: MakeProxy, upstream: Upstream, route: str
) -> None:
    proxy = await make_proxy()
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
        await client.post(f"{upstream.http}/echo/params", content=b"x")
    url = route.format(id=(await stored(api, "/echo/params"))["id"])
    for value in ("yes", "1", "TRUE", ""):
        resp = await api.get(url, params={"decode": value}, headers=READ)
        assert resp.status_code == 422, (value, resp.text)
        assert resp.json()["errors"][0]["field"] == "query.decode"
    resp = await api.get(url, params={"decode": "false", "decoded": "true"}, headers=READ)
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "query.decoded"
    for value in ("true", "false"):
        assert (await api.get(url, params={"decode": value}, headers=READ)).status_code == 200


async def test_active_flow_bodies_are_null_and_final_empty_ones_are_empty(
    api: httpx.AsyncClient, make_proxy: MakeProxy, upstream: Upstream
) -> None:
    proxy = await make_proxy()
    async with httpx.AsyncClient(proxy=proxy.url, timeout=30) as client:
        drip = asyncio.create_task(client.get(f"{upstream.http}/drip?n=400&s=0.05"))
        try:
            flow_id = (await stored(api, "/drip?n=400&s=0.05", state="active"))["id"]
            flow = (await api.get(f"/api/flows/{flow_id}", headers=READ)).json()
            assert flow["state"] == "active"
            assert flow["request"]["body"] is None and flow["request"]["encoding"] is None
            if flow["response"] is not None:
                assert flow["response"]["body"] is None
            for which in ("request", "response"):
                resp = await api.get(f"/api/flows/{flow_id}/{which}/body", headers=READ)
                assert resp.status_code == 404, resp.text
                assert resp.json()["code"] == "BODY_NOT_AVAILABLE"
                assert "still active" in resp.json()["detail"]
            params = {"decode": "true"}
            decoded = await api.get(f"/api/flows/{flow_id}", params=params, headers=READ)
            assert decoded.json()["request"]["body"] is None
        finally:
            drip.cancel()
        # a finished GET: its empty request body is known and empty, not missing
        assert (await client.get(f"{upstream.http}/status/204")).status_code == 204
    flow_id = (await stored(api, "/status/204"))["id"]
    flow = (await api.get(f"/api/flows/{flow_id}", headers=READ)).json()
    assert flow["request"]["body"] == "" and flow["request"]["encoding"] == "utf-8"
    assert flow["response"]["body"] == ""
    resp = await api.get(f"/api/flows/{flow_id}/request/body", headers=READ)
    assert resp.status_code == 200 and resp.content == b""
