"""The flow store end to end: a real NATS of its own per test, a real SQLite file.

Flows come from a real proxy replica and from hand-made batches published into
FLOWS; queries go over the store's NATS endpoints, as the API will send them.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from libs.common import natsurl, subjects
from libs.common.bus import Bus
from libs.common.natsserver import EmbeddedNats
from libs.common.settings import StoreSettings
from services.store.main import Store
from tests.integration.conftest import MakeProxy
from tests.integration.harness import Upstream

ROOT = Path(__file__).resolve().parents[2]

MakeStore = Callable[..., Awaitable[Store]]


@pytest.fixture
def nats_url(restartable_nats: EmbeddedNats) -> str:
    """A NATS of this test's own: the FLOWS stream and the durable start empty."""
    return restartable_nats.url


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_url, "store-test", timeout=5.0)
    await b.ensure_streams()
    try:
        yield b
    finally:
        await b.close()


def store_settings(nats_url: str, data_dir: Path, **overrides: Any) -> StoreSettings:
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "data_dir": data_dir,
        "replica_id": data_dir.name,
        "nats_connect_timeout": 5.0,
    }
    values.update(overrides)
    return StoreSettings(**values)


@pytest.fixture
async def make_store(nats_url: str, tmp_path: Path) -> AsyncIterator[MakeStore]:
    started: list[Store] = []

    async def _make(name: str = "store0", **overrides: Any) -> Store:
        store = Store(store_settings(nats_url, tmp_path / name, **overrides))
        await store.start()
        started.append(store)
        return store

    _make.started = started  # type: ignore[attr-defined]
    yield _make
    for store in started:
        await store.stop()


async def rpc(bus: Bus, verb: str, body: Any = None, raw: bytes | None = None) -> Any:
    payload = raw if raw is not None else orjson.dumps(body if body is not None else {})
    msg = await bus.request(subjects.store_subject(verb), payload, timeout=5.0)
    return orjson.loads(msg.data)


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s")
        await asyncio.sleep(0.05)


async def all_ids(bus: Bus, **filters: Any) -> list[str]:
    """Every flow id the store lists for ``filters``, walking all pages."""
    ids: list[str] = []
    cursor = None
    while True:
        reply = await rpc(bus, "list", {"limit": 1000, "cursor": cursor, **filters})
        ids += [f["id"] for f in reply["flows"]]
        cursor = reply["next_cursor"]
        if cursor is None:
            return ids


async def consumer_idle(bus: Bus) -> bool:
    info = await bus.js.consumer_info(subjects.FLOWS_STREAM, subjects.STORE_DURABLE)
    return info.num_ack_pending == 0 and info.num_pending == 0


# -- synthetic events ----------------------------------------------------------------------
_seq = 0


def new_id() -> str:
    global _seq
    _seq += 1
    return f"{int(time.time() * 1000):012x}{0x5105:06x}{_seq & 0xFFFFFF:06x}"


def event(flow_id: str, state: str, replica: str = "hand", body: bytes = b"") -> dict[str, Any]:
    final = state != "active"
    response = None
    if final:
        response = {
            "status": 200,
            "reason": "OK",
            "http_version": "1.1",
            "headers": [],
            "size": len(body),
            "truncated": False,
            "body_b64": base64.b64encode(body).decode(),
        }
    request: dict[str, Any] = {"headers": [["Host", "hand.test"]], "size": 0, "truncated": False}
    if final:
        request["body_b64"] = ""
    return {
        "event": state if final else "started",
        "id": flow_id,
        "replica": replica,
        "kind": "http",
        "state": state,
        "scheme": "http",
        "method": "GET",
        "host": "hand.test",
        "port": 80,
        "path": f"/{flow_id}",
        "request": request,
        "response": response,
        "timings": {"start": time.time(), "end": time.time() if final else None},
        "error": "killed by test" if state == "killed" else None,
    }


async def publish(bus: Bus, events: list[dict[str, Any]], replica: str = "hand") -> None:
    await bus.js_publish(subjects.flows_subject(replica), orjson.dumps(events))


