"""Lifecycle and kill against fake replicas (registry entries + command responders)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from libs.common.models import CommandReply
from libs.common.natsserver import EmbeddedNats
from services.api.routes.proxy import fleet_state
from tests.unit.test_api_support import (
    ADMIN,
    READ,
    CannedStore,
    FakeReplica,
    api_client,
    api_settings,
    replica_status,
)


@pytest.fixture
def nats_url(restartable_nats: EmbeddedNats) -> str:
    return restartable_nats.url


@pytest.fixture
async def client(nats_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(api_settings(nats_url, tmp_path, api_command_timeout=0.5)) as c:
        yield c


@pytest.fixture
async def fleet(nats_url: str) -> AsyncIterator[list[FakeReplica]]:
    replicas: list[FakeReplica] = []
    yield replicas
    for r in replicas:
        await r.stop()


async def add(fleet: list[FakeReplica], nats_url: str, name: str, **kw: Any) -> FakeReplica:
    answer = kw.pop("answer", None)
    r = await FakeReplica(replica_status(name, **kw), answer).start(nats_url)
    fleet.append(r)
    return r


def test_fleet_state() -> None:
    assert fleet_state([]) == "no_replicas"
    assert fleet_state([replica_status("a"), replica_status("b")]) == "running"
    assert fleet_state([replica_status("a", "stopped")]) == "stopped"
    assert fleet_state([replica_status("a"), replica_status("b", "stopped")]) == "partial"
    assert fleet_state([replica_status("a", "stopping")]) == "partial"


async def test_status_without_replicas(client: httpx.AsyncClient) -> None:
    resp = await client.get("/api/proxy/status", headers=READ)
    assert resp.status_code == 200
    assert resp.json()["state"] == "no_replicas" and resp.json()["replicas"] == []
    for verb in ("start", "stop"):
        resp = await client.post(f"/api/proxy/{verb}", headers=ADMIN)
        assert resp.status_code == 503 and resp.json()["code"] == "NO_REPLICAS"


async def test_status_aggregates_the_registry(
    client: httpx.AsyncClient, fleet: list[FakeReplica], nats_url: str
) -> None:
    await add(fleet, nats_url, "b", active_connections=2, flows_total=10, config_revision=3)
    await add(fleet, nats_url, "a", state="stopped", flows_total=5, started_at=time.time() - 60)
    body = (await client.get("/api/proxy/status", headers=READ)).json()
    assert body["state"] == "partial"
    assert [r["id"] for r in body["replicas"]] == ["a", "b"]
    a, b = body["replicas"]
    assert a["state"] == "stopped" and 59 <= a["uptime_s"] < 120
    assert b["active_connections"] == 2 and b["config_revision"] == 3 and b["listen"]
    assert body["totals"] == {
        "replicas": 2,
        "running": 1,
        "active_connections": 2,
        "active_flows": 0,
        "flows_total": 15,
    }
    await fleet[1].stop()  # deregisters
    fleet.pop()
    body = (await client.get("/api/proxy/status", headers=READ)).json()
    assert body["state"] == "running" and [r["id"] for r in body["replicas"]] == ["b"]


async def test_status_of_one_replica(
    client: httpx.AsyncClient, fleet: list[FakeReplica], nats_url: str
) -> None:
    await add(fleet, nats_url, "a", state="stopped", flows_total=5)
    await add(fleet, nats_url, "b", active_connections=2, flows_total=10)
    resp = await client.get("/api/proxy/status", params={"replica": "b"}, headers=READ)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["state"] == "running" and [r["id"] for r in body["replicas"]] == ["b"]
    assert body["totals"]["replicas"] == 1 and body["totals"]["flows_total"] == 10
    stopped = (await client.get("/api/proxy/status?replica=a", headers=READ)).json()
    assert stopped["state"] == "stopped"
    unknown = await client.get("/api/proxy/status?replica=nope", headers=READ)
    assert unknown.status_code == 404 and unknown.json()["code"] == "REPLICA_NOT_FOUND"
    assert unknown.headers["content-type"] == "application/problem+json"
    for bad in ("", "a.b", "*", "x" * 65, "../a"):
        resp = await client.get("/api/proxy/status", params={"replica": bad}, headers=READ)
        assert resp.status_code == 422, (bad, resp.text)
        assert [e["field"] for e in resp.json()["errors"]] == ["query.replica"]


async def test_status_refuses_unknown_parameters(client: httpx.AsyncClient) -> None:
    resp = await client.get("/api/proxy/status?replcia=a&state=running", headers=READ)
    assert resp.status_code == 422 and resp.json()["code"] == "VALIDATION_ERROR"
    errors = resp.json()["errors"]
    assert [e["field"] for e in errors] == ["query.replcia", "query.state"]
    assert all(e["type"] == "extra_forbidden" and "replica" in e["message"] for e in errors)
    # the key is checked first: a bad key is a 401 whatever the query
    assert (await client.get("/api/proxy/status?replcia=a")).status_code == 401


async def test_stop_and_start_all(
    client: httpx.AsyncClient, fleet: list[FakeReplica], nats_url: str
) -> None:
    for name in ("r1", "r2"):
        await add(fleet, nats_url, name)
    resp = await client.post("/api/proxy/stop", json={"deadline": 3}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["action"] == "stop" and body["ok"] is True
    assert [(r["id"], r["ok"], r["state"]) for r in body["replicas"]] == [
        ("r1", True, "stopped"),
        ("r2", True, "stopped"),
    ]
    assert all(r.commands == [("stop", {"deadline": 3.0})] for r in fleet)
    assert (await client.get("/api/proxy/status", headers=READ)).json()["state"] == "stopped"
    resp = await client.post("/api/proxy/start", headers=ADMIN)
    assert resp.json()["ok"] is True
    assert (await client.get("/api/proxy/status", headers=READ)).json()["state"] == "running"


async def test_one_replica_by_name(
    client: httpx.AsyncClient, fleet: list[FakeReplica], nats_url: str
) -> None:
    r1 = await add(fleet, nats_url, "r1")
    r2 = await add(fleet, nats_url, "r2")
    resp = await client.post("/api/proxy/stop", json={"replica": "r2"}, headers=ADMIN)
    assert [r["id"] for r in resp.json()["replicas"]] == ["r2"]
    assert r2.commands == [("stop", {"deadline": 10.0})] and r1.commands == []
    assert (await client.get("/api/proxy/status", headers=READ)).json()["state"] == "partial"
    resp = await client.post("/api/proxy/start", json={"replica": "ghost"}, headers=ADMIN)
    assert resp.status_code == 404 and resp.json()["code"] == "REPLICA_NOT_FOUND"
    for bad in ("all", "a.b", "x" * 65, "*"):
        resp = await client.post("/api/proxy/start", json={"replica": bad}, headers=ADMIN)
        assert resp.status_code == 422, bad
        assert resp.json()["errors"][0]["field"] == "body.replica"


async def test_a_silent_replica_is_reported(
    client: httpx.AsyncClient, fleet: list[FakeReplica], nats_url: str
) -> None:
    await add(fleet, nats_url, "talks")
    await add(fleet, nats_url, "mute", answer=lambda verb, body: None)
    started = time.monotonic()
    resp = await client.post("/api/proxy/start", headers=ADMIN)
    assert time.monotonic() - started < 3
    body = resp.json()
    assert resp.status_code == 200 and body["ok"] is False
    mute = next(r for r in body["replicas"] if r["id"] == "mute")
    assert mute["ok"] is False and mute["code"] == "NO_REPLY"
    resp = await client.post("/api/proxy/start", json={"replica": "mute"}, headers=ADMIN)
    assert resp.status_code == 503 and resp.json()["code"] == "NO_REPLICAS"


async def test_stop_waits_longer_than_the_deadline(
    client: httpx.AsyncClient, fleet: list[FakeReplica], nats_url: str
) -> None:
    """A replica draining for 1 s answers after the 0.5 s command timeout: still counted."""
    replica = await add(fleet, nats_url, "drainer")
    replica.delay = 1.0
    resp = await client.post("/api/proxy/stop", json={"deadline": 1.5}, headers=ADMIN)
    assert resp.status_code == 200 and resp.json()["ok"] is True, resp.text
    resp = await client.post("/api/proxy/stop", json={"deadline": 0}, headers=ADMIN)
    assert resp.status_code == 503 and resp.json()["code"] == "NO_REPLICAS"


async def test_kill(client: httpx.AsyncClient, fleet: list[FakeReplica], nats_url: str) -> None:
    def holder(verb: str, body: dict[str, Any]) -> CommandReply | None:
        if verb == "kill" and body["flow_id"] == "live1":
            return CommandReply(replica="holder", ok=True, data={"found": True})
        return CommandReply(replica="holder", ok=False, code="FLOW_NOT_ACTIVE")

    await add(fleet, nats_url, "other")
    await add(fleet, nats_url, "holder", answer=holder)

    async def answer(verb: str, body: dict[str, Any]) -> dict[str, Any]:
        if body["id"] == "done1":
            return {"flow": {"id": "done1", "state": "completed"}}
        if body["id"] == "stale1":
            return {"flow": {"id": "stale1", "state": "active"}}
        return {"error": {"code": "FLOW_NOT_FOUND", "message": "no"}}

    store = await CannedStore(answer).start(nats_url)
    try:
        resp = await client.delete("/api/flows/live1", headers=ADMIN)
        assert resp.status_code == 200
        assert resp.json() == {"killed": True, "id": "live1", "replica": "holder"}
        assert store.requests == []  # the replica's answer was enough
        resp = await client.delete("/api/flows/done1", headers=ADMIN)
        assert resp.status_code == 409 and resp.json()["code"] == "FLOW_NOT_ACTIVE"
        assert "completed" in resp.json()["detail"]
        resp = await client.delete("/api/flows/stale1", headers=ADMIN)
        assert resp.status_code == 409
        resp = await client.delete("/api/flows/nope1", headers=ADMIN)
        assert resp.status_code == 404 and resp.json()["code"] == "FLOW_NOT_FOUND"
    finally:
        await store.stop()
