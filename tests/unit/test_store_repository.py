"""The flow repositories against real databases (a SQLite file, a PostgreSQL database):
merge rules, filters, pagination, bodies, retention; then what is SQLite's alone."""

from __future__ import annotations

import base64
import itertools
import sqlite3
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from libs.common.models import FlowQuery
from services.proxy.capture import flow_event
from services.proxy.flow import COMPLETED, Flow
from services.store import sql as sql_mod
from services.store import sqlite as sqlite_mod
from services.store.query import encode_cursor
from services.store.repository import FlowRepository, QueryError, RepositoryError
from services.store.sqlite import SQLiteRepository
from tests.unit.conftest import MakeRepo

BASE_MS = int(time.time() * 1000) - 3_600_000  # an hour ago
_seq = itertools.count()


def fid(ms: int | None = None) -> str:
    """A flow id in the proxy's format (12 hex ms + 6 node + 6 sequence)."""
    return f"{(BASE_MS if ms is None else ms):012x}{0xABCDEF:06x}{next(_seq) & 0xFFFFFF:06x}"


def ev(
    flow_id: str,
    state: str = "completed",
    *,
    host: str = "example.com",
    method: str = "GET",
    status: int | None = 200,
    replica: str = "r1",
    path: str = "/",
    req_body: bytes = b"",
    resp_body: bytes = b"",
    error: str | None = None,
) -> dict[str, Any]:
    """An event shaped like ``services.proxy.capture.flow_event``."""
    ms = int(flow_id[:12], 16)
    start = ms / 1000
    final = state != "active"
    request: dict[str, Any] = {
        "headers": [["Host", host]],
        "size": len(req_body),
        "truncated": False,
    }
    response: dict[str, Any] | None = None
    if status is not None:
        response = {
            "status": status,
            "reason": "OK",
            "http_version": "1.1",
            "headers": [["Content-Length", str(len(resp_body))]],
            "size": len(resp_body),
            "truncated": False,
        }
    if final:
        request["body_b64"] = base64.b64encode(req_body).decode()
        if response is not None:
            response["body_b64"] = base64.b64encode(resp_body).decode()
    return {
        "event": state if final else "started",
        "id": flow_id,
        "replica": replica,
        "kind": "http",
        "state": state,
        "client": ["127.0.0.1", 5555],
        "server": None,
        "scheme": "http",
        "method": method,
        "host": host,
        "port": 80,
        "path": path,
        "http_version": "1.1",
        "request": request,
        "response": response,
        "timings": {
            "start": start,
            "request_sent": None,
            "first_byte": None,
            "end": start + 0.25 if final else None,
        },
        "error": error,
        "stats": None,
        "trace_id": None,
        "tags": [],
    }


@pytest.fixture
async def repo(make_repo: MakeRepo) -> FlowRepository:
    """A repository of each backend (``tests/unit/conftest.py``)."""
    return await make_repo()


@pytest.fixture
async def sqlite_repo(tmp_path: Path) -> AsyncIterator[SQLiteRepository]:
    """For what only SQLite has (its file, its query plans)."""
    r = SQLiteRepository(tmp_path / "flows.db")
    await r.open()
    try:
        yield r
    finally:
        await r.close()


async def ids(repo: FlowRepository, **filters: Any) -> list[str]:
    rows, cursor = await repo.list(FlowQuery(limit=1000, **filters))
    assert cursor is None
    return [r["id"] for r in rows]


# -- merge rules ---------------------------------------------------------------------------
async def test_started_then_completed(repo: FlowRepository) -> None:
    f = fid()
    await repo.upsert_events([ev(f, "active", status=None)])
    rows, _ = await repo.list(FlowQuery())
    assert [(r["id"], r["state"], r["status"], r["ended_at"]) for r in rows] == [
        (f, "active", None, None)
    ]
    await repo.upsert_events([ev(f, resp_body=b"hello")])
    rows, _ = await repo.list(FlowQuery())
    assert len(rows) == 1
    assert rows[0]["state"] == "completed" and rows[0]["status"] == 200
    assert rows[0]["duration_ms"] == pytest.approx(250.0)
    record = await repo.get(f)
    assert record is not None and record.response_body == b"hello"
    assert record.doc["event"] == "completed"


async def test_completed_then_started_keeps_completed(repo: FlowRepository) -> None:
    f = fid()
    await repo.upsert_events([ev(f, resp_body=b"body")])
    await repo.upsert_events([ev(f, "active", status=None)])
    record = await repo.get(f)
    assert record is not None
    assert record.doc["state"] == "completed" and record.response_body == b"body"
    assert await repo.count(FlowQuery()) == 1


