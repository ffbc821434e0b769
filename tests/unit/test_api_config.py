"""``/api/config``: validation, ETag/If-Match compare-and-set, roll-out report, history."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest

from libs.common import subjects
from libs.common.bus import barrier
from libs.common.models import RuntimeConfig
from libs.common.natsserver import EmbeddedNats
from services.api.fleet import classify
from services.api.routes.config import if_match_allows
from tests.unit.test_api_support import (
    ADMIN,
    ADMIN_KEY,
    READ,
    FakeReplica,
    api_client,
    api_settings,
    eventually,
    replica_status,
)

DEFAULTS = RuntimeConfig.model_validate({}).model_dump()


@pytest.fixture
def nats_url(restartable_nats: EmbeddedNats) -> str:
    return restartable_nats.url


@pytest.fixture
async def client(nats_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(api_settings(nats_url, tmp_path)) as c:
        yield c


def doc(**changes: Any) -> dict[str, Any]:
    return {**DEFAULTS, **changes}


def test_if_match_forms() -> None:
    assert if_match_allows('"7"', 7) and if_match_allows("7", 7) and if_match_allows('W/"7"', 7)
    assert if_match_allows('"3", "7"', 7)
    assert not if_match_allows('"6"', 7) and not if_match_allows("abc", 7)
    assert if_match_allows("*", 7) and not if_match_allows("*", 0)
    assert if_match_allows('"0"', 0)


def test_classify() -> None:
    assert classify(replica_status("a", config_revision=5), 5) == ("applied", None)
    assert classify(replica_status("a", config_revision=9), 5) == ("applied", None)
    assert classify(replica_status("a", config_revision=3), 5) == ("pending", None)
    err = "revision 5 rejected: bad"
    assert classify(replica_status("a", config_revision=3, config_error=err), 5) == (
        "rejected",
        err,
    )
    old = "revision 4 rejected: bad"  # an older rejection says nothing about revision 5
    assert classify(replica_status("a", config_revision=3, config_error=old), 5)[0] == "pending"


async def test_defaults_until_written(client: httpx.AsyncClient) -> None:
    resp = await client.get("/api/config", headers=READ)
    assert resp.status_code == 200
    assert resp.headers["etag"] == '"0"'
    assert resp.json() == {"revision": 0, "config": DEFAULTS}


async def test_put_then_get_and_etag(client: httpx.AsyncClient) -> None:
    resp = await client.put("/api/config", json=doc(capture_body_limit=1234), headers=ADMIN)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    rev = body["revision"]
    assert rev > 0 and resp.headers["etag"] == f'"{rev}"'
    assert body["config"]["capture_body_limit"] == 1234
    assert body["applied"] == [] and body["pending"] == [] and body["rejected"] == []
    got = await client.get("/api/config", headers=READ)
    assert got.headers["etag"] == f'"{rev}"' and got.json()["config"]["capture_body_limit"] == 1234
    # If-Match with the current revision succeeds, a stale one is 412 and changes nothing
    ok = await client.put(
        "/api/config", json=doc(capture_body_limit=1), headers={**ADMIN, "If-Match": f'"{rev}"'}
    )
    assert ok.status_code == 200
    rev2 = ok.json()["revision"]
    assert rev2 > rev
    stale = await client.put(
        "/api/config", json=doc(capture_body_limit=2), headers={**ADMIN, "If-Match": f'"{rev}"'}
    )
    assert stale.status_code == 412
    assert stale.headers["content-type"] == "application/problem+json"
    assert stale.json()["code"] == "CONFIG_CONFLICT" and stale.headers["etag"] == f'"{rev2}"'
    now = (await client.get("/api/config", headers=READ)).json()
    assert now == {"revision": rev2, "config": doc(capture_body_limit=1)}


async def test_if_match_on_a_missing_document(client: httpx.AsyncClient) -> None:
    star = await client.put("/api/config", json=doc(), headers={**ADMIN, "If-Match": "*"})
    assert star.status_code == 412
    zero = await client.put("/api/config", json=doc(), headers={**ADMIN, "If-Match": '"0"'})
    assert zero.status_code == 200


@pytest.mark.parametrize(
    ("payload", "fields"),
    [
        (doc(capture_body_limit=-1), ["body.capture_body_limit"]),
        (
            doc(upstream_read_timeout=0, intercept_tls="maybe"),
            ["body.upstream_read_timeout", "body.intercept_tls"],
        ),
        (doc(ignore_hosts=["ok.example", "has space"]), ["body.ignore_hosts"]),
        (doc(unknown_option=1), ["body.unknown_option"]),
        # issue 7's new inputs, hostile values
        (
            doc(client_body_timeout=0, client_body_min_rate=-5),
            ["body.client_body_timeout", "body.client_body_min_rate"],
        ),
        (doc(redact_headers=["x-ok", "bad name", "\r\nx"]), ["body.redact_headers"]),
        (doc(destination_allow=["10.0.0.1/8"]), ["body.destination_allow"]),
        (doc(destination_deny=["127.1", "[::1"]), ["body.destination_deny"]),
        ([1, 2], ["body"]),
        (b"{nope", ["body"]),
    ],
)
async def test_invalid_documents_are_422_and_change_nothing(
    client: httpx.AsyncClient, payload: Any, fields: list[str]
) -> None:
    first = await client.put("/api/config", json=doc(capture_body_limit=77), headers=ADMIN)
    rev = first.json()["revision"]
    if isinstance(payload, bytes):
        resp = await client.put("/api/config", content=payload, headers=ADMIN)
    else:
        resp = await client.put("/api/config", json=payload, headers=ADMIN)
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["code"] == "CONFIG_INVALID"
    assert sorted(e["field"] for e in body["errors"]) == sorted(fields)
    now = await client.get("/api/config", headers=READ)
    assert now.json()["revision"] == rev and now.headers["etag"] == f'"{rev}"'


async def test_oversized_document_is_413(client: httpx.AsyncClient) -> None:
    resp = await client.put("/api/config", content=b" " * (300 * 1024), headers=ADMIN)
    assert resp.status_code == 413 and resp.json()["code"] == "PAYLOAD_TOO_LARGE"


async def test_history_newest_first(client: httpx.AsyncClient) -> None:
    revs = []
    for i in range(25):
        resp = await client.put("/api/config", json=doc(capture_body_limit=i), headers=ADMIN)
        revs.append(resp.json()["revision"])
    resp = await client.get("/api/config/history", headers=READ)
    assert resp.status_code == 200
    entries = resp.json()["revisions"]
    assert [e["revision"] for e in entries] == revs[::-1]
    assert entries[0]["config"]["capture_body_limit"] == 24
    assert entries[0]["operation"] == "put" and entries[0]["time"].endswith(("Z", "+00:00"))
    short = await client.get("/api/config/history?limit=3", headers=READ)
    assert [e["revision"] for e in short.json()["revisions"]] == revs[:-4:-1]


async def test_rollout_report(client: httpx.AsyncClient, nats_url: str) -> None:
    """Replicas that apply, reject, or never report (fakes driven by the test)."""
    replicas: list[FakeReplica] = []
    try:
        for name in ("good", "picky", "slow"):
            replicas.append(await FakeReplica(replica_status(name)).start(nats_url))
        good, picky, _slow = replicas
        # the fakes react to the KV write the way a proxy does: a heartbeat after applying
        resp = await client.get("/api/config", headers=READ)
        next_rev = resp.json()["revision"] + 1  # nothing else writes to this bucket

        async def put() -> httpx.Response:
            return await client.put("/api/config", json=doc(capture_body_limit=5), headers=ADMIN)

        async def react() -> None:
            await asyncio.sleep(0.05)
            good.status = good.status.model_copy(update={"config_revision": next_rev})
            picky.status = picky.status.model_copy(
                update={"config_error": f"revision {next_rev} rejected: no"}
            )
            await good.publish()
            await picky.publish()

        resp, _ = await asyncio.gather(put(), react())
        body = resp.json()
        assert body["revision"] == next_rev
        assert body["applied"] == ["good"]
        assert body["rejected"] == [{"id": "picky", "error": f"revision {next_rev} rejected: no"}]
        assert body["pending"] == ["slow"]
    finally:
        for r in replicas:
            await r.stop()


async def test_concurrent_writes_compare_and_set(client: httpx.AsyncClient) -> None:
    first = await client.put("/api/config", json=doc(), headers=ADMIN)
    etag = first.headers["etag"]
    racing = await asyncio.gather(
        *(
            client.put(
                "/api/config",
                json=doc(capture_body_limit=i),
                headers={**ADMIN, "If-Match": etag},
            )
            for i in range(5)
        )
    )
    codes = sorted(r.status_code for r in racing)
    assert codes == [200, 412, 412, 412, 412]
    # without If-Match every write lands, one after the other
    blind = await asyncio.gather(
        *(
            client.put("/api/config", json=doc(capture_body_limit=i), headers=ADMIN)
            for i in range(5)
        )
    )
    assert [r.status_code for r in blind] == [200] * 5
    assert len({r.json()["revision"] for r in blind}) == 5


async def test_writes_leave_an_audit_record(client: httpx.AsyncClient, nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    records: list[bytes] = []

    async def on_msg(msg: Any) -> None:
        records.append(msg.data)

    async def recorded() -> bool:
        return bool(records)

    try:
        await nc.subscribe(
            subjects.events_subject(subjects.API_SOURCE, subjects.AUDIT_EVENT), cb=on_msg
        )
        await barrier(nc)
        resp = await client.put("/api/config", json=doc(), headers=ADMIN)
        await eventually(recorded, 2.0, "an audit record")
    finally:
        await nc.close()
    record = orjson.loads(records[0])
    assert record["type"] == "audit" and record["source"] == "api"
    data = record["data"]
    assert data["action"] == "config.put" and data["key_id"] == "ops"
    assert data["method"] == "PUT" and data["path"] == "/api/config" and data["status"] == 200
    assert data["after"] == resp.json()["revision"] and data["before"] == 0
    assert ADMIN_KEY.encode() not in records[0]
