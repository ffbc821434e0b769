"""The store when replicas vanish and NATS goes away: a real NATS of the test's own, a
real SQLite store, replica registry entries and flow events written by hand (what a
replica would write), so that "the replica is killed" is simply "it stops writing".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from libs.common import events, subjects
from libs.common.bus import Bus
from libs.common.natsserver import EmbeddedNats
from libs.common.settings import StoreSettings
from services.store.main import Store
from tests.integration.test_store import MakeStore, event, eventually, new_id, publish, rpc

REGISTRY_TTL = 3.0  # a replica heartbeats every third of it, as the real ones do


@pytest.fixture
def nats_url(restartable_nats: EmbeddedNats) -> str:
    return restartable_nats.url


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_url, "lifecycle-test", timeout=5.0)
    await b.ensure_streams()
    try:
        yield b
    finally:
        await b.close()


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
            "store_ingest_workers": 0,
            **overrides,
        }
        store = Store(StoreSettings.model_validate(values))
        await store.start()
        started.append(store)
        return store

    yield _make
    for store in started:
        await store.stop()


def _status(replica: str, started_at: float) -> bytes:
    return orjson.dumps(
        {
            "id": replica,
            "state": "running",
            "listen": "127.0.0.1:1",
            "mode": "regular",
            "started_at": started_at,  # fixed for a run, as a real replica's
            "updated_at": time.time(),
        }
    )


class FakeReplica:
    """A registry entry heartbeated like a replica's, until ``kill()`` (no deregistration)."""

    def __init__(self, bus: Bus, replica: str) -> None:
        self.bus = bus
        self.id = replica
        self.started_at = time.time()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> FakeReplica:
        kv = await self.bus.replicas_kv(REGISTRY_TTL)
        await kv.put(self.id, _status(self.id, self.started_at))
        self._task = asyncio.create_task(self._beat())
        return self

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(REGISTRY_TTL / 3)
            with contextlib.suppress(Exception):  # NATS away: try again
                kv = await self.bus.replicas_kv(REGISTRY_TTL)
                await kv.put(self.id, _status(self.id, self.started_at))

    async def kill(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def _flow(bus: Bus, flow_id: str) -> dict[str, Any] | None:
    reply = await rpc(bus, "get", {"id": flow_id})
    flow: dict[str, Any] | None = reply.get("flow")
    return flow


async def _gone_events(bus: Bus, replica: str) -> int:
    try:
        info = await bus.js.stream_info(
            subjects.EVENTS_STREAM,
            subjects_filter=subjects.events_subject(replica, events.REPLICA_GONE),
        )
    except Exception:
        return 0
    return sum((info.state.subjects or {}).values())


async def test_a_killed_replicas_active_flows_end_as_error(make_store: MakeStore, bus: Bus) -> None:
    store = await make_store()
    dead = await FakeReplica(bus, "dead-1").start()
    alive = await FakeReplica(bus, "alive-1").start()
    open_ids = [new_id() for _ in range(3)]
    done_id, other_id = new_id(), new_id()
    await publish(bus, [event(f, "active", replica=dead.id) for f in open_ids], dead.id)
    await publish(bus, [event(done_id, "active", replica=dead.id)], dead.id)
    await publish(bus, [event(done_id, "completed", replica=dead.id)], dead.id)
    await publish(bus, [event(other_id, "active", replica=alive.id)], alive.id)

    async def ingested() -> bool:
        return (await rpc(bus, "count"))["count"] == 5

    await eventually(ingested, what="flows ingested")
    assert store.registry_watch is not None
    await eventually(
        lambda: _async(_known(store, {dead.id, alive.id})), what="the store saw both replicas"
    )
    await dead.kill()  # SIGKILL, as far as the registry can tell: no deregistration

    async def ended() -> bool:
        flows = [await _flow(bus, f) for f in open_ids]
        return all(f is not None and f["state"] == "error" for f in flows)

    await eventually(ended, what="the dead replica's open flows ended")
    for flow_id in open_ids:
        flow = await _flow(bus, flow_id)
        assert flow is not None and flow["error"] == f"replica gone: {dead.id}"
    listed = await rpc(bus, "list", {"state": "error", "replica": dead.id})
    assert {f["id"] for f in listed["flows"]} == set(open_ids)
    assert all(f["error"] == f"replica gone: {dead.id}" for f in listed["flows"])
    finished = await _flow(bus, done_id)
    assert finished is not None and finished["state"] == "completed"  # not touched
    running = await _flow(bus, other_id)
    assert running is not None and running["state"] == "active"  # other replica: not touched
    assert (await rpc(bus, "count", {"state": "active"}))["count"] == 1

    # The replica's own final event, arriving late (redelivered, or it was not gone after
    # all), still wins over the store's presumption; a second one does not.
    late = open_ids[0]
    await publish(bus, [event(late, "completed", replica=dead.id)], dead.id)

    async def replaced() -> bool:
        flow = await _flow(bus, late)
        return flow is not None and flow["state"] == "completed"

    await eventually(replaced, what="the real final event replaced the presumed one")
    await publish(bus, [event(late, "killed", replica=dead.id)], dead.id)
    # a started event of the dead replica still on its way is ended by the next sweeps
    straggler = new_id()
    await publish(bus, [event(straggler, "active", replica=dead.id)], dead.id)

    async def straggler_ended() -> bool:
        flow = await _flow(bus, straggler)
        return flow is not None and flow["state"] == "error"

    await eventually(straggler_ended, what="a late started event of a gone replica ended")
    flow = await _flow(bus, late)
    assert flow is not None and flow["state"] == "completed"  # the first final event won
    assert await _gone_events(bus, dead.id) == 1
    await alive.kill()


def _known(store: Store, ids: set[str]) -> bool:
    assert store.registry_watch is not None
    return ids <= set(store.registry_watch.known)


async def test_a_nats_outage_longer_than_the_ttl_reports_no_live_replica_gone(
    make_store: MakeStore, bus: Bus, restartable_nats: EmbeddedNats
) -> None:
    store = await make_store()
    live = await FakeReplica(bus, "live-1").start()
    flow_id = new_id()
    await publish(bus, [event(flow_id, "active", replica=live.id)], live.id)
    watch = store.registry_watch
    assert watch is not None
    await eventually(lambda: _async(_known(store, {live.id})), what="the store saw the replica")
    await eventually(lambda: _async(watch.ttl is not None), what="the registry's TTL read")

    await live.kill()  # its heartbeats fail during the outage anyway
    await asyncio.to_thread(restartable_nats.stop)
    await asyncio.sleep(REGISTRY_TTL * 1.5)  # the outage: the entry expires meanwhile
    await asyncio.to_thread(restartable_nats.start)
    assert store.bus is not None
    # The replica's next heartbeat comes up to one interval after the reconnect; the
    # store reconnects first and checks meanwhile (without the grace: "gone").
    await eventually(
        lambda: _async(store.bus is not None and store.bus.last_reconnect is not None),
        what="the store reconnected",
    )
    await asyncio.sleep(REGISTRY_TTL / 3)
    await live.start()

    async def grace_over() -> bool:
        assert store.bus is not None
        return store.bus.last_reconnect is not None and not watch.in_grace()

    await eventually(grace_over, timeout=20, what="the store reconnected and the grace ended")
    checks = watch.checks
    await eventually(lambda: _async(watch.checks >= checks + 3), what="three more checks")
    assert watch.gone == 0, "a live replica was reported gone after an outage"
    flow = await _flow(bus, flow_id)
    assert flow is not None and flow["state"] == "active"

    await live.kill()  # really gone now: reported, its flow ended
    await eventually(lambda: _async(watch.gone == 1), what="the replica reported gone")

    async def ended() -> bool:
        flow = await _flow(bus, flow_id)
        return flow is not None and flow["state"] == "error"

    await eventually(ended, what="its flow ended")


async def _async(value: bool) -> bool:
    return value


async def test_a_replica_restarted_under_its_id_ends_its_earlier_runs_flows(
    make_store: MakeStore, bus: Bus
) -> None:
    """A replica SIGKILLed and restarted with the same FLEET_REPLICA_ID before its entry
    expired is never "gone": its new run's first heartbeat ends what the old run left."""
    await make_store()
    first = await FakeReplica(bus, "same-id").start()
    old_ids = [new_id() for _ in range(2)]
    await publish(bus, [event(f, "active", replica=first.id) for f in old_ids], first.id)

    async def ingested() -> bool:
        return (await rpc(bus, "count", {"replica": first.id}))["count"] == 2

    await eventually(ingested, what="the first run's flows ingested")
    await first.kill()
    second = FakeReplica(bus, "same-id")  # a new run: a later started_at, the same id
    await second.start()
    new_flow = new_id()
    await publish(bus, [event(new_flow, "active", replica=second.id)], second.id)

    async def old_ended() -> bool:
        flows = [await _flow(bus, f) for f in old_ids]
        return all(f is not None and f["state"] == "error" for f in flows)

    await eventually(old_ended, what="the earlier run's open flows ended")
    for flow_id in old_ids:
        flow = await _flow(bus, flow_id)
        assert flow is not None and flow["error"] == "replica restarted: same-id"

    async def new_seen() -> bool:
        return await _flow(bus, new_flow) is not None

    await eventually(new_seen, what="the new run's flow ingested")
    current = await _flow(bus, new_flow)
    assert current is not None and current["state"] == "active"  # the new run's: untouched
    assert await _gone_events(bus, "same-id") == 0  # it never was gone
    await second.kill()
