"""Query parameters are validated the same way on every ``/api`` route: an unknown one
is a 422 naming ``query.<param>``, whichever route it is sent to, before anything runs."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from libs.common.natsserver import EmbeddedNats
from tests.unit.test_api_support import ADMIN, READ, api_client, api_settings


@pytest.fixture
def nats_url(restartable_nats: EmbeddedNats) -> str:
    return restartable_nats.url


@pytest.fixture
async def client(nats_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(api_settings(nats_url, tmp_path)) as c:
        yield c


def _operations(schema: dict[str, Any]) -> list[tuple[str, str]]:
    ops = []
    for path, item in schema["paths"].items():
        if path.startswith("/api/"):
            for method in item:
                ops.append((method.upper(), re.sub(r"\{[^}]+\}", "0123abcd", path)))
    return ops


async def test_every_route_refuses_an_unknown_parameter(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/api/openapi.json", headers=READ)).json()
    operations = [*_operations(schema), ("GET", "/api/openapi.json")]
    assert len(operations) >= 18
    for method, path in operations:
        headers = READ if method == "GET" else ADMIN
        resp = await client.request(method, f"{path}?bogus_param=1", headers=headers, json={})
        assert resp.status_code == 422, (method, path, resp.text)
        assert resp.headers["content-type"] == "application/problem+json"
        fields = [e["field"] for e in resp.json()["errors"]]
        assert "query.bogus_param" in fields, (method, path, fields)
    # nothing was written on the way
    assert (await client.get("/api/config", headers=READ)).json()["revision"] == 0


async def test_declared_parameters_still_work(client: httpx.AsyncClient) -> None:
    resp = await client.get("/api/config/history?limit=3", headers=READ)
    assert resp.status_code == 200, resp.text
    bad = await client.get("/api/config/history?limit=0&limt=3", headers=READ)
    assert bad.status_code == 422
    assert [e["field"] for e in bad.json()["errors"]] == ["query.limt"]  # unknown first
    assert (
        await client.get("/api/proxy/status?replica=none-here", headers=READ)
    ).status_code == 404


async def test_routes_that_validate_their_own_query_keep_their_messages(
    client: httpx.AsyncClient,
) -> None:
    """The flows listing, the streams and the event log check their query strings
    themselves (pydantic, extra=forbid); the shared check leaves them alone."""
    resp = await client.get("/api/flows/stream?since=1", headers=READ)
    assert resp.status_code == 422
    (error,) = resp.json()["errors"]
    assert error["field"] == "query.since" and "live stream" in error["message"]
    for path in ("/api/flows", "/api/events"):
        resp = await client.get(f"{path}?bogus=1", headers=READ)
        assert resp.status_code == 422
        (error,) = resp.json()["errors"]
        assert error["field"] == "query.bogus" and "this route takes" not in error["message"]
    # everywhere else the message says what the route does take
    resp = await client.get("/api/config/history?bogus=1", headers=READ)
    assert "this route takes: limit" in resp.json()["errors"][0]["message"]