# -- tests ---------------------------------------------------------------------------------
async def test_proxied_flows_are_stored_and_queryable(
    make_store: MakeStore, make_proxy: MakeProxy, upstream: Upstream, bus: Bus, nats_url: str
) -> None:
    await make_store()
    proxy = await make_proxy(nats_url=nats_url)
    body = b"hello store " * 100
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
        assert (await client.get(f"{upstream.http}/echo/one?x=1")).status_code == 200
        assert (await client.post(f"{upstream.http}/echo/two", content=body)).status_code == 200
        assert (await client.get(f"{upstream.http}/status/404")).status_code == 404
        assert (await client.get(f"{upstream.http}/bytes/3000")).status_code == 200

    async def all_completed() -> bool:
        reply = await rpc(bus, "list", {"replica": proxy.id})
        flows = reply["flows"]
        return len(flows) == 4 and all(f["state"] == "completed" for f in flows)

    await eventually(all_completed, what="4 completed flows")
    reply = await rpc(bus, "list", {"replica": proxy.id})
    flows = reply["flows"]
    assert reply["next_cursor"] is None
    assert [f["path"] for f in flows] == [
        "/bytes/3000",
        "/status/404",
        "/echo/two",
        "/echo/one?x=1",
    ]
    assert all(f["host"] == "127.0.0.1" and f["port"] == upstream.http_port for f in flows)
    assert "request" not in flows[0] and "doc" not in flows[0]  # summaries only

    posts = (await rpc(bus, "list", {"method": "post"}))["flows"]
    assert [(f["path"], f["request_size"]) for f in posts] == [("/echo/two", len(body))]
    missing = (await rpc(bus, "list", {"status": 404}))["flows"]
    assert [f["path"] for f in missing] == ["/status/404"]
    assert (await rpc(bus, "count", {"replica": proxy.id, "min_status": 200}))["count"] == 4

    full = (await rpc(bus, "get", {"id": posts[0]["id"]}))["flow"]
    assert base64.b64decode(full["request"]["body_b64"]) == body
    echoed = orjson.loads(base64.b64decode(full["response"]["body_b64"]))
    assert echoed["body_len"] == len(body)
    assert ["Host", f"127.0.0.1:{upstream.http_port}"] in full["request"]["headers"]
    big = (await rpc(bus, "get", {"id": flows[0]["id"]}))["flow"]
    assert base64.b64decode(big["response"]["body_b64"]) == b"x" * 3000


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "2-workers"])
async def test_hand_made_batches_edge_cases(make_store: MakeStore, bus: Bus, workers: int) -> None:
    store = await make_store(store_ingest_workers=workers)
    a, b, c, d = new_id(), new_id(), new_id(), new_id()
    await publish(bus, [event(a, "completed", body=b"final")])
    await publish(bus, [event(a, "active")])  # late started: ignored
    await publish(bus, [event(b, "active"), event(b, "active")])  # duplicate
    await bus.js_publish(subjects.flows_subject("hand"), b"\x00 not json")
    await bus.js_publish(subjects.flows_subject("hand"), b'{"not": "an array"}')
    await publish(bus, [event(c, "killed"), event(c, "completed")])  # kill wins
    await publish(bus, [123, {"no": "id"}, event(d, "error")])  # type: ignore[list-item]
    await publish(bus, [event(b, "active")])  # duplicate again, in a later message

    async def ingested() -> bool:
        return (await rpc(bus, "count"))["count"] == 4 and await consumer_idle(bus)

    await eventually(ingested, what="4 flows, nothing pending")
    flows = {f["id"]: f for f in (await rpc(bus, "list"))["flows"]}
    assert {k: flows[k]["state"] for k in (a, b, c, d)} == {
        a: "completed",
        b: "active",
        c: "killed",
        d: "error",
    }
    full = (await rpc(bus, "get", {"id": a}))["flow"]
    assert base64.b64decode(full["response"]["body_b64"]) == b"final"
    assert store.consumer is not None
    stats = store.consumer.stats
    assert stats.decode_errors == 2 and stats.bad_events == 2
    assert stats.events == 8


@pytest.mark.parametrize(
    ("verb", "body", "field"),
    [
        ("list", {"limit": 5000}, "limit"),
        ("list", {"limit": 0}, "limit"),
        ("list", {"colour": "red"}, "colour"),
        ("list", {"state": "paused"}, "state"),
        ("list", {"host": "www.*.com"}, "host"),
        ("list", {"min_status": 500, "max_status": 400}, "min_status"),
        ("list", {"cursor": "@@@"}, "cursor"),
        ("list", {"since": "yesterday"}, "since"),
        ("count", {"status": 42}, "status"),
        ("count", [1, 2], "body"),
        ("get", {}, "id"),
        ("get", {"id": ""}, "id"),
    ],
)
async def test_bad_queries_are_answered_with_bad_query(
    make_store: MakeStore, bus: Bus, verb: str, body: Any, field: str
) -> None:
    await make_store()
    reply = await rpc(bus, verb, body)
    assert reply["error"]["code"] == "BAD_QUERY", reply
    assert reply["error"]["message"].startswith(f"{field}:"), reply
    assert reply["error"]["field"] == field


