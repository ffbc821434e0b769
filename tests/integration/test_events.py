"""The system event log end to end: real NATS of the test's own, real in-process replicas
and stores, the API in process. Events are read back through ``GET /api/events``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from libs.common import events, subjects
from libs.common.bus import Bus
from libs.common.models import Severity
from libs.common.natsserver import EmbeddedNats
from libs.common.settings import StoreSettings
from libs.common.tasks import cancel_and_wait
from services.store.main import Store
from tests.integration.conftest import MakeProxy
from tests.integration.harness import Upstream
from tests.unit.test_api_support import (
    ADMIN,
    ADMIN_KEY,
    READ,
    READ_KEY,
    eventually,
)

pytestmark = pytest.mark.timeout(60)

MakeStore = Callable[..., Awaitable[Store]]


@pytest.fixture
def nats_url(restartable_nats: EmbeddedNats) -> str:
    """A NATS of this test's own: the EVENTS stream holds only this test's events."""
    return restartable_nats.url


@pytest.fixture
async def make_store(nats_url: str, tmp_path: Path) -> AsyncIterator[MakeStore]:
    started: list[Store] = []

    async def _make(name: str = "store0", **overrides: Any) -> Store:
        values: dict[str, Any] = {
            "nats_url": nats_url,
            "data_dir": tmp_path / name,
            "replica_id": name,
            "nats_connect_timeout": 5.0,
            "store_replica_check_interval": 0.2,
            **overrides,
        }
        store = Store(StoreSettings.model_validate(values))
        await store.start()
        started.append(store)
        return store

    yield _make
    for store in started:
        await store.stop()


async def list_events(api: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    resp = await api.get("/api/events", params=params, headers=READ)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def types_of(api: httpx.AsyncClient, **params: Any) -> list[str]:
    return [e["type"] for e in (await list_events(api, **params))["events"]]


async def wait_event(api: httpx.AsyncClient, timeout: float = 5.0, **params: Any) -> dict[str, Any]:
    """The newest event matching ``params``, once there is one."""

    async def newest() -> dict[str, Any] | None:
        found = (await list_events(api, limit=1, **params))["events"]
        return found[0] if found else None

    found: dict[str, Any] = await eventually(newest, timeout, f"an event {params}")
    return found


async def walk(api: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    """Every event of a listing, one page (``limit``) at a time."""
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = dict(params)
        if cursor is not None:
            query["cursor"] = cursor
        page = await list_events(api, **query)
        seen += page["events"]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen


# -- lifecycle ------------------------------------------------------------------------------
async def test_replica_lifecycle_events_filters_and_pages(
    api: httpx.AsyncClient, make_proxy: MakeProxy
) -> None:
    proxy = await make_proxy()
    address = proxy.replica.address
    await proxy.replica.stop(drain=0.5)

    mine = await list_events(api, source=proxy.id)
    lifecycle = ["replica_stopped", "listener_stopped", "replica_started", "listener_started"]
    assert [e["type"] for e in mine["events"]] == lifecycle  # newest first
    assert mine["next_cursor"] is None
    by_type = {e["type"]: e for e in mine["events"]}
    assert by_type["listener_started"]["data"] == {"address": address}
    assert by_type["listener_stopped"]["data"] == {
        "address": address,
        "aborted": 0,
        "deadline": 0.5,
    }
    assert by_type["replica_started"]["data"]["listen"] == address
    assert by_type["replica_started"]["data"]["mode"] == "regular"
    for e in mine["events"]:
        assert e["source"] == proxy.id and e["replica"] == proxy.id
        assert e["severity"] == "info" and len(e["id"]) == 24 and e["seq"] > 0
    seqs = [e["seq"] for e in mine["events"]]
    assert seqs == sorted(seqs, reverse=True)

    # filters
    assert await types_of(api, type="listener_started") == ["listener_started"]
    assert await types_of(api, type="listener_started", source="someone-else") == []
    assert await types_of(api, type="audit") == []
    # time range (the time an event was stored)
    stopping = by_type["listener_stopped"]["time"]
    assert await types_of(api, source=proxy.id, since=stopping) == lifecycle[:2]
    assert await types_of(api, source=proxy.id, until=stopping) == lifecycle[2:]
    assert await types_of(api, since="2999-01-01T00:00:00Z") == []

    # pages: newest first, then oldest first; the cursor is the stream sequence
    desc = await walk(api, source=proxy.id, limit=1)
    assert [e["type"] for e in desc] == lifecycle
    asc = await walk(api, source=proxy.id, limit=3, order="asc")
    assert [e["type"] for e in asc] == lifecycle[::-1]
    page = await list_events(api, source=proxy.id, limit=2)
    assert page["next_cursor"] == page["events"][-1]["seq"]
    rest = await list_events(api, source=proxy.id, cursor=page["next_cursor"])
    assert [e["type"] for e in rest["events"]] == lifecycle[2:]

    # bad queries are problem+json 422s naming the parameter
    for params, field in [
        ({"limit": 0}, "query.limit"),
        ({"limit": 1001}, "query.limit"),
        ({"type": "a.b"}, "query.type"),
        ({"source": "*"}, "query.source"),
        ({"order": "sideways"}, "query.order"),
        ({"cursor": "x"}, "query.cursor"),
        ({"since": "yesterday"}, "query.since"),
        ({"colour": "red"}, "query.colour"),
    ]:
        resp = await api.get("/api/events", params=params, headers=READ)
        assert resp.status_code == 422, (params, resp.text)
        assert resp.headers["content-type"] == "application/problem+json"
        assert resp.json()["errors"][0]["field"] == field


async def test_severity_and_time_range(api: httpx.AsyncClient, nats_url: str) -> None:
    bus = await Bus.connect(nats_url, "test", 5.0)
    try:
        await bus.ensure_streams()
        severities: tuple[Severity, ...] = ("info", "warning", "error", "info", "warning")
        for severity in severities:
            sent = await events.emit(bus, "sev-test", f"t_{severity}", {}, severity)
            assert sent is not None
    finally:
        await bus.close()
    every = await types_of(api, source="sev-test")
    assert every == ["t_warning", "t_info", "t_error", "t_warning", "t_info"]
    # at least: warning means warnings and errors, newest first, paged after filtering
    assert await types_of(api, source="sev-test", severity="warning") == [
        "t_warning",
        "t_error",
        "t_warning",
    ]
    assert await types_of(api, source="sev-test", severity="error") == ["t_error"]
    assert await types_of(api, source="sev-test", severity="info") == every
    page = await list_events(api, source="sev-test", severity="warning", limit=2)
    assert [e["type"] for e in page["events"]] == ["t_warning", "t_error"]
    rest = await list_events(api, source="sev-test", severity="warning", cursor=page["next_cursor"])
    assert [e["type"] for e in rest["events"]] == ["t_warning"] and rest["next_cursor"] is None
    asc = await types_of(api, source="sev-test", severity="warning", order="asc")
    assert asc == ["t_warning", "t_error", "t_warning"]
    # time_range: the last n seconds/minutes/hours/days before now, or all
    for shorthand in ("5m", "1h", "24h", "7d", "all"):
        assert await types_of(api, source="sev-test", time_range=shorthand) == every
    await asyncio.sleep(1.1)
    assert await types_of(api, source="sev-test", time_range="1s") == []
    assert await types_of(api, source="sev-test", time_range="1s", severity="error") == []

    for query, field in [
        ({"time_range": "5x"}, "query.time_range"),
        ({"time_range": "0m"}, "query.time_range"),
        ({"time_range": "1h", "since": "2025-01-01T00:00:00Z"}, "query.time_range"),
        ({"time_range": "all", "until": 5}, "query.time_range"),
        ({"severity": "debug"}, "query.severity"),
        ({"severity": "critical"}, "query.severity"),
        ({"level": "error"}, "query.level"),
    ]:
        resp = await api.get("/api/events", params=query, headers=READ)
        assert resp.status_code == 422, (query, resp.text)
        assert resp.headers["content-type"] == "application/problem+json"
        assert [e["field"] for e in resp.json()["errors"]] == [field], query


# -- config -------------------------------------------------------------------------------
async def test_config_changes_are_audited_applied_and_rejected(
    api: httpx.AsyncClient, make_proxy: MakeProxy, nats_url: str
) -> None:
    proxy = await make_proxy()

    async def registered() -> bool:
        resp = await api.get("/api/proxy/status", headers=READ)
        return proxy.id in {r["id"] for r in resp.json()["replicas"]}

    await eventually(registered, 5.0, "registered")
    resp = await api.put("/api/config", json={"capture_body_limit": 10}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    revision = resp.json()["revision"]

    audit = await wait_event(api, type="audit")
    assert audit["source"] == "api" and audit["replica"] == "api-test"
    data = audit["data"]
    assert data["action"] == "config.put" and data["before"] == 0 and data["after"] == revision
    assert data["key_id"] == "ops" and data["scope"] == "admin"
    assert data["method"] == "PUT" and data["path"] == "/api/config" and data["status"] == 200
    assert data["route"] == "/api/config" and data["applied"] == [proxy.id]
    applied = await wait_event(api, type="config_applied", source=proxy.id)
    assert applied["data"] == {"revision": revision, "previous": 0}

    # a stale write is refused, and audited as refused
    stale = await api.put(
        "/api/config", json={"capture_body_limit": 20}, headers={**ADMIN, "If-Match": '"0"'}
    )
    assert stale.status_code == 412
    refused = (await list_events(api, type="audit", limit=1))["events"][0]
    assert refused["data"]["status"] == 412 and refused["severity"] == "warning"
    assert "after" not in refused["data"]

    # a document written straight into KV that the replica cannot apply
    bus = await Bus.connect(nats_url, "test", 5.0)
    try:
        kv = await bus.config_kv()
        bad = await kv.put(subjects.CONFIG_KEY, b'{"capture_body_limit": "lots"}')
    finally:
        await bus.close()
    rejected = await wait_event(api, type="config_rejected", source=proxy.id)
    assert rejected["severity"] == "warning"
    assert rejected["data"]["revision"] == bad and rejected["data"]["kept_revision"] == revision
    assert "capture_body_limit" in rejected["data"]["reason"]
    assert proxy.ctx.config.revision == revision

    # a write without a valid key is audited too, without the key it presented
    wrong = "wrong-secret-0123456789"
    denied = await api.post("/api/proxy/start", headers={"X-API-Key": wrong})
    assert denied.status_code == 401
    forbidden = await api.post("/api/proxy/start", headers=READ)
    assert forbidden.status_code == 403
    records = (await list_events(api, type="audit", limit=2))["events"]
    assert [(r["data"]["status"], r["data"]["key_id"]) for r in records] == [
        (403, "viewer"),
        (401, None),
    ]
    # refused before the route ran, yet recorded with the action it attempted
    assert [r["data"]["action"] for r in records] == ["proxy.start", "proxy.start"]

    # nothing secret anywhere in the log
    everything = await api.get("/api/events", params={"limit": 1000}, headers=READ)
    for secret in (ADMIN_KEY, READ_KEY, wrong):
        assert secret not in everything.text


# -- kill -----------------------------------------------------------------------------------
async def test_kill_emits_flow_killed_and_an_audit_record(
    api: httpx.AsyncClient, make_proxy: MakeProxy, upstream: Upstream
) -> None:
    proxy = await make_proxy()

    async def registered() -> bool:
        resp = await api.get("/api/proxy/status", headers=READ)
        return proxy.id in {r["id"] for r in resp.json()["replicas"]}

    await eventually(registered, 5.0, "registered")

    async def drip() -> None:
        async with (
            httpx.AsyncClient(proxy=proxy.url, timeout=15) as client,
            client.stream("GET", f"{upstream.http}/drip?s=0.1&n=300") as resp,
        ):
            async for _ in resp.aiter_bytes():
                pass

    task = asyncio.create_task(drip())
    try:

        async def active() -> list[str]:
            return list(proxy.ctx.active)

        (flow_id,) = await eventually(active, 5.0, "the drip flow active")
        resp = await api.delete(f"/api/flows/{flow_id}", headers=ADMIN)
        assert resp.status_code == 200, resp.text
    finally:
        await cancel_and_wait(task)
    killed = await wait_event(api, type="flow_killed")
    assert killed["source"] == proxy.id and killed["data"] == {"flow_id": flow_id}
    audit = await wait_event(api, type="audit")
    assert audit["data"]["action"] == "flow.kill" and audit["data"]["status"] == 200
    assert audit["data"]["flow"] == flow_id and audit["data"]["replica"] == proxy.id
    assert audit["data"]["path"] == f"/api/flows/{flow_id}"
    assert audit["data"]["route"] == "/api/flows/{flow_id}"


# -- replica gone ---------------------------------------------------------------------------
async def test_a_silent_replica_is_reported_gone_once(
    api: httpx.AsyncClient, make_proxy: MakeProxy, make_store: MakeStore
) -> None:
    first = await make_store("store-a")
    # both notice; the event is stored once (two stores share one database: a second
    # database on the stream is refused)
    await make_store("store-b", store_db=first.settings.db_path)
    silent = await make_proxy()
    clean = await make_proxy()

    async def registered() -> bool:
        resp = await api.get("/api/proxy/status", headers=READ)
        return {silent.id, clean.id} <= {r["id"] for r in resp.json()["replicas"]}

    await eventually(registered, 5.0, "registered")
    await asyncio.sleep(0.5)  # the stores' watchers have seen both entries
    await clean.replica.stop(drain=0.1)  # deregisters: not "gone"
    beat = [t for t in silent.replica._tasks if t.get_name() == "heartbeat"]
    await cancel_and_wait(*beat)  # hangs: no heartbeat, no deregistration

    gone = await wait_event(api, timeout=8.0, type="replica_gone")
    assert gone["source"] == silent.id and gone["severity"] == "warning"
    assert gone["data"]["how"] == "expired" and gone["data"]["state"] == "running"
    assert gone["data"]["detected_by"] in ("store-a", "store-b")
    assert gone["data"]["listen"] == silent.replica.address
    await asyncio.sleep(1.5)  # both stores have checked several times by now
    assert await types_of(api, type="replica_gone") == ["replica_gone"]


async def test_store_reports_messages_it_cannot_ingest(
    api: httpx.AsyncClient, make_store: MakeStore, nats_url: str
) -> None:
    await make_store("store0")
    bus = await Bus.connect(nats_url, "test", 5.0)
    try:
        await bus.js_publish(subjects.flows_subject("hand"), b"\x00 not json")
        await bus.js_publish(
            subjects.flows_subject("hand"), orjson.dumps([{"no": "id"}, {"id": "x"}])
        )
    finally:
        await bus.close()
    bad = await wait_event(api, type=events.INGEST_DECODE_ERROR)
    assert bad["source"] == "store0" and bad["severity"] == "warning"
    assert bad["data"]["messages_dropped"] + bad["data"]["events_skipped"] >= 1
