"""``GET /api/flows`` query parameters -> the ``FlowQuery`` the store receives."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from libs.common.models import FlowQuery
from libs.common.natsserver import EmbeddedNats
from services.api.params import FlowListParams, parse_time
from tests.unit.test_api_support import READ, CannedStore, api_client, api_settings

PAGE = {
    "flows": [{"id": "b", "host": "a.example.com", "status": 200}, {"id": "a", "status": 404}],
    "next_cursor": "YQ",
}


@pytest.fixture
async def store(restartable_nats: EmbeddedNats) -> AsyncIterator[CannedStore]:
    async def answer(verb: str, body: dict[str, Any]) -> dict[str, Any]:
        return PAGE

    s = await CannedStore(answer).start(restartable_nats.url)
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
async def client(
    restartable_nats: EmbeddedNats, tmp_path: Path, store: CannedStore
) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(api_settings(restartable_nats.url, tmp_path)) as c:
        yield c


def test_parse_time_iso_and_epoch() -> None:
    assert parse_time("1738324800") == 1738324800.0
    assert parse_time("1738324800.25") == 1738324800.25
    assert parse_time("2025-01-31T12:00:00Z") == 1738324800.0
    assert parse_time("2025-01-31T13:00:00+01:00") == 1738324800.0
    assert parse_time("2025-01-31T12:00:00") == 1738324800.0  # no zone: UTC
    assert parse_time("2025-01-31") == datetime(2025, 1, 31, tzinfo=UTC).timestamp()
    assert parse_time(5) == 5
    for bad in ("yesterday", "nan", "-5", "1e999"):
        with pytest.raises(ValueError):
            parse_time(bad)


def test_params_to_query() -> None:
    q = FlowListParams.model_validate(
        {"host": " *.Example.COM ", "method": "post", "since": "2025-01-31T12:00:00Z"}
    ).to_query()
    assert isinstance(q, FlowQuery)
    assert (q.host, q.method, q.since, q.limit) == ("*.example.com", "POST", 1738324800.0, 100)


async def test_listing_passes_filters_and_the_page_through(
    client: httpx.AsyncClient, store: CannedStore
) -> None:
    resp = await client.get(
        "/api/flows",
        params={
            "host": "*.example.com",
            "method": "get",
            "min_status": "200",
            "max_status": "299",
            "state": "completed",
            "replica": "r1",
            "since": "2025-01-31T12:00:00Z",
            "until": "1738400000",
            "limit": "50",
            "cursor": "YWJj",
        },
        headers=READ,
    )
    assert resp.status_code == 200
    assert resp.json() == PAGE
    verb, body = store.requests[-1]
    assert verb == "list"
    assert body == {
        "host": "*.example.com",
        "method": "GET",
        "min_status": 200,
        "max_status": 299,
        "state": "completed",
        "replica": "r1",
        "since": 1738324800.0,
        "until": 1738400000.0,
        "limit": 50,
        "cursor": "YWJj",
    }
    FlowQuery.model_validate(body)  # what the store parses


async def test_defaults(client: httpx.AsyncClient, store: CannedStore) -> None:
    assert (await client.get("/api/flows", headers=READ)).status_code == 200
    assert store.requests[-1] == ("list", {"limit": 100})


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "query.limit"),
        ("limit=1001", "query.limit"),
        ("limit=ten", "query.limit"),
        ("status=99", "query.status"),
        ("state=running", "query.state"),
        ("since=yesterday", "query.since"),
        ("until=-1", "query.until"),
        ("since=2025-02-01&until=2025-01-01", "query.until"),
        ("min_status=500&max_status=200", "query.max_status"),
        ("host=a*.example.com", "query.host"),
        ("host=", "query.host"),
        ("method=GE%20T", "query.method"),
        ("hots=example.com", "query.hots"),
    ],
)
async def test_bad_params_are_422_naming_the_field(
    client: httpx.AsyncClient, store: CannedStore, query: str, field: str
) -> None:
    resp = await client.get(f"/api/flows?{query}", headers=READ)
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["code"] == "VALIDATION_ERROR"
    assert field in [e["field"] for e in body["errors"]]
    assert field in body["detail"]
    assert store.requests == []  # rejected before the store was asked