async def test_order_within_one_batch_is_irrelevant(repo: FlowRepository) -> None:
    a, b = fid(), fid()
    await repo.upsert_events([ev(a), ev(a, "active", status=None)])
    await repo.upsert_events([ev(b, "active", status=None), ev(b)])
    rows, _ = await repo.list(FlowQuery())
    assert {r["id"]: r["state"] for r in rows} == {a: "completed", b: "completed"}


async def test_duplicates_are_stored_once(repo: FlowRepository) -> None:
    f, g = fid(), fid()
    batch = [ev(f, "active", status=None), ev(f), ev(g)]
    for _ in range(3):
        await repo.upsert_events(batch)
    await repo.upsert_events(list(reversed(batch)))
    assert sorted(await ids(repo)) == sorted([f, g])
    assert await repo.count(FlowQuery()) == 2


async def test_first_final_event_wins(repo: FlowRepository) -> None:
    killed, failed = fid(), fid()
    await repo.upsert_events([ev(killed, "active", status=None), ev(failed, "active")])
    await repo.upsert_events(
        [ev(killed, "killed", status=None, error="killed by API"), ev(failed, "error", error="x")]
    )
    # a late completion (a kill racing the response) changes nothing
    await repo.upsert_events([ev(killed), ev(failed, resp_body=b"late")])
    rows, _ = await repo.list(FlowQuery())
    by_id = {r["id"]: r for r in rows}
    assert by_id[killed]["state"] == "killed" and by_id[killed]["error"] == "killed by API"
    assert by_id[killed]["status"] is None
    assert by_id[failed]["state"] == "error" and by_id[failed]["error"] == "x"
    record = await repo.get(failed)
    assert record is not None and record.response_body == b""


async def test_real_flow_event_round_trip(repo: FlowRepository) -> None:
    flow = Flow(("127.0.0.1", 4000))
    flow.method, flow.host, flow.port, flow.path = b"post", "API.Example.com", 443, b"/v1?x=1"
    flow.scheme = "https"
    flow.req_headers = [(b"Host", b"api.example.com"), (b"X-A", b"1"), (b"X-A", b"2")]
    flow.req_body, flow.req_size = [b"abc"], 3
    await repo.upsert_events([flow_event(flow, "r9")])
    flow.status, flow.reason, flow.resp_http_version = 201, b"Created", "1.1"
    flow.resp_body, flow.resp_size = [b"x" * 5000], 5000
    flow.finish(COMPLETED)
    event = flow_event(flow, "r9")
    await repo.upsert_events([event])
    rows, _ = await repo.list(FlowQuery(host="api.example.com", method="POST"))
    assert len(rows) == 1
    row = rows[0]
    assert row["method"] == "POST" and row["status"] == 201 and row["scheme"] == "https"
    assert row["request_size"] == 3 and row["response_size"] == 5000
    record = await repo.get(flow.id)
    assert record is not None
    assert record.to_wire() == event  # the stored record is the event, bodies included
    assert "body_b64" not in record.doc["request"]


async def test_malformed_events_are_skipped(repo: FlowRepository) -> None:
    good = fid()
    weird = ev(fid())
    weird["port"] = {"not": "a port"}
    weird["path"] = 12
    weird["timings"]["start"] = "soon"
    weird["response"]["status"] = 2**63
    bad_body = ev(fid())
    bad_body["response"]["body_b64"] = 5
    skipped = await repo.upsert_events(
        [
            "not an object",
            {"state": "completed"},  # no id
            {"id": "x" * 65, "state": "completed"},
            {"id": fid(), "state": "paused"},
            {"id": fid(), "state": "completed", "request": "nope"},
            bad_body,
            ev(good),
            weird,
        ]
    )
    assert skipped == 6
    rows, _ = await repo.list(FlowQuery())
    assert {r["id"] for r in rows} == {good, weird["id"]}
    w = next(r for r in rows if r["id"] == weird["id"])
    assert w["port"] is None and w["path"] is None and w["status"] is None