async def test_invalid_json_unknown_id_and_empty_body(make_store: MakeStore, bus: Bus) -> None:
    await make_store()
    reply = await rpc(bus, "list", raw=b"{nope")
    assert reply["error"]["code"] == "BAD_QUERY" and reply["error"]["message"].startswith("body:")
    reply = await rpc(bus, "get", {"id": "0123456789abcdef01234567"})
    assert reply["error"]["code"] == "FLOW_NOT_FOUND"
    assert await rpc(bus, "list", raw=b"") == {
        "flows": [],
        "next_cursor": None,
        "filtered_count": 0,
        "filtered_count_exact": True,
    }
    assert await rpc(bus, "count", raw=b"") == {"count": 0}


async def test_graceful_stop_commits_and_acks_the_batch_in_progress(
    make_store: MakeStore, bus: Bus
) -> None:
    store = await make_store(store_fetch_batch=8)
    ids = [new_id() for _ in range(3000)]
    for i in range(0, len(ids), 30):
        await publish(bus, [event(f, "completed") for f in ids[i : i + 30]])
    await eventually(lambda: _ingested_some(store), what="ingest started")
    await store.stop()
    info = await bus.js.consumer_info(subjects.FLOWS_STREAM, subjects.STORE_DURABLE)
    assert info.num_ack_pending == 0  # everything fetched was committed and acked
    assert store.consumer is not None
    assert store.consumer.stats.messages + info.num_pending == len(ids) // 30
    # a new store picks up exactly where the old one stopped
    await make_store("store0")
    await eventually(lambda: consumer_idle(bus), what="backlog ingested")
    found = await all_ids(bus)
    assert sorted(found) == sorted(ids)


async def _ingested_some(store: Store) -> bool:
    assert store.consumer is not None
    return store.consumer.stats.events > 0


async def test_two_stores_on_one_database_share_the_work(make_store: MakeStore, bus: Bus) -> None:
    first = await make_store("store-a")
    second = await make_store("store-b", store_db=first.settings.db_path)
    ids = [new_id() for _ in range(4000)]
    for i in range(0, len(ids), 10):
        await publish(bus, [event(f, "completed") for f in ids[i : i + 10]])

    async def done() -> bool:
        assert first.consumer is not None and second.consumer is not None
        total = first.consumer.stats.events + second.consumer.stats.events
        return total >= len(ids) and await consumer_idle(bus)

    await eventually(done, timeout=20, what="all flows ingested")
    assert first.consumer is not None and second.consumer is not None
    assert first.consumer.stats.events and second.consumer.stats.events, (
        "both stores should have taken part of the work"
    )
    assert sorted(await all_ids(bus)) == sorted(ids)  # one database: each store sees all


def _cli_env(nats_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("FLEET_")},
        "FLEET_NATS_URL": nats_url,
        "FLEET_DATA_DIR": str(data_dir),
        "FLEET_NATS_CONNECT_TIMEOUT": "5",
        **extra,
    }


async def test_a_second_database_on_the_stream_is_refused(
    make_store: MakeStore, nats_url: str, tmp_path: Path
) -> None:
    first = await make_store("store-a")
    code, err = await _run_cli(_cli_env(nats_url, tmp_path / "store-b"))
    lines = err.decode().strip().splitlines()
    assert code == 1 and "Traceback" not in err.decode(), err.decode()
    assert lines[-1].startswith(
        "proxyfleet store: stream FLOWS is already ingested into another database ("
        f"{first.settings.db_path} on "
    ), lines
    assert "store store-a" in lines[-1]
    # the same database under another path (a replica sharing the file) is welcome
    link = tmp_path / "same.db"
    link.symlink_to(first.settings.db_path)
    await make_store("store-a2", store_db=link)
    # a clean stop hands the stream over at once, once every store of that database stopped
    for store in list(_started(make_store)):
        await store.stop()
    await make_store("store-b")


def _started(make_store: MakeStore) -> list[Store]:
    started: list[Store] = make_store.started  # type: ignore[attr-defined]
    return started


