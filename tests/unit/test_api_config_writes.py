"""``/api/config`` beyond PUT of a bare document: GET's body put back, merge patches,
rollback to a past revision, the saved document against what replicas run, and the
audit records of all of them (refused ones included). A real NATS of the test's own;
replicas are fakes whose registry entries the test writes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest

from libs.common import subjects
from libs.common.bus import Bus, barrier
from libs.common.models import RuntimeConfig
from libs.common.natsserver import EmbeddedNats
from services.api import merge_patch
from services.api.config_compare import diff
from tests.unit.test_api_support import (
    ADMIN,
    READ,
    FakeReplica,
    api_client,
    api_settings,
    eventually,
    replica_status,
)

DEFAULTS = RuntimeConfig.model_validate({}).model_dump(mode="json")
MERGE = {**ADMIN, "Content-Type": "application/merge-patch+json"}


@pytest.fixture
def nats_url(restartable_nats: EmbeddedNats) -> str:
    return restartable_nats.url


@pytest.fixture
async def client(nats_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(api_settings(nats_url, tmp_path)) as c:
        yield c


def doc(**changes: Any) -> dict[str, Any]:
    return {**DEFAULTS, **changes}


async def saved(client: httpx.AsyncClient) -> dict[str, Any]:
    resp = await client.get("/api/config", headers=READ)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert resp.headers["etag"] == f'"{body["revision"]}"'
    return body


async def put(client: httpx.AsyncClient, **changes: Any) -> int:
    resp = await client.put("/api/config", json=doc(**changes), headers=ADMIN)
    assert resp.status_code == 200, resp.text
    revision: int = resp.json()["revision"]
    return revision


def fields_of(resp: httpx.Response) -> list[str]:
    return sorted(e["field"] for e in resp.json()["errors"])


# -- merge patch, pure ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "patch", "result"),
    [  # RFC 7396 appendix A
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_merge_patch_rfc_examples(target: Any, patch: Any, result: Any) -> None:
    before = orjson.dumps(target)
    assert merge_patch.apply(target, patch) == result
    assert orjson.dumps(target) == before  # the saved document is never modified in place


def test_diff_names_fields_in_config_order() -> None:
    running = doc(capture_body_limit=1, ignore_hosts=["a"])
    assert [d.model_dump() for d in diff(doc(), running)] == [
        {"field": "capture_body_limit", "saved": DEFAULTS["capture_body_limit"], "running": 1},
        {"field": "ignore_hosts", "saved": [], "running": ["a"]},
    ]
    assert diff(doc(), doc()) == []


# -- PUT of what GET returned ---------------------------------------------------------------
async def test_get_body_round_trips_through_put(client: httpx.AsyncClient) -> None:
    first = await saved(client)
    assert first == {"revision": 0, "config": DEFAULTS}
    first["config"]["capture_body_limit"] = 4321
    resp = await client.put("/api/config", json=first, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    now = await saved(client)
    assert now["config"] == doc(capture_body_limit=4321) and now["revision"] > 0
    # unchanged, GET's body goes straight back (idempotent: same document, new revision)
    again = await client.put("/api/config", json=now, headers=ADMIN)
    assert again.status_code == 200 and again.json()["config"] == now["config"]
    assert again.json()["revision"] > now["revision"]
    # the body's revision is a precondition: the old one is stale now
    stale = await client.put("/api/config", json=now, headers=ADMIN)
    assert stale.status_code == 412 and stale.json()["code"] == "CONFIG_CONFLICT"
    assert stale.headers["etag"] == f'"{again.json()["revision"]}"'
    assert (await saved(client))["revision"] == again.json()["revision"]


async def test_put_replaces_the_whole_document(client: httpx.AsyncClient) -> None:
    await put(client, capture_body_limit=5, ignore_hosts=["a.example"])
    resp = await client.put("/api/config", json={"intercept_tls": False}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    assert (await saved(client))["config"] == doc(intercept_tls=False)  # the rest: defaults


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"revision": 0}, ["body.config"]),
        ({"revision": "0", "config": {}}, ["body.revision"]),
        ({"revision": True, "config": {}}, ["body.revision"]),
        ({"revision": -1, "config": {}}, ["body.revision"]),
        ({"revision": 10**30, "config": {}}, ["body.revision"]),
        ({"revision": 0, "config": [1]}, ["body.config"]),
        ({"revision": 0, "config": {}, "applied": []}, ["body.applied"]),
        ({"config": {}, "capture_body_limit": 1}, ["body.capture_body_limit"]),
        (
            {"revision": 0, "config": {"capture_body_limit": "lots", "nope": 1}},
            ["body.config.capture_body_limit", "body.config.nope"],
        ),
    ],
)
async def test_bad_envelopes_are_422_naming_the_field(
    client: httpx.AsyncClient, body: Any, fields: list[str]
) -> None:
    resp = await client.put("/api/config", json=body, headers=ADMIN)
    assert resp.status_code == 422, resp.text
    assert resp.json()["code"] == "CONFIG_INVALID" and fields_of(resp) == fields
    assert (await saved(client))["revision"] == 0


async def test_if_match_and_body_revision(client: httpx.AsyncClient) -> None:
    rev = await put(client, capture_body_limit=1)
    body = {"revision": rev, "config": doc(capture_body_limit=2)}
    # they disagree: the request can never succeed, so 422 (not a 412 to retry)
    resp = await client.put("/api/config", json=body, headers={**ADMIN, "If-Match": '"1234"'})
    assert resp.status_code == 422 and resp.json()["code"] == "VALIDATION_ERROR"
    assert fields_of(resp) == ["body.revision", "header.If-Match"]
    # they agree: the write lands
    ok = await client.put("/api/config", json=body, headers={**ADMIN, "If-Match": f'"{rev}"'})
    assert ok.status_code == 200, ok.text
    # they agree and both are stale: 412
    late = await client.put("/api/config", json=body, headers={**ADMIN, "If-Match": f'"{rev}"'})
    assert late.status_code == 412
    assert (await saved(client))["config"]["capture_body_limit"] == 2


# -- PATCH ------------------------------------------------------------------------------------
async def test_patch_merges_into_the_saved_document(client: httpx.AsyncClient) -> None:
    await put(client, capture_body_limit=5, ignore_hosts=["a.example"], intercept_tls=False)
    resp = await client.patch(
        "/api/config", content=b'{"capture_body_limit": 9, "intercept_tls": null}', headers=MERGE
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    want = doc(capture_body_limit=9, ignore_hosts=["a.example"])  # intercept_tls: default
    assert body["config"] == want and resp.headers["etag"] == f'"{body["revision"]}"'
    assert body["applied"] == [] and body["pending"] == [] and body["rejected"] == []
    assert (await saved(client)) == {"revision": body["revision"], "config": want}
    # application/json is accepted too; an empty patch changes nothing but is a write
    plain = await client.patch("/api/config", json={}, headers=ADMIN)
    assert plain.status_code == 200 and plain.json()["config"] == want


async def test_patch_on_nothing_saved_patches_the_defaults(client: httpx.AsyncClient) -> None:
    resp = await client.patch("/api/config", json={"ignore_hosts": ["x.example"]}, headers=MERGE)
    assert resp.status_code == 200, resp.text
    assert (await saved(client))["config"] == doc(ignore_hosts=["x.example"])


@pytest.mark.parametrize(
    ("raw", "fields"),
    [
        (b"[1, 2]", ["body"]),
        (b'"capture_body_limit"', ["body"]),
        (b"3", ["body"]),
        (b"null", ["body"]),
        (b"{nope", ["body"]),
        (b"", ["body"]),
        (b'{"capture_body_limit": "lots"}', ["body.capture_body_limit"]),
        (b'{"capture_body_limit": -1}', ["body.capture_body_limit"]),
        (
            b'{"intercept_tls": "maybe", "upstream_read_timeout": 0}',
            [
                "body.intercept_tls",
                "body.upstream_read_timeout",
            ],
        ),
        (b'{"ignore_hosts": "a.example"}', ["body.ignore_hosts"]),
        (b'{"redact_headers": ["bad name"]}', ["body.redact_headers"]),
        (b'{"no_such_option": true}', ["body.no_such_option"]),
    ],
)
async def test_bad_patches_are_422_and_keep_the_good_config(
    client: httpx.AsyncClient, raw: bytes, fields: list[str]
) -> None:
    rev = await put(client, capture_body_limit=77)
    resp = await client.patch("/api/config", content=raw, headers=MERGE)
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["code"] == "CONFIG_INVALID" and fields_of(resp) == fields
    assert await saved(client) == {"revision": rev, "config": doc(capture_body_limit=77)}


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/json-patch+json"])
async def test_patch_needs_a_merge_patch_media_type(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    headers = dict(ADMIN)
    if content_type is not None:
        headers["Content-Type"] = content_type
    resp = await client.patch("/api/config", content=b'{"capture_body_limit": 1}', headers=headers)
    assert resp.status_code == 415 and resp.json()["code"] == "UNSUPPORTED_MEDIA_TYPE"
    assert resp.headers["accept-patch"] == "application/merge-patch+json"
    assert (await saved(client))["revision"] == 0


async def test_patch_honours_if_match(client: httpx.AsyncClient) -> None:
    rev = await put(client, capture_body_limit=1)
    stale = await client.patch(
        "/api/config", json={"capture_body_limit": 2}, headers={**MERGE, "If-Match": '"999"'}
    )
    assert stale.status_code == 412 and stale.json()["code"] == "CONFIG_CONFLICT"
    assert stale.headers["etag"] == f'"{rev}"'
    ok = await client.patch(
        "/api/config", json={"capture_body_limit": 3}, headers={**MERGE, "If-Match": f'"{rev}"'}
    )
    assert ok.status_code == 200 and ok.json()["config"]["capture_body_limit"] == 3


async def test_patch_is_too_large_past_the_document_limit(client: httpx.AsyncClient) -> None:
    resp = await client.patch("/api/config", content=b" " * (300 * 1024), headers=MERGE)
    assert resp.status_code == 413 and resp.json()["code"] == "PAYLOAD_TOO_LARGE"


# -- rollback -----------------------------------------------------------------------------
async def test_rollback_writes_an_old_document_as_a_new_revision(
    client: httpx.AsyncClient,
) -> None:
    first = await put(client, capture_body_limit=1, ignore_hosts=["one.example"])
    second = await put(client, capture_body_limit=2)
    resp = await client.post("/api/config/rollback", json={"revision": first}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["revision"] > second and resp.headers["etag"] == f'"{body["revision"]}"'
    assert body["config"] == doc(capture_body_limit=1, ignore_hosts=["one.example"])
    assert (await saved(client))["config"] == body["config"]
    history = (await client.get("/api/config/history", headers=READ)).json()["revisions"]
    assert [h["revision"] for h in history] == [body["revision"], second, first]
    # If-Match: stale is 412, current goes through
    stale = await client.post(
        "/api/config/rollback",
        json={"revision": second},
        headers={**ADMIN, "If-Match": f'"{second}"'},
    )
    assert stale.status_code == 412 and stale.json()["code"] == "CONFIG_CONFLICT"
    ok = await client.post(
        "/api/config/rollback",
        json={"revision": second},
        headers={**ADMIN, "If-Match": f'"{body["revision"]}"'},
    )
    assert ok.status_code == 200 and ok.json()["config"] == doc(capture_body_limit=2)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"revision": 0}, "body.revision"),
        ({"revision": -1}, "body.revision"),
        ({"revision": "1"}, "body.revision"),
        ({"revision": 1.5}, "body.revision"),
        ({"revision": True}, "body.revision"),
        ({"revision": None}, "body.revision"),
        ({"revision": 10**30}, "body.revision"),
        ({}, "body.revision"),
        ({"revision": 1, "force": True}, "body.force"),
        ([1], "body"),
        (None, "body"),
    ],
)
async def test_bad_rollback_bodies_are_422(
    client: httpx.AsyncClient, body: Any, field: str
) -> None:
    rev = await put(client, capture_body_limit=3)
    resp = await client.post("/api/config/rollback", json=body, headers=ADMIN)
    assert resp.status_code == 422, resp.text
    assert resp.json()["code"] == "VALIDATION_ERROR"
    assert resp.json()["errors"][0]["field"] == field
    assert (await saved(client))["revision"] == rev


async def test_rollback_to_what_is_not_a_config_write_is_404(
    client: httpx.AsyncClient, nats_url: str
) -> None:
    rev = await put(client, capture_body_limit=3)
    bus = await Bus.connect(nats_url, "test", 5.0)
    try:
        kv = await bus.config_kv()
        ca = await kv.put(subjects.CA_CERT_KEY, b"-----BEGIN CERTIFICATE-----")  # same bucket
        await kv.delete(subjects.CONFIG_KEY)
        deleted = (await kv.status()).stream_info.state.last_seq  # delete returns no revision
        rev = await kv.create(subjects.CONFIG_KEY, orjson.dumps(doc(capture_body_limit=5)))
    finally:
        await bus.close()
    for target in (ca, deleted, 10**12, 2**63 - 1):
        resp = await client.post("/api/config/rollback", json={"revision": target}, headers=ADMIN)
        assert resp.status_code == 404, (target, resp.text)
        assert resp.json()["code"] == "CONFIG_REVISION_NOT_FOUND"
    assert (await saved(client))["revision"] == rev


async def test_rollback_to_an_invalid_document_is_422(
    client: httpx.AsyncClient, nats_url: str
) -> None:
    bus = await Bus.connect(nats_url, "test", 5.0)
    try:
        kv = await bus.config_kv()
        bad = await kv.put(subjects.CONFIG_KEY, b'{"capture_body_limit": "lots"}')
    finally:
        await bus.close()
    good = await client.put(
        "/api/config", json=doc(capture_body_limit=8), headers={**ADMIN, "If-Match": f'"{bad}"'}
    )
    assert good.status_code == 200, good.text
    resp = await client.post("/api/config/rollback", json={"revision": bad}, headers=ADMIN)
    assert resp.status_code == 422 and resp.json()["code"] == "CONFIG_INVALID"
    assert fields_of(resp) == ["body.revision"]
    assert "capture_body_limit" in resp.json()["detail"]
    assert (await saved(client))["config"] == doc(capture_body_limit=8)


# -- compare ------------------------------------------------------------------------------
async def test_compare_saved_against_each_replica(client: httpx.AsyncClient, nats_url: str) -> None:
    old = await put(client, capture_body_limit=1, ignore_hosts=["old.example"])
    current = await put(client, capture_body_limit=2)
    statuses = [
        replica_status("a-current", config_revision=current),
        replica_status("b-old", config_revision=old),
        replica_status(
            "c-refused", config_revision=old, config_error=f"revision {current} rejected: no"
        ),
        replica_status("d-never", config_revision=0),
        replica_status("e-forgotten", config_revision=10**9),  # not in the history
    ]
    replicas = [await FakeReplica(s).start(nats_url) for s in statuses]
    try:
        resp = await client.get("/api/config/compare", headers=READ)
    finally:
        for r in replicas:
            await r.stop()
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["revision"] == current and body["config"] == doc(capture_body_limit=2)
    assert body["in_sync"] is False
    by_id = {r["id"]: r for r in body["replicas"]}
    assert list(by_id) == ["a-current", "b-old", "c-refused", "d-never", "e-forgotten"]
    a = by_id["a-current"]
    assert (a["state"], a["revision"], a["differences"]) == ("applied", current, [])
    assert a["running"] == doc(capture_body_limit=2) and a["error"] is None
    old_diff = [
        {"field": "capture_body_limit", "saved": 2, "running": 1},
        {"field": "ignore_hosts", "saved": [], "running": ["old.example"]},
    ]
    b = by_id["b-old"]
    assert (b["state"], b["revision"], b["differences"]) == ("pending", old, old_diff)
    c = by_id["c-refused"]
    assert (c["state"], c["differences"]) == ("rejected", old_diff)
    assert c["error"] == f"revision {current} rejected: no"
    d = by_id["d-never"]
    assert d["state"] == "pending" and d["running"] == DEFAULTS
    assert d["differences"] == [
        {"field": "capture_body_limit", "saved": 2, "running": DEFAULTS["capture_body_limit"]}
    ]
    e = by_id["e-forgotten"]
    assert e["state"] == "applied" and e["running"] is None and e["differences"] is None


async def test_compare_in_sync_and_without_replicas(
    client: httpx.AsyncClient, nats_url: str
) -> None:
    empty = await client.get("/api/config/compare", headers=READ)
    assert empty.json() == {"revision": 0, "config": DEFAULTS, "in_sync": True, "replicas": []}
    rev = await put(client, intercept_tls=False)
    replica = await FakeReplica(replica_status("only", config_revision=rev)).start(nats_url)
    try:
        body = (await client.get("/api/config/compare", headers=READ)).json()
    finally:
        await replica.stop()
    assert body["in_sync"] is True and body["replicas"][0]["differences"] == []
    bad = await client.get("/api/config/compare?replica=only", headers=READ)
    assert bad.status_code == 422 and fields_of(bad) == ["query.replica"]


# -- audit --------------------------------------------------------------------------------
async def test_writes_and_refusals_are_audited_with_their_action(
    client: httpx.AsyncClient, nats_url: str
) -> None:
    nc = await nats.connect(nats_url)
    records: list[dict[str, Any]] = []

    async def on_msg(msg: Any) -> None:
        records.append(orjson.loads(msg.data)["data"])

    try:
        await nc.subscribe(
            subjects.events_subject(subjects.API_SOURCE, subjects.AUDIT_EVENT), cb=on_msg
        )
        await barrier(nc)
        first = await put(client, capture_body_limit=1)
        patched = await client.patch("/api/config", json={"capture_body_limit": 2}, headers=MERGE)
        back = await client.post("/api/config/rollback", json={"revision": first}, headers=ADMIN)
        calls = [
            ("PUT", "/api/config", {}),  # no key: 401
            ("PATCH", "/api/config", READ),  # read key: 403
            ("POST", "/api/config/rollback", READ),
            ("POST", "/api/config/rollback", {"X-API-Key": "nope"}),
            ("POST", "/api/proxy/start", {}),
            ("POST", "/api/proxy/stop", READ),
            ("DELETE", "/api/config", ADMIN),  # 405: no route has this method
            ("PUT", "/api/config?dry_run=1", ADMIN),  # 422 on the query, before the body
        ]
        for method, url, headers in calls:
            await client.request(method, url, headers=headers, json={})

        async def all_recorded() -> bool:
            return len(records) == 3 + len(calls)

        await eventually(all_recorded, 3.0, "every audit record")
    finally:
        await nc.close()
    put_rec, patch_rec, rollback_rec, *refused = records
    assert put_rec["action"] == "config.put" and put_rec["after"] == first
    assert patch_rec["action"] == "config.patch" and patch_rec["fields"] == ["capture_body_limit"]
    assert patch_rec["before"] == first and patch_rec["after"] == patched.json()["revision"]
    assert rollback_rec["action"] == "config.rollback" and rollback_rec["to"] == first
    assert rollback_rec["after"] == back.json()["revision"] and rollback_rec["status"] == 200
    assert [(r["action"], r["status"], r["route"]) for r in refused] == [
        ("config.put", 401, "/api/config"),
        ("config.patch", 403, "/api/config"),
        ("config.rollback", 403, "/api/config/rollback"),
        ("config.rollback", 401, "/api/config/rollback"),
        ("proxy.start", 401, "/api/proxy/start"),
        ("proxy.stop", 403, "/api/proxy/stop"),
        (None, 405, "/api/config"),
        ("config.put", 422, "/api/config"),
    ]
    assert (await saved(client))["revision"] == back.json()["revision"]  # nothing else landed