# -- filters -------------------------------------------------------------------------------
@pytest.fixture
async def sample(repo: FlowRepository) -> dict[str, str]:
    """Named flows one second apart, newest last."""
    spec = {
        "a": dict(host="example.com", method="GET", status=200, replica="r1"),
        "b": dict(host="api.example.com", method="POST", status=201, replica="r1"),
        "c": dict(host="x.y.example.com", method="get", status=404, replica="r2"),
        "d": dict(host="badexample.com", method="PUT", status=500, replica="r2"),
        "e": dict(host="other.org", method="GET", status=302, replica="r1"),
        "f": dict(host="api.example.com", method="DELETE", status=None, replica="r3"),
    }
    named = {}
    events = []
    for i, (name, kw) in enumerate(spec.items()):
        f = fid(BASE_MS + i * 1000)
        named[name] = f
        state = "active" if kw["status"] is None else "completed"
        events.append(ev(f, state, **kw))  # type: ignore[arg-type]
    await repo.upsert_events(events)
    return named


def _names(named: dict[str, str], found: list[str]) -> list[str]:
    back = {v: k for k, v in named.items()}
    return [back[f] for f in found]


async def test_host_exact_and_glob(repo: FlowRepository, sample: dict[str, str]) -> None:
    assert _names(sample, await ids(repo, host="example.com")) == ["a"]
    assert _names(sample, await ids(repo, host="API.example.com")) == ["f", "b"]
    assert _names(sample, await ids(repo, host="*.example.com")) == ["f", "c", "b"]
    assert _names(sample, await ids(repo, host="*.y.example.com")) == ["c"]
    assert _names(sample, await ids(repo, host="*.com")) == ["f", "d", "c", "b", "a"]
    assert await ids(repo, host="*.nothing.test") == []
    assert await repo.count(FlowQuery(host="*.example.com")) == 3


async def test_glob_with_many_hosts_falls_back_to_a_range_scan(
    repo: FlowRepository, sample: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql_mod, "SPLIT_MAX_VALUES", 1)
    assert _names(sample, await ids(repo, host="*.example.com")) == ["f", "c", "b"]
    assert _names(sample, await ids(repo, min_status=200, max_status=404)) == ["e", "c", "b", "a"]


async def test_method_status_state_replica(repo: FlowRepository, sample: dict[str, str]) -> None:
    assert _names(sample, await ids(repo, method="get")) == ["e", "c", "a"]
    assert _names(sample, await ids(repo, status=404)) == ["c"]
    assert _names(sample, await ids(repo, min_status=300)) == ["e", "d", "c"]
    assert _names(sample, await ids(repo, max_status=299)) == ["b", "a"]
    assert _names(sample, await ids(repo, min_status=201, max_status=499)) == ["e", "c", "b"]
    assert _names(sample, await ids(repo, state="active")) == ["f"]
    assert _names(sample, await ids(repo, state="completed", replica="r2")) == ["d", "c"]
    assert _names(sample, await ids(repo, replica="r1", method="GET")) == ["e", "a"]
    assert _names(sample, await ids(repo, host="*.example.com", min_status=400)) == ["c"]
    assert await repo.count(FlowQuery(method="GET")) == 3
    assert await repo.count(FlowQuery(min_status=200, max_status=299)) == 2


async def test_since_until(repo: FlowRepository, sample: dict[str, str]) -> None:
    t0 = BASE_MS / 1000
    assert _names(sample, await ids(repo, since=t0 + 2)) == ["f", "e", "d", "c"]
    assert _names(sample, await ids(repo, until=t0 + 2)) == ["b", "a"]
    assert _names(sample, await ids(repo, since=t0 + 1, until=t0 + 3)) == ["c", "b"]
    assert _names(sample, await ids(repo, since=t0 + 1.5, until=t0 + 3.5)) == ["d", "c"]
    assert await repo.count(FlowQuery(since=t0 + 4)) == 2


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (FlowQuery(host="api.*.com"), "host"),
        (FlowQuery(host="*"), "host"),
        (FlowQuery(host="  "), "host"),
        (FlowQuery(min_status=500, max_status=400), "min_status"),
        (FlowQuery(since=10.0, until=5.0), "since"),
        (FlowQuery(since=-1.0), "since"),
        (FlowQuery(until=1e20), "until"),
        (FlowQuery(cursor="!!!"), "cursor"),
        (FlowQuery(cursor=""), "cursor"),
    ],
)
async def test_bad_queries_name_the_field(
    repo: FlowRepository, query: FlowQuery, field: str
) -> None:
    with pytest.raises(QueryError) as info:
        await repo.list(query)
    assert info.value.field == field
    with pytest.raises(QueryError):
        await repo.count(query)