async def test_a_killed_stores_claim_expires(
    make_store: MakeStore, nats_url: str, tmp_path: Path
) -> None:
    from services.store.main import StartupError

    proc = _start_store_process(
        nats_url, tmp_path / "killed", tmp_path / "killed.log", FLEET_STORE_CLAIM_TTL="2"
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        assert b"proxyfleet store killed-store: database" in line, line
        password = natsurl.parse(nats_url).password
        assert password and password.encode() not in line and b":***@" in line  # redacted
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(StartupError, match="already ingested into another database"):
        await make_store("other")  # the dead store's claim still holds (TTL 2 s)

    async def takes_over() -> bool:
        try:
            await make_store("other")
        except StartupError:
            return False
        return True

    await eventually(takes_over, timeout=15, what="the stale claim expired")


def _start_store_process(
    nats_url: str, data_dir: Path, log: Path, **extra: str
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "FLEET_NATS_URL": nats_url,
        "FLEET_DATA_DIR": str(data_dir),
        "FLEET_REPLICA_ID": "killed-store",
        "FLEET_STORE_ACK_WAIT": "2",
        "FLEET_STORE_FETCH_BATCH": "4",
        "FLEET_NATS_CONNECT_TIMEOUT": "5",
        **extra,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "store"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log.open("wb"),
        start_new_session=True,
    )


@pytest.mark.slow
async def test_store_killed_mid_ingest_loses_and_duplicates_nothing(
    make_store: MakeStore, bus: Bus, nats_url: str, tmp_path: Path
) -> None:
    ids = [new_id() for _ in range(10_000)]
    # started and completed events in separate messages, completed first for half of them
    for i in range(0, len(ids), 50):
        chunk = ids[i : i + 50]
        started = [event(f, "active", replica="p1") for f in chunk]
        completed = [event(f, "completed", replica="p1") for f in chunk]
        first, second = (completed, started) if i % 100 else (started, completed)
        await publish(bus, first, "p1")
        await publish(bus, second, "p1")
        await publish(bus, completed[:5], "p1")  # duplicates
    data_dir = tmp_path / "store0"
    proc = _start_store_process(nats_url, data_dir, tmp_path / "killed-store.log")
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        assert b"proxyfleet store killed-store: database" in line, line
        assert str(data_dir / "flows.db").encode() in line

        async def some() -> bool:
            return (await rpc(bus, "count"))["count"] >= 1000

        await eventually(some, timeout=30, what="ingest under way")
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    info = await bus.js.consumer_info(subjects.FLOWS_STREAM, subjects.STORE_DURABLE)
    assert info.num_ack_pending + info.num_pending > 0, "killed after everything was ingested"

    await make_store("store0", store_ack_wait=2.0)  # same database file

    async def complete() -> bool:
        counted = (await rpc(bus, "count", {"state": "completed"}))["count"]
        return counted == len(ids) and await consumer_idle(bus)

    await eventually(complete, timeout=30, what="every flow completed, no pending acks")
    found = await all_ids(bus)
    assert len(found) == len(ids) == len(set(found))
    assert set(found) == set(ids)
    assert (await rpc(bus, "count"))["count"] == len(ids)


async def _run_cli(env: dict[str, str], timeout: float = 20.0) -> tuple[int, bytes]:
    """Run ``proxyfleet store`` to its end; (exit code, stderr). Killed if it hangs."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "store",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, err


async def test_store_cli_exits_with_a_reason(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "FLEET_NATS_URL": "nats://127.0.0.1:1",
        "FLEET_NATS_CONNECT_TIMEOUT": "0.5",
        "FLEET_DATA_DIR": str(tmp_path),
    }
    code, err = await _run_cli(env)
    assert code == 1
    assert (
        err.decode()
        .strip()
        .splitlines()[-1]
        .startswith("proxyfleet store: NATS unreachable at nats://127.0.0.1:1")
    )
    code, err = await _run_cli({**env, "FLEET_STORE_MAX_FLOWS": "-5"})
    assert code == 2 and b"FLEET_STORE_MAX_FLOWS" in err


async def test_store_cannot_open_its_database(nats_url: str, tmp_path: Path) -> None:
    from services.store.main import StartupError

    (tmp_path / "flows.db").mkdir()  # a directory where the file should be
    store = Store(store_settings(nats_url, tmp_path))
    with pytest.raises(StartupError, match="cannot open database"):
        await store.start()


async def test_sigterm_stops_the_store_cleanly(nats_url: str, tmp_path: Path) -> None:
    proc = _start_store_process(nats_url, tmp_path / "s", tmp_path / "store.log")
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        assert b"proxyfleet store" in line
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"stopped" in (tmp_path / "store.log").read_bytes()
