"""What the PostgreSQL repository has of its own: migrations, time partitions and
retention by partition, the value vocabulary, NUL in text, the indexes the filters use.
(Everything both backends share runs in ``test_store_repository`` and ``_search``.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from libs.common.models import FlowQuery
from services.store import pgschema
from services.store.postgres import PostgresRepository
from services.store.query import plan
from services.store.repository import RepositoryError
from tests.unit.test_store_repository import ev, fid, ids

DAY_MS = 86_400_000


@pytest.fixture
async def repo(pg_dsn: str) -> AsyncIterator[PostgresRepository]:
    r = PostgresRepository(pg_dsn)
    await r.open()
    try:
        yield r
    finally:
        await r.close()


def _one(dsn: str, statement: str, *params: object) -> tuple[object, ...]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(statement, params).fetchone()
    assert row is not None
    return tuple(row)


async def test_stores_starting_at_once_migrate_once(pg_dsn: str) -> None:
    repos = [PostgresRepository(pg_dsn) for _ in range(4)]
    try:
        await asyncio.gather(*(r.open() for r in repos))
        identities = {await r.identity() for r in repos}
        assert len(identities) == 1  # one database, one identity, whoever made it
    finally:
        for r in repos:
            await r.close()
    versions = _one(pg_dsn, "SELECT array_agg(version ORDER BY version) FROM schema_migrations")
    assert versions == ([m[0] for m in pgschema.MIGRATIONS],)


async def test_a_newer_schema_is_refused(pg_dsn: str) -> None:
    r = PostgresRepository(pg_dsn)
    await r.open()
    await r.close()
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("INSERT INTO schema_migrations (version, description) VALUES (99, 'x')")
    again = PostgresRepository(pg_dsn)
    with pytest.raises(RepositoryError, match="schema version 99 is newer"):
        await again.open()
    await again.close()


async def test_a_version_2_database_gains_timings(pg_dsn: str) -> None:
    """Migration 3 adds ``timings`` to a database in use: its flows stay (listed without
    phases), new ones are listed with theirs."""
    r = PostgresRepository(pg_dsn)
    await r.open()
    old = fid()
    await r.upsert_events([ev(old)])
    await r.close()
    with psycopg.connect(pg_dsn) as conn:  # as a store of schema 2 left it
        conn.execute("ALTER TABLE flows DROP COLUMN timings")
        conn.execute("DELETE FROM schema_migrations WHERE version = 3")
    again = PostgresRepository(pg_dsn)
    await again.open()
    try:
        new = fid()
        event = ev(new)
        event["timings"]["first_byte"] = event["timings"]["start"] + 0.003
        await again.upsert_events([event])
        listed = {f["id"]: f for f in (await again.list(FlowQuery()))[0]}
        assert listed[old]["timings"] is None
        assert listed[new]["timings"]["first_byte"] == pytest.approx(
            event["timings"]["first_byte"], abs=2e-6
        )
    finally:
        await again.close()
    assert _one(pg_dsn, "SELECT max(version) FROM schema_migrations") == (3,)


async def test_partitions_are_made_ahead_and_hold_their_days(
    repo: PostgresRepository, pg_dsn: str
) -> None:
    with psycopg.connect(pg_dsn) as conn:
        names = [p.name for p in pgschema.existing_partitions(conn)]
    today = datetime.now(UTC)
    assert names == [f"flows_p{today + timedelta(days=d):%Y%m%d}" for d in range(3)]
    now_ms = int(time.time() * 1000)
    flow = fid(now_ms)
    await repo.upsert_events([ev(flow)])
    part = _one(pg_dsn, "SELECT tableoid::regclass::text FROM flows WHERE id = %s", flow)
    assert part == (f"flows_p{today:%Y%m%d}",)


async def test_a_late_partition_takes_its_rows_from_the_default_one(
    repo: PostgresRepository, pg_dsn: str
) -> None:
    later = int(time.time() * 1000) + 10 * DAY_MS  # past the partitions made ahead
    flows = [fid(later + i) for i in range(3)]
    await repo.upsert_events([ev(f) for f in flows])
    where = "SELECT tableoid::regclass::text, count(*) FROM flows GROUP BY 1"
    assert _one(pg_dsn, where) == ("flows_default", 3)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        made = pgschema.ensure_partitions(conn, later / 1000)
    assert made and made[0] == f"flows_p{datetime.fromtimestamp(later / 1000, UTC):%Y%m%d}"
    assert _one(pg_dsn, where) == (made[0], 3)
    assert sorted(await ids(repo)) == flows


async def test_retention_drops_whole_days_and_deletes_rows_of_the_default_partition(
    repo: PostgresRepository, pg_dsn: str
) -> None:
    now = time.time()
    old_day = datetime.fromtimestamp(now, UTC) - timedelta(days=10)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        pgschema.create_partition(conn, pgschema.day_partition(old_day))
    old_ms = int(old_day.replace(hour=12).timestamp() * 1000)
    in_old_day = [fid(old_ms + i) for i in range(50)]
    older = [fid(old_ms - 30 * DAY_MS + i) for i in range(7)]  # no partition: default
    recent = [fid(int(now * 1000) - 1000 + i) for i in range(5)]
    await repo.upsert_events([ev(f) for f in in_old_day + older + recent])
    deleted = await repo.prune(max_age_s=3 * 86_400, max_count=1_000_000)
    assert deleted == len(in_old_day) + len(older)
    with psycopg.connect(pg_dsn) as conn:
        names = [p.name for p in pgschema.existing_partitions(conn)]
    assert f"flows_p{old_day:%Y%m%d}" not in names  # dropped, not emptied
    assert sorted(await ids(repo)) == recent
    # the count limit: from the oldest end, exactly down to the limit
    assert await repo.prune(max_age_s=3 * 86_400, max_count=2) == 3
    assert sorted(await ids(repo)) == recent[-2:]


async def test_text_with_nul_is_stored_and_found(repo: PostgresRepository) -> None:
    f = fid()
    event = ev(f, host="a\x00b.test", path="/x\x00y")
    event["replica"] = "r\x00"
    assert await repo.upsert_events([event]) == 0
    record = await repo.get(f)
    assert record is not None and record.doc["host"] == "a\x00b.test"  # the document as sent
    listed, _ = await repo.list(FlowQuery(limit=5))
    assert listed[0]["host"] == "a\ufffdb.test"  # the column cannot hold NUL
    assert [r["id"] for r in (await repo.list(FlowQuery(q="~d a.b", limit=5)))[0]] == [f]
    # a query with NUL in it is answered, not failed
    assert (await repo.list(FlowQuery(q="~u '\x00zzz'", limit=5)))[0] == []
    assert (await repo.list(FlowQuery(host="\x00.test", limit=5)))[0] == []


async def test_values_the_vocabulary_lists_are_written_with_their_flows(
    repo: PostgresRepository, pg_dsn: str
) -> None:
    await repo.upsert_events([ev(fid(), host="Mixed.Case.test", method="PATCH")])
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute("SELECT col, value FROM flow_values ORDER BY 1, 2").fetchall()
    assert ("host", "mixed.case.test") in rows and ("method", "PATCH") in rows
    page = await repo.listing(FlowQuery(q="~m ^pat & ~d ^mixed\\.", limit=5))
    assert len(page.flows) == 1 and page.scanned is None  # exact: the IN lists, no recheck


@pytest.mark.parametrize(
    ("q", "used"),
    [
        # the trigram indexes match the URL expressions filtersql compares (a bitmap scan
        # on them, where the planner is kept from reading everything)
        ("~u needle-in-path", "Bitmap Index Scan on flows_p"),
        ("~d needle & ~c 200", "Bitmap Index Scan on flows_p"),
        ("~c 404", "status_id"),  # the (status, id) btree, newest first
    ],
)
async def test_pushed_down_filters_use_their_indexes(
    repo: PostgresRepository, pg_dsn: str, q: str, used: str
) -> None:
    from services.store import filtersql, search, sql
    from services.store.postgres import native

    p = plan(FlowQuery(q=q, limit=100))
    assert p.tree is not None
    compiled = filtersql.compile_tree(p.tree, lambda column: None)  # hosts: too many to list
    where, params = search._where(p, compiled)
    statement = native(f"SELECT {sql.SUMMARY} FROM flows{where} ORDER BY id DESC LIMIT ?")
    with psycopg.connect(pg_dsn, cursor_factory=psycopg.RawCursor) as conn:
        conn.execute("SET enable_seqscan = off")
        if used.startswith("Bitmap"):
            conn.execute("SET enable_indexscan = off")
        found = "\n".join(
            r[0] for r in conn.execute("EXPLAIN " + statement, [*params, 101]).fetchall()
        )
    assert used in found, found
    if used.startswith("Bitmap"):
        assert "lower(" in found.split("Bitmap Index Scan", 1)[1], found


async def test_a_filter_on_a_huge_status_or_odd_text_is_answered(
    repo: PostgresRepository,
) -> None:
    await repo.upsert_events([ev(fid(), status=200)])
    for q in ("~c 9223372036854775807", "~c 99999999999999999999", "~d '%'", "~u '_'"):
        page = await repo.listing(FlowQuery(q=q, limit=5))
        assert page.flows == [] or q.startswith("~u")


async def test_stores_pruning_at_once_neither_fails_nor_deletes_twice(
    repo: PostgresRepository, pg_dsn: str
) -> None:
    now = time.time()
    old_day = datetime.fromtimestamp(now, UTC) - timedelta(days=10)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        pgschema.create_partition(conn, pgschema.day_partition(old_day))
    old_ms = int(old_day.replace(hour=12).timestamp() * 1000)
    old = [fid(old_ms + i) for i in range(30)] + [fid(old_ms - 40 * DAY_MS + i) for i in range(9)]
    await repo.upsert_events([ev(f) for f in old] + [ev(fid(int(now * 1000)))])
    other = PostgresRepository(pg_dsn)
    await other.open()
    try:
        results = await asyncio.gather(
            *(r.prune(max_age_s=3 * 86_400, max_count=1_000_000) for r in (repo, other, repo))
        )
    finally:
        await other.close()
    assert sum(results) == len(old)
    assert await repo.count(FlowQuery()) == 1


async def test_odd_ids_land_in_the_default_partition_and_behave_as_on_sqlite(
    repo: PostgresRepository, pg_dsn: str
) -> None:
    odd = ["zzzz", "'; DROP TABLE flows; --", "été-1", "0" * 64]
    # the one ordinary flow is from now: today's partition exists whatever the hour
    events = [ev(fid(int(time.time() * 1000)))] + [dict(ev(fid()), id=i) for i in odd]
    assert await repo.upsert_events(events) == 0
    with psycopg.connect(pg_dsn) as conn:
        found = conn.execute("SELECT tableoid::regclass::text, count(*) FROM flows GROUP BY 1")
        rows = dict(found.fetchall())
    assert rows["flows_default"] == len(odd)
    for flow_id in odd:
        record = await repo.get(flow_id)
        assert record is not None and record.doc["id"] == flow_id
    listed = [f["id"] for f in (await repo.list(FlowQuery(limit=10)))[0]]
    assert listed == sorted(listed, reverse=True)  # byte order, as SQLite sorts them
    assert listed[0] == "été-1" and listed[-1] == "'; DROP TABLE flows; --"
    # the count limit keeps the newest ids, whatever partition holds them
    assert await repo.prune(max_age_s=10 * 86_400, max_count=2) == 3
    assert sorted(await ids(repo)) == sorted(["zzzz", "été-1"])


async def test_a_count_past_its_time_budget_is_a_lower_bound(
    repo: PostgresRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.store import postgres

    now_ms = int(time.time() * 1000)
    await repo.upsert_events([ev(fid(now_ms - 20_000 + i)) for i in range(12_000)])
    full = await repo.listing(FlowQuery(limit=5))
    assert (full.filtered_count, full.count_exact) == (10_000, False)  # past COUNT_BOUND
    monkeypatch.setattr(postgres, "COUNT_BUDGET_MS", 1)  # 10,001 rows take longer than that
    hurried = await repo.listing(FlowQuery(limit=5))
    assert [f["id"] for f in hurried.flows] == [f["id"] for f in full.flows]  # same page
    assert (hurried.filtered_count, hurried.count_exact) == (6, False)  # the page and one more
    assert await repo.count(FlowQuery()) == 12_000  # count itself has no budget
