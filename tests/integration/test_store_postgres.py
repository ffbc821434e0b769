"""The flow store on PostgreSQL, end to end: real NATS, a real PostgreSQL database per test.

Store replicas share one database and the durable consumer; one is SIGKILLed mid-ingest
and nothing is lost or stored twice. The database goes away behind a TCP relay the test
cuts: the store stops acking, says so (``/readyz``, metrics, events) and resumes alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from libs.common import events, subjects
from libs.common.bus import Bus
from services.store.main import Store
from tests.integration import test_store
from tests.integration.test_store import (
    MakeStore,
    _start_store_process,
    consumer_idle,
    event,
    eventually,
    new_id,
    publish,
    rpc,
)

# the fixtures of the SQLite store tests: a NATS of each test's own, stores made in-process
nats_url = test_store.nats_url
bus = test_store.bus
make_store = test_store.make_store


async def test_a_proxy_flow_reaches_postgres_and_lists_like_sqlite(
    make_store: MakeStore, bus: Bus, pg_dsn: str
) -> None:
    store = await make_store("pg", store_db=pg_dsn)
    assert store.repo is not None and type(store.repo).__name__ == "PostgresRepository"
    ids = [new_id() for _ in range(5)]
    await publish(bus, [event(f, "active") for f in ids], "hand")
    await publish(bus, [event(f, "completed", body=b"hello") for f in ids], "hand")

    async def stored() -> bool:
        return (await rpc(bus, "count", {"state": "completed"}))["count"] == 5

    await eventually(stored, timeout=15, what="five completed flows")
    listed = await rpc(bus, "list", {"limit": 2, "q": "~s & ~c 200"})
    assert [f["id"] for f in listed["flows"]] == sorted(ids, reverse=True)[:2]
    assert listed["filtered_count"] == 5 and listed["next_cursor"]
    got = await rpc(bus, "get", {"id": ids[0]})
    assert got["flow"]["response"]["body_b64"] == "aGVsbG8="


@pytest.mark.slow
async def test_two_stores_share_the_database_and_a_killed_one_loses_nothing(
    make_store: MakeStore, bus: Bus, nats_url: str, tmp_path: Path, pg_dsn: str
) -> None:
    ids = [new_id() for _ in range(10_000)]
    # started and completed in separate messages, in either order, plus duplicates
    for i in range(0, len(ids), 50):
        chunk = ids[i : i + 50]
        started = [event(f, "active", replica="p1") for f in chunk]
        completed = [event(f, "completed", replica="p1") for f in chunk]
        first, second = (completed, started) if i % 100 else (started, completed)
        await publish(bus, first, "p1")
        await publish(bus, second, "p1")
        await publish(bus, completed[:5], "p1")
    proc = _start_store_process(
        nats_url, tmp_path / "killed", tmp_path / "killed.log", FLEET_STORE_DB=pg_dsn
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        assert b"proxyfleet store killed-store: database postgresql://" in line, line
        other = await make_store("store-b", store_db=pg_dsn, store_ack_wait=2.0)

        async def some() -> bool:
            return (await rpc(bus, "count"))["count"] >= 1000

        await eventually(some, timeout=30, what="ingest under way")
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    async def complete() -> bool:
        counted = (await rpc(bus, "count", {"state": "completed"}))["count"]
        return counted == len(ids) and await consumer_idle(bus)

    await eventually(complete, timeout=60, what="every flow completed, no pending acks")
    assert other.consumer is not None and other.consumer.stats.messages > 0
    with psycopg.connect(pg_dsn) as conn:
        rows, distinct, active = conn.execute(
            "SELECT count(*), count(DISTINCT id), count(*) FILTER (WHERE state = 'active') "
            "FROM flows"
        ).fetchone()  # type: ignore[misc]
    assert (rows, distinct, active) == (len(ids), len(ids), 0)


class Relay:
    """A TCP relay in front of PostgreSQL that the test can cut (every connection
    dropped, new ones refused) and restore: the database "goes away" for the store."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = True
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def cut(self) -> None:
        self.up = False
        for w in list(self._writers):
            w.transport.abort()

    def restore(self) -> None:
        self.up = True

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def relay(pg_dsn: str) -> AsyncIterator[tuple[Relay, str]]:
    parts = urlsplit(pg_dsn)
    r = Relay((parts.hostname or "127.0.0.1", parts.port or 5432))
    port = await r.start()
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0] + "@" if len(netloc) == 2 else ""
    try:
        yield r, parts._replace(netloc=f"{user}127.0.0.1:{port}").geturl()
    finally:
        await r.close()


def _http(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def _events(bus: Bus, source: str, kind: str) -> int:
    try:
        info = await bus.js.stream_info(
            subjects.EVENTS_STREAM, subjects_filter=subjects.events_subject(source, kind)
        )
    except Exception:
        return 0
    return sum((info.state.subjects or {}).values())


async def test_the_database_down_pauses_ingest_and_it_resumes_by_itself(
    make_store: MakeStore, bus: Bus, relay: tuple[Relay, str]
) -> None:
    cuttable, dsn = relay
    store: Store = await make_store(
        "pg-outage", store_db=dsn, store_metrics_listen="127.0.0.1:0", store_ack_wait=2.0
    )
    assert store.metrics is not None
    base = f"http://{store.metrics.address}"
    assert await asyncio.to_thread(_http, base + "/readyz") == (200, "ready\n")
    first = [new_id() for _ in range(20)]
    await publish(bus, [event(f, "completed") for f in first], "hand")

    async def count_is(n: int) -> bool:
        try:
            return (await rpc(bus, "count"))["count"] == n
        except Exception:
            return False

    await eventually(lambda: count_is(20), timeout=15, what="the first flows stored")

    cuttable.cut()
    later = [new_id() for _ in range(30)]
    await publish(bus, [event(f, "completed") for f in later], "hand")

    async def says_so() -> bool:
        status, text = await asyncio.to_thread(_http, base + "/readyz")
        source = store.settings.replica_id
        return (
            status == 503
            and "database" in text
            and await _events(bus, source, events.DATABASE_UNAVAILABLE) >= 1
        )

    await eventually(says_so, timeout=30, what="readyz 503 and a database_unavailable event")
    _status, metrics = await asyncio.to_thread(_http, base + "/metrics")
    assert "proxyfleet_store_database_up 0.0" in metrics
    await asyncio.sleep(2.0)  # while it is down, nothing of the later flows is acked
    info = await bus.js.consumer_info(subjects.FLOWS_STREAM, subjects.STORE_DURABLE)
    assert info.num_pending + info.num_ack_pending >= 1

    cuttable.restore()
    await eventually(lambda: count_is(50), timeout=30, what="every flow stored after the outage")
    assert await asyncio.to_thread(_http, base + "/readyz") == (200, "ready\n")
    source = store.settings.replica_id
    assert await _events(bus, source, events.DATABASE_RECOVERED) >= 1
    await eventually(lambda: consumer_idle(bus), timeout=15, what="nothing left pending")


async def test_a_store_refuses_a_postgres_it_cannot_reach_in_one_line(
    make_store: MakeStore,
) -> None:
    from services.store.main import StartupError

    with pytest.raises(StartupError) as caught:
        await make_store("nowhere", store_db="postgresql://fleet@127.0.0.1:1/fleet")
    message = str(caught.value)
    assert "\n" not in message and "PostgreSQL" in message and "connect" in message