# -- pagination ----------------------------------------------------------------------------
@pytest.mark.parametrize("limit", [100, 1000])
async def test_pagination_walks_everything_once(repo: FlowRepository, limit: int) -> None:
    hosts = ["a.example.com", "b.example.com", "c.other.org"]
    events = [ev(fid(BASE_MS + i // 3), host=hosts[i % 3], status=200 + i % 2) for i in range(2500)]
    await repo.upsert_events(events)
    expected = sorted((e["id"] for e in events), reverse=True)

    async def walk(**filters: Any) -> list[str]:
        seen: list[str] = []
        cursor = None
        while True:
            rows, cursor = await repo.list(FlowQuery(limit=limit, cursor=cursor, **filters))
            assert len(rows) <= limit
            seen += [r["id"] for r in rows]
            if cursor is None:
                return seen
            assert len(rows) == limit

    assert await walk() == expected
    on_example = [e["id"] for e in events if e["host"].endswith(".example.com")]
    assert await walk(host="*.example.com") == sorted(on_example, reverse=True)
    odd = [e["id"] for e in events if e["response"]["status"] == 201]
    assert await walk(min_status=201) == sorted(odd, reverse=True)
    assert await repo.count(FlowQuery()) == 2500


async def test_cursor_of_a_full_last_page_is_none(repo: FlowRepository) -> None:
    await repo.upsert_events([ev(fid()) for _ in range(10)])
    rows, cursor = await repo.list(FlowQuery(limit=10))
    assert len(rows) == 10 and cursor is None
    rows, cursor = await repo.list(FlowQuery(limit=9))
    assert cursor == encode_cursor(rows[-1]["id"])


# -- bodies --------------------------------------------------------------------------------
async def test_bodies_are_stored_compressed(sqlite_repo: FlowRepository, tmp_path: Path) -> None:
    repo = sqlite_repo
    f = fid()
    body = b'{"name": "value", "items": [1, 2, 3]}\n' * 400
    await repo.upsert_events([ev(f, req_body=b"q=1", resp_body=body)])
    record = await repo.get(f)
    assert record is not None
    assert record.request_body == b"q=1" and record.response_body == body
    wire = record.to_wire()
    assert base64.b64decode(wire["response"]["body_b64"]) == body
    assert wire["request"]["body_b64"] == base64.b64encode(b"q=1").decode()
    with sqlite3.connect(tmp_path / "flows.db") as db:
        req_blob, resp_blob = db.execute(
            "SELECT req_body, resp_body FROM flows WHERE id = ?", (f,)
        ).fetchone()
        empty = db.execute("SELECT count(*) FROM flows WHERE resp_body IS NULL").fetchone()[0]
    assert len(resp_blob) < len(body) // 10
    assert zlib.decompress(resp_blob) == body and zlib.decompress(req_blob) == b"q=1"
    assert empty == 0
    g = fid()
    await repo.upsert_events([ev(g)])  # empty bodies: NULL
    with sqlite3.connect(tmp_path / "flows.db") as db:
        assert db.execute(
            "SELECT req_body IS NULL AND resp_body IS NULL FROM flows WHERE id = ?", (g,)
        ).fetchone() == (1,)


async def test_get_unknown_is_none(repo: FlowRepository) -> None:
    assert await repo.get("0" * 24) is None


# -- retention -----------------------------------------------------------------------------
async def test_prune_by_age(repo: FlowRepository) -> None:
    now_ms = int(time.time() * 1000)
    old = [fid(now_ms - 3_600_000 - i) for i in range(4500)]  # more than one chunk
    new = [fid(now_ms - 60_000 + i) for i in range(10)]
    await repo.upsert_events([ev(f) for f in old + new])
    deleted = await repo.prune(max_age_s=1800, max_count=1_000_000)
    assert deleted == len(old)
    assert sorted(await ids(repo)) == sorted(new)
    assert await repo.prune(max_age_s=1800, max_count=1_000_000) == 0


async def test_prune_by_count_keeps_the_newest(repo: FlowRepository) -> None:
    now_ms = int(time.time() * 1000)
    flows = [fid(now_ms - 10_000 + i) for i in range(5000)]
    await repo.upsert_events([ev(f) for f in flows])
    assert await repo.prune(max_age_s=3600, max_count=700) == 4300
    assert sorted(await ids(repo)) == flows[-700:]
    assert await repo.count(FlowQuery()) == 700


async def test_database_is_wal_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "flows.db"
    r = SQLiteRepository(path)
    await r.open()
    f = fid()
    await r.upsert_events([ev(f)])
    await r.close()
    r = SQLiteRepository(path)
    await r.open()
    try:
        assert await r.get(f) is not None
    finally:
        await r.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- ingest of FLOWS payloads --------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 1])
async def test_ingest_payloads(tmp_path: Path, workers: int) -> None:
    r = SQLiteRepository(tmp_path / "flows.db", ingest_workers=workers)
    await r.open()
    try:
        a, b = fid(), fid()
        payloads = [
            orjson.dumps([ev(a, "active", status=None)]),
            b"\x00garbage",
            b'{"an": "object"}',
            orjson.dumps([ev(b, resp_body=b"x" * 100), "not an event", ev(a)]),
        ]
        result = await r.ingest(payloads)
        assert result.undecodable == (1, 2)
        assert result.events == 4 and result.bad_events == 1
        rows, _ = await r.list(FlowQuery())
        assert {row["id"]: row["state"] for row in rows} == {a: "completed", b: "completed"}
        record = await r.get(b)
        assert record is not None and record.response_body == b"x" * 100
        assert (await r.ingest([b"[]"])).events == 0
    finally:
        await r.close()


async def test_a_dead_ingest_worker_is_replaced(tmp_path: Path) -> None:
    r = SQLiteRepository(tmp_path / "flows.db", ingest_workers=1)
    await r.open()
    try:
        assert r._pool is not None
        for proc in list(r._pool._processes.values()):  # type: ignore[attr-defined]
            proc.kill()
            proc.join()
        with pytest.raises(RepositoryError, match="worker died"):
            await r.ingest([orjson.dumps([ev(fid())])])
        f = fid()
        await r.ingest([orjson.dumps([ev(f)])])
        assert await r.get(f) is not None
    finally:
        await r.close()


# -- file mode, identity, gone replicas -------------------------------------------------------
async def test_database_files_are_private(tmp_path: Path) -> None:
    import stat

    path = tmp_path / "flows.db"
    r = SQLiteRepository(path)
    await r.open()
    try:
        await r.upsert_events([ev(fid())])
        for name in ("flows.db", "flows.db-wal", "flows.db-shm"):
            f = tmp_path / name
            assert f.exists() and stat.S_IMODE(f.stat().st_mode) == 0o600, name
    finally:
        await r.close()
    path.chmod(0o644)  # a file from before: narrowed on the next open
    r = SQLiteRepository(path)
    await r.open()
    await r.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_identity_is_the_databases_own(tmp_path: Path) -> None:
    a, b = SQLiteRepository(tmp_path / "a.db"), SQLiteRepository(tmp_path / "b.db")
    await a.open()
    await b.open()
    first = await a.identity()
    assert first and first != await b.identity()
    await a.close()
    await b.close()
    again = SQLiteRepository(tmp_path / "a.db")
    await again.open()
    assert await again.identity() == first  # made once, kept with the database
    await again.close()


async def test_end_active_flows_of_a_gone_replica(repo: FlowRepository) -> None:
    open_a, open_b, done, other = fid(), fid(), fid(), fid()
    await repo.upsert_events(
        [
            ev(open_a, "active", replica="gone", status=None),
            ev(open_b, "active", replica="gone", status=None),
            ev(done, replica="gone"),
            ev(other, "active", replica="alive", status=None),
        ]
    )
    assert await repo.end_active_flows("gone", "replica gone: gone") == 2
    assert await repo.end_active_flows("gone", "replica gone: gone") == 0  # idempotent
    for flow_id in (open_a, open_b):
        record = await repo.get(flow_id)
        assert record is not None
        assert record.doc["state"] == "error" and record.doc["error"] == "replica gone: gone"
        assert record.doc["timings"]["end"] is not None
    assert await ids(repo, state="error") == sorted([open_a, open_b], reverse=True)
    done_rec, other_rec = await repo.get(done), await repo.get(other)
    assert done_rec is not None and done_rec.doc["state"] == "completed"
    assert other_rec is not None and other_rec.doc["state"] == "active"
    # the replica's own final event still wins, once; a started event changes nothing
    await repo.upsert_events([ev(open_a, "started"), ev(open_b, "active", replica="gone")])
    record = await repo.get(open_b)
    assert record is not None and record.doc["state"] == "error"
    await repo.upsert_events([ev(open_a, "completed", replica="gone", resp_body=b"late")])
    await repo.upsert_events([ev(open_a, "killed", replica="gone")])
    record = await repo.get(open_a)
    assert record is not None and record.doc["state"] == "completed"
    assert record.response_body == b"late"


async def test_a_version_1_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    old_schema = sqlite_mod.SCHEMA.replace(
        ",\n    presumed INTEGER NOT NULL DEFAULT 0,\n    authority TEXT", ""
    )
    assert "presumed" not in old_schema and "authority" not in old_schema
    conn.executescript(old_schema)
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    r = SQLiteRepository(path)
    await r.open()
    try:
        flow_id = fid()
        await r.upsert_events([ev(flow_id, "active", status=None)])
        assert await r.end_active_flows("r1", "replica gone: r1") == 1
        await r.upsert_events([ev(flow_id)])
        record = await r.get(flow_id)
        assert record is not None and record.doc["state"] == "completed"
    finally:
        await r.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == sqlite_mod.SCHEMA_VERSION
    conn.close()


async def test_a_version_2_database_gains_the_authority_column(tmp_path: Path) -> None:
    """Schema 3 adds ``authority`` (the Host header's, where it differs): a database of
    version 2 keeps its flows and stores it for new ones."""
    path = tmp_path / "v2.db"
    conn = sqlite3.connect(path)
    conn.executescript(sqlite_mod.SCHEMA.replace(",\n    authority TEXT", ""))
    conn.execute("PRAGMA user_version = 2")
    conn.close()
    old = fid()
    r = SQLiteRepository(path)
    await r.open()
    try:
        await r.upsert_events([ev(old)])
        routed = {**ev(fid()), "request": {"headers": [["Host", "Virtual.Example:8080"]]}}
        await r.upsert_events([routed])
        page = await r.listing(FlowQuery(q="~d virtual.example"))
        assert [f["id"] for f in page.flows] == [routed["id"]] and page.scanned is None
        assert len((await r.listing(FlowQuery(q="~u 'http://virtual.example:8080/'"))).flows) == 1
        assert (await r.get(old)) is not None
    finally:
        await r.close()
    conn = sqlite3.connect(path)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(flows)")]
    assert "authority" in columns
    assert conn.execute("PRAGMA user_version").fetchone()[0] == sqlite_mod.SCHEMA_VERSION
    conn.close()


# -- schema 4: the policy's account of a flow ---------------------------------------------
def decided(flow_id: str, matched: list[Any], tags: list[Any] | None = None, **over: Any) -> Any:
    event = ev(flow_id)
    event["policy"] = {"revision": 3, "matched": matched}
    event["tags"] = tags or []
    event.update(over)
    return event


V3_COLUMNS = (
    ",\n    rules TEXT,\n    tags TEXT,\n    decision TEXT,\n    replay_of TEXT,"
    "\n    policy TEXT,\n    intercept TEXT,\n    timings TEXT"
)


def older_database(path: Path, version: int, later_columns: str) -> str:
    """A SQLite file as a store of schema ``version`` left it: today's schema without the
    columns added since, one flow in it (its id is returned)."""
    assert later_columns in sqlite_mod.SCHEMA
    conn = sqlite3.connect(path)
    conn.executescript(sqlite_mod.SCHEMA.replace(later_columns, ""))
    old = fid()
    conn.execute(
        "INSERT INTO flows (id, state, doc, replica) VALUES (?, 'completed', ?, 'r1')",
        (old, orjson.dumps(ev(old))),
    )
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()
    return old


async def test_a_version_3_database_gains_the_policy_columns(tmp_path: Path) -> None:
    """Schema 4 adds the columns ``~rule``, ``~tag``, ``rule=``/``tag=``/``decision=`` and
    the decision log read: a version-3 database keeps its flows (listed with no decision)
    and stores the decision of new ones."""
    path = tmp_path / "v3.db"
    old = older_database(path, 3, V3_COLUMNS)
    r = SQLiteRepository(path)
    await r.open()
    try:
        new = fid()
        await r.upsert_events([decided(new, [{"rule": "deny", "action": "block"}], ["x"])])
        assert await ids(r) == [new, old]
        assert await ids(r, decision="any") == [new]
        assert await ids(r, rule="deny") == await ids(r, tag="x") == [new]
        page = await r.listing(FlowQuery(q="~rule ^deny$"))
        assert [f["id"] for f in page.flows] == [new] and page.scanned is None
        assert [f["decision"] for f in (await r.list(FlowQuery()))[0]] == ["block", None]
    finally:
        await r.close()
    conn = sqlite3.connect(path)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(flows)")}
    assert {"rules", "tags", "decision", "replay_of", "policy", "intercept"} <= columns
    indexes = {row[1] for row in conn.execute("PRAGMA index_list(flows)")}
    assert {"flows_decided", "flows_decision", "flows_ruled", "flows_tagged"} <= indexes
    assert conn.execute("PRAGMA user_version").fetchone()[0] == sqlite_mod.SCHEMA_VERSION == 5
    conn.close()


async def test_a_version_4_database_gains_timings_for_the_waterfall(tmp_path: Path) -> None:
    """Schema 5 adds ``timings``: a version-4 database keeps its flows (listed without
    phases) and new flows are listed with theirs."""
    path = tmp_path / "v4.db"
    old = older_database(path, 4, ",\n    timings TEXT")
    r = SQLiteRepository(path)
    await r.open()
    try:
        new = fid()
        event = ev(new)
        start = event["timings"]["start"]
        event["timings"].update(dns=start + 0.001, connect=start + 0.002, tls=None)
        await r.upsert_events([event])
        listed = {f["id"]: f for f in (await r.list(FlowQuery()))[0]}
        assert listed[old]["timings"] is None
        assert listed[new]["timings"]["dns"] == pytest.approx(start + 0.001)
        assert listed[new]["timings"]["tls"] is None
    finally:
        await r.close()


async def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v9.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 9")
    conn.close()
    r = SQLiteRepository(path)
    with pytest.raises(RepositoryError, match="schema version 9"):
        await r.open()
    await r.close()


HOSTILE_DECISIONS: list[dict[str, Any]] = [
    {"policy": "block everything"},
    {"policy": {"revision": "3", "matched": "not a list"}},
    {"policy": {"revision": 1 << 63, "matched": [1, None, "x", [], {"rule": {"a": 1}}]}},
    {"policy": {"matched": [{"rule": 5, "action": ["block"], "phase": 1, "note": {}}]}},
    {"policy": {"matched": [{"rule": "r" * 10_000, "action": "block", "note": "n" * 100_000}]}},
    {"policy": {"matched": [{"rule": f"r{i}", "action": "tag"} for i in range(20_000)]}},
    {"policy": {"matched": [{"rule": "a b", "action": "allow"}, {"rule": "%_\\", "action": "x"}]}},
    {"tags": "not a list"},
    {"tags": [f"tag-{i}" * 3 for i in range(10_000)]},
    {"tags": [None, 1, 2.5, {"a": 1}, ["b"], "", " ", "x" * 129, "é", "ok"]},
    {"intercept": "approved"},
    {"intercept": {"outcome": 5, "by": ["k"], "held_ms": "10", "modified": "all"}},
    {"intercept": {"outcome": "o" * 1000, "held_ms": float("inf"), "modified": [1, "u" * 999]}},
    {"intercept": {"held_ms": 1 << 62, "modified": [f"m{i}" for i in range(1000)]}},
    {"replay_of": 123},
    {"replay_of": "x" * 1000},
    {"replay_of": ""},
    {"is_replay": {"weird": True}},
]


async def test_hostile_policy_values_are_stored_bounded_never_fail_the_batch(
    repo: FlowRepository,
) -> None:
    events = []
    for over in HOSTILE_DECISIONS:
        event = ev(fid())
        event.update(over)
        events.append(event)
    good = decided(fid(), [{"rule": "fine", "action": "block"}], ["t"], replay_of="abc")
    assert await repo.upsert_events([*events, good]) == 0
    page = await repo.listing(FlowQuery(limit=1000))
    assert len(page.flows) == len(events) + 1
    by_id = {f["id"]: f for f in page.flows}
    assert by_id[good["id"]]["decision"] == "block" and by_id[good["id"]]["replay_of"] == "abc"
    assert by_id[good["id"]]["policy"] == {
        "revision": 3,
        "matched": [{"rule": "fine", "action": "block"}],
    }
    for event in events:
        f = by_id[event["id"]]
        assert len(orjson.dumps(f)) < 64_000, list(event)  # bounded, whatever came in
        assert f["replay_of"] is None and all(isinstance(t, str) for t in f["tags"])
        if f["policy"] is not None:
            assert len(f["policy"]["matched"]) <= 256
            assert all(isinstance(v, str) for m in f["policy"]["matched"] for v in m.values())
        if f["intercept"] is not None:
            held = f["intercept"]["held_ms"]
            assert held is None or isinstance(held, float)
            assert len(f["intercept"]["modified"]) <= 16
        record = await repo.get(event["id"])  # the document keeps the event as it came
        assert record is not None
        for key in ("policy", "tags", "replay_of", "is_replay"):
            assert record.doc.get(key) == event.get(key)
    assert by_id[events[5]["id"]]["decision"] == "modify"  # 20,000 tag rules
    assert by_id[events[6]["id"]]["decision"] == "allow"  # the id with a space is no id
    assert await ids(repo, rule="r0") == [events[5]["id"]]
    assert await ids(repo, rule="r300") == []  # past the ids kept
    assert await ids(repo, rule="%_\\") == [events[6]["id"]]  # an odd id, but an id
    assert await ids(repo, rule="%") == await ids(repo, rule="_") == []  # LIKE's, escaped
    assert await ids(repo, tag="ok") == [events[9]["id"]]
    assert await ids(repo, tag="tag-0tag-0tag-0") == [events[8]["id"]]
    assert await ids(repo, decision="intercept") == []


async def test_policy_listings_use_their_partial_indexes(sqlite_repo: FlowRepository) -> None:
    repo = sqlite_repo
    from services.store import sql
    from services.store.query import plan

    await repo.upsert_events([decided(fid(), [{"rule": "a", "action": "block"}], ["t"])])
    conn = sqlite3.connect(repo.path)
    conn.execute("ANALYZE")
    for query, index in (
        (FlowQuery(decision="any"), "flows_decided"),
        (FlowQuery(decision="block"), "flows_decision"),
        (FlowQuery(rule="a"), "flows_ruled"),
        (FlowQuery(tag="t"), "flows_tagged"),
    ):
        statement, params = sql.page(plan(query), 101)
        found = " ".join(
            str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}", params)
        )
        assert index in found, (query, found)
    conn.close()


