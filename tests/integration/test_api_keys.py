"""API keys at runtime: two API replicas (in-process apps) on one real NATS of the test's
own. A key made on one works on both; a revoked key is refused at once where it was
revoked and within a second on the other; configured keys cannot be revoked; secrets
never come back; hostile input is a 422 naming the field."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from libs.common import subjects
from libs.common.bus import Bus
from libs.common.natsserver import EmbeddedNats
from tests.unit.test_api_support import ADMIN, ADMIN_KEY, READ, api_client, api_settings


@pytest.fixture
async def two_apis(
    restartable_nats: EmbeddedNats, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    url = restartable_nats.url
    a_settings = api_settings(url, tmp_path / "a", replica_id="api-a")
    b_settings = api_settings(url, tmp_path / "b", replica_id="api-b")
    async with api_client(a_settings) as a, api_client(b_settings) as b:
        yield a, b


async def _eventually_status(
    client: httpx.AsyncClient, key: str, status: int, within: float
) -> float:
    start = time.monotonic()
    while True:
        r = await client.get("/api/keys", headers={"X-API-Key": key})
        if r.status_code == status:
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"still {r.status_code} after {within}s, wanted {status}")
        await asyncio.sleep(0.02)


async def test_a_key_made_on_one_replica_works_everywhere_and_dies_everywhere(
    two_apis: tuple[httpx.AsyncClient, httpx.AsyncClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = two_apis
    caplog.set_level(logging.DEBUG)
    made = await a.post("/api/keys", headers=ADMIN, json={"scope": "read", "name": "ci bot"})
    assert made.status_code == 201, made.text
    assert made.headers["cache-control"] == "no-store"
    body = made.json()
    secret, key_id = body["secret"], body["id"]
    assert body["scope"] == "read" and body["created_by"] == "ops" and len(secret) > 40
    mine = {"X-API-Key": secret}
    assert (await a.get("/api/keys", headers=mine)).status_code == 200  # at once, here
    assert await _eventually_status(b, secret, 200, within=1.0) < 1.0  # within a second there
    assert (await b.post("/api/keys", headers=mine, json={"scope": "admin"})).status_code == 403
    listing = (await b.get("/api/keys", headers=READ)).json()["keys"]
    row = next(k for k in listing if k["id"] == key_id)
    assert row["source"] == "runtime" and row["name"] == "ci bot"
    assert row["last_used"] is not None  # it was just used, on this replica
    assert {"ops", "viewer"} <= {k["id"] for k in listing if k["source"] == "settings"}
    assert secret not in (await a.get("/api/keys", headers=ADMIN)).text  # never again
    assert "secret" not in row and "sha256" not in row

    revoked = await b.delete(f"/api/keys/{key_id}", headers=ADMIN)
    assert revoked.status_code == 204
    assert (await b.get("/api/keys", headers=mine)).status_code == 401  # at once, here
    assert await _eventually_status(a, secret, 401, within=1.0) < 1.0
    assert (await a.delete(f"/api/keys/{key_id}", headers=ADMIN)).status_code == 404
    assert secret not in caplog.text and ADMIN_KEY not in caplog.text  # never logged


async def test_last_use_is_recorded_and_shared(
    two_apis: tuple[httpx.AsyncClient, httpx.AsyncClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = two_apis
    made = (await a.post("/api/keys", headers=ADMIN, json={"scope": "read"})).json()
    before = time.time()
    assert (await b.get("/api/keys", headers={"X-API-Key": made["secret"]})).status_code == 200
    await b.app.state.services.keys._flush()  # type: ignore[attr-defined]
    rows = (await a.get("/api/keys", headers=ADMIN)).json()["keys"]
    used = next(k for k in rows if k["id"] == made["id"])["last_used"]
    assert used is not None and used >= before - 1


async def test_configured_keys_cannot_be_revoked_and_bad_input_is_named(
    two_apis: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    a, _ = two_apis
    r = await a.delete("/api/keys/ops", headers=ADMIN)
    assert r.status_code == 409 and r.json()["code"] == "KEY_STATIC"
    assert (await a.get("/api/keys", headers=ADMIN)).status_code == 200  # still honoured
    assert (await a.delete("/api/keys/k1", headers=READ)).status_code == 403  # read cannot
    for bad, field in (
        ({"scope": "root"}, "scope"),
        ({}, "scope"),
        ({"scope": "read", "name": "x" * 201}, "name"),
        ({"scope": "read", "name": "a\nb"}, "name"),
        ({"scope": "read", "secret": "mine"}, "secret"),  # no choosing the secret
    ):
        r = await a.post("/api/keys", headers=ADMIN, json=bad)
        assert r.status_code == 422, (bad, r.text)
        assert any(field in str(e.get("field", "")) for e in r.json()["errors"]), r.json()
    r = await a.delete("/api/keys/" + "x" * 65, headers=ADMIN)
    assert r.status_code == 422


async def test_a_forged_bucket_entry_is_not_a_key(
    two_apis: tuple[httpx.AsyncClient, httpx.AsyncClient], restartable_nats: EmbeddedNats
) -> None:
    """The bucket is data from NATS: an entry that is not a well-formed key is ignored."""
    a, _ = two_apis
    bus = await Bus.connect(restartable_nats.url, "forger", timeout=5.0)
    try:
        kv = await bus.api_keys_kv()
        await kv.put("key.evil", b'{"id": "evil", "scope": "root", "sha256": "00"}')
        await kv.put(
            "key.mismatch", b'{"id": "other", "scope": "admin", "sha256": "' + b"0" * 64 + b'"}'
        )
        await asyncio.sleep(0.3)
    finally:
        await bus.close()
    ids = {k["id"] for k in (await a.get("/api/keys", headers=ADMIN)).json()["keys"]}
    assert "evil" not in ids and "other" not in ids and "mismatch" not in ids
    assert subjects.API_KEYS_BUCKET == "fleet_api_keys"
