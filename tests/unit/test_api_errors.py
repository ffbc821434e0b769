"""Every error is RFC 9457 problem+json with a stable code, and OpenAPI says so."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from libs.common.natsserver import EmbeddedNats
from services.api import store as store_module
from tests.unit.test_api_support import (
    ADMIN,
    READ,
    CannedStore,
    api_client,
    api_settings,
    eventually,
)

PROBLEM_FIELDS = {"type", "title", "status", "detail", "instance", "code"}


@pytest.fixture
def nats_url(restartable_nats: EmbeddedNats) -> str:
    return restartable_nats.url


@pytest.fixture
async def client(nats_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(api_settings(nats_url, tmp_path, api_store_timeout=0.3)) as c:
        yield c


def assert_problem(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = resp.json()
    assert PROBLEM_FIELDS <= set(body), body
    assert body["status"] == status and body["code"] == code
    assert body["instance"] == resp.request.url.path
    assert body["type"].startswith("urn:proxyfleet:problem:")
    assert "Traceback" not in resp.text
    return body


async def test_unknown_route_and_method(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/nope", headers=READ), 404, "NOT_FOUND")
    assert_problem(await client.get("/api/nope", headers=READ), 404, "NOT_FOUND")
    resp = await client.delete("/api/config", headers=ADMIN)
    assert_problem(resp, 405, "METHOD_NOT_ALLOWED")
    assert {"GET", "PUT", "PATCH"} <= set(resp.headers["allow"].split(", "))


async def test_validation_errors_name_the_field(client: httpx.AsyncClient) -> None:
    body = assert_problem(
        await client.get("/api/flows?limit=0&state=bogus", headers=READ), 422, "VALIDATION_ERROR"
    )
    fields = {e["field"]: e for e in body["errors"]}
    assert set(fields) == {"query.limit", "query.state"}
    assert fields["query.limit"]["type"] == "greater_than_equal"
    assert all(e["message"] for e in body["errors"])
    body = assert_problem(
        await client.post("/api/proxy/stop", json={"deadline": 4000}, headers=ADMIN),
        422,
        "VALIDATION_ERROR",
    )
    assert [e["field"] for e in body["errors"]] == ["body.deadline"]
    body = assert_problem(
        await client.post(
            "/api/proxy/start",
            content=b"{oops",
            headers={**ADMIN, "content-type": "application/json"},
        ),
        422,
        "VALIDATION_ERROR",
    )
    assert body["errors"][0]["field"] == "body" and body["errors"][0]["type"] == "json_invalid"
    body = assert_problem(
        await client.get("/api/flows/bad%20id", headers=READ), 422, "VALIDATION_ERROR"
    )
    assert body["errors"][0]["field"] == "path.flow_id"


async def test_store_absent_or_silent_is_503(client: httpx.AsyncClient, nats_url: str) -> None:
    body = assert_problem(await client.get("/api/flows", headers=READ), 503, "STORE_UNAVAILABLE")
    assert "no flow store" in body["detail"]

    async def silent(verb: str, body: dict[str, Any]) -> None:
        return None

    store = await CannedStore(silent).start(nats_url)
    try:
        body = assert_problem(
            await client.get("/api/flows/abc", headers=READ), 503, "STORE_UNAVAILABLE"
        )
        assert "did not answer" in body["detail"]
    finally:
        await store.stop()


async def test_store_errors_map_to_codes(client: httpx.AsyncClient, nats_url: str) -> None:
    async def answer(verb: str, body: dict[str, Any]) -> dict[str, Any]:
        if verb == "get":
            return {"error": {"code": "FLOW_NOT_FOUND", "message": "no flow with id 'x'"}}
        if body.get("cursor"):
            return {"error": {"code": "BAD_QUERY", "message": "cursor: not a cursor"}}
        return {"error": {"code": "SOMETHING_NEW", "message": "disk on fire"}}

    store = await CannedStore(answer).start(nats_url)
    try:
        assert_problem(await client.get("/api/flows/x", headers=READ), 404, "FLOW_NOT_FOUND")
        body = assert_problem(
            await client.get("/api/flows?cursor=zzz", headers=READ), 422, "BAD_QUERY"
        )
        assert body["errors"][0]["field"] == "query.cursor"
        assert_problem(await client.get("/api/flows", headers=READ), 502, "STORE_ERROR")
    finally:
        await store.stop()


async def test_a_bug_is_a_500_problem_without_traceback(
    nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(self: Any, verb: str, body: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(store_module.StoreClient, "call", broken)
    settings = api_settings(nats_url, tmp_path)
    async with api_client(settings, raise_app_exceptions=False) as client:
        resp = await client.get("/api/flows", headers=READ)
        body = assert_problem(resp, 500, "INTERNAL_ERROR")
        assert "secret internals" not in resp.text and "RuntimeError" not in body["detail"]


async def test_without_nats_readyz_and_routes_are_503(nats_url: str, tmp_path: Path) -> None:
    async with api_client(api_settings(nats_url, tmp_path), lifespan=False) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert_problem(await client.get("/readyz"), 503, "NOT_READY")
        assert_problem(await client.get("/api/proxy/status"), 401, "AUTH_REQUIRED")
        assert_problem(await client.get("/api/proxy/status", headers=READ), 503, "BUS_UNAVAILABLE")


async def test_readyz_follows_the_nats_connection(
    restartable_nats: EmbeddedNats, tmp_path: Path
) -> None:
    settings = api_settings(restartable_nats.url, tmp_path)
    async with api_client(settings) as client:
        assert (await client.get("/readyz")).status_code == 200
        restartable_nats.stop()

        async def status() -> int:
            return (await client.get("/readyz")).status_code

        async def down() -> bool:
            return await status() == 503

        async def up() -> bool:
            return await status() == 200

        await eventually(down, 5.0, "readyz 503 after NATS stopped")
        assert_problem(await client.get("/readyz"), 503, "NOT_READY")
        assert_problem(await client.get("/api/proxy/status", headers=READ), 503, "BUS_UNAVAILABLE")
        restartable_nats.start()
        await eventually(up, 10.0, "readyz 200 after NATS came back")


def test_openapi_documents_problems_everywhere(tmp_path: Path) -> None:
    from services.api.app import create_app

    app = create_app(api_settings("nats://127.0.0.1:1", tmp_path))
    schema = app.openapi()
    assert "Problem" in schema["components"]["schemas"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    ops = 0
    for path, item in schema["paths"].items():
        for method, op in item.items():
            ops += 1
            for status, resp in op["responses"].items():
                if int(status) >= 400:
                    assert list(resp["content"]) == ["application/problem+json"], (path, status)
            if path.startswith("/api/"):
                assert {"401", "403"} <= set(op["responses"]), (method, path)
                assert op["security"] == [{"ApiKey": []}, {"Bearer": []}]
            else:
                assert "security" not in op
    assert ops >= 14