async def test_a_listing_carries_each_flows_phases(repo: FlowRepository) -> None:
    """The listing's ``timings`` (for a page's waterfall) are the flow's own points, to
    the microsecond; a flow whose points are all unknown (a reused connection, an active
    flow) lists none but start and end; garbage in a point is not a point."""
    fresh, reused, junk = fid(), fid(), fid()
    a = ev(fresh)
    t0 = a["timings"]["start"]
    a["timings"].update(
        dns=t0 + 0.0002, connect=t0 + 0.0011, tls=t0 + 0.0034,
        request_sent=t0 + 0.004, first_byte=t0 + 0.0125, end=t0 + 0.0131,
    )  # fmt: skip
    b = ev(reused)
    b["timings"].update(end=b["timings"]["start"] + 0.002)
    c = ev(junk)
    c["timings"].update(dns="soon", connect=True, request_sent=c["timings"]["start"] + 0.001)
    await repo.upsert_events([a, b, c])
    listed = {f["id"]: f for f in (await repo.list(FlowQuery()))[0]}
    got = listed[fresh]["timings"]
    for name in ("dns", "connect", "tls", "request_sent", "first_byte", "end"):
        assert got[name] == pytest.approx(a["timings"][name], abs=2e-6), name
    assert got["start"] == pytest.approx(t0)
    assert listed[reused]["timings"] is None
    junk_points = listed[junk]["timings"]
    assert junk_points["dns"] is None and junk_points["connect"] is None
    assert junk_points["request_sent"] == pytest.approx(c["timings"]["start"] + 0.001, abs=2e-6)


async def test_hostile_timings_are_kept_in_the_document_not_in_the_listing(
    repo: FlowRepository,
) -> None:
    """A publisher's points nowhere near the flow (1e308 would overflow a conversion, a
    negative huge one, a year later) do not fail the batch: the flow is stored, its
    document keeps what was sent, its listing shows those points as unknown."""
    flow_id, neighbour = fid(), fid()
    event = ev(flow_id)
    start = event["timings"]["start"]
    event["timings"].update(
        dns=1e308, connect=-1e308, tls=start + 365 * 86400.0, request_sent=start + 0.001
    )
    await repo.upsert_events([event, ev(neighbour)])
    listed = {f["id"]: f for f in (await repo.list(FlowQuery()))[0]}
    assert set(listed) >= {flow_id, neighbour}  # the batch went in whole
    points = listed[flow_id]["timings"]
    assert points["dns"] is None and points["connect"] is None and points["tls"] is None
    assert points["request_sent"] == pytest.approx(start + 0.001, abs=2e-6)
    stored = await repo.get(flow_id)
    assert stored is not None and stored.doc["timings"]["dns"] == 1e308  # recorded as sent
