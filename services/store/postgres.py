"""The PostgreSQL flow repository (``FLEET_STORE_DB=postgresql://...``).

The driver is psycopg 3, for one reason above the others: the query engine
(``search``: pages, counts, filters rechecked row by row) is synchronous code over an
``execute`` callback that SQLite runs in reader threads, and psycopg's synchronous
connections run that same code unchanged in threads (it releases the GIL while it
waits on the server). asyncpg would have needed a second, async copy of the engine.
psycopg also brings binary arrays (a batch is one ``INSERT ... SELECT FROM unnest``),
native ``$n`` placeholders (``RawCursor``) and a pool that replaces broken connections.

Every store replica sharing the database writes through the same merge statement
(``INSERT ... ON CONFLICT (id) DO UPDATE ... WHERE``): the database decides, row by row
under its lock, whether an event changes a flow, so replicas may ingest the same flow's
``started`` and final events in any order, or the same batch twice after a redelivery.
Rows are inserted in id order, so that two batches lock shared flows in the same order
(no deadlock between replicas).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg import RawCursor
from psycopg_pool import ConnectionPool, PoolTimeout

from libs.common.flowfilter import FilterTimeout
from libs.common.models import FlowQuery
from services.store import pgschema, search, sql
from services.store.query import Plan, plan, time_bound
from services.store.repository import (
    Exported,
    FlowRecord,
    FlowRepository,
    IngestResult,
    Listing,
    Page,
    QueryError,
    RepositoryError,
    render_rows,
)
from services.store.rows import (
    COLUMNS,
    DAY_S,
    Row,
    decode_body,
    decode_payloads,
    ended_doc,
    rows_of,
)
from services.store.sqlite import DEFAULT_SCAN_LIMIT

log = logging.getLogger("proxyfleet.store.postgres")

T = TypeVar("T")
Rows = list[tuple[Any, ...]]

PRUNE_CHUNK = 5000  # rows per delete transaction
POOL_TIMEOUT = 5.0  # seconds to wait for a connection (the database down: fail the batch)
STATEMENT_TIMEOUT_MS = 60_000  # no statement of ours takes this long; a runaway one stops
COUNT_BUDGET_MS = 10  # a listing's filtered_count: exact within this, else a lower bound
KNOWN_VALUES_MAX = 50_000  # values remembered as already in ``flow_values``

# Column types of ``flows``, for the binary COPY of a batch.
_TYPES = {
    "port": "int8",
    "status": "int8",
    "req_size": "int8",
    "resp_size": "int8",
    "req_truncated": "int4",
    "resp_truncated": "int4",
    "started_at": "float8",
    "ended_at": "float8",
    "doc": "bytea",
    "req_body": "bytea",
    "resp_body": "bytea",
}
COPY_TYPES = [_TYPES.get(c, "text") for c in COLUMNS]
_COLS = ", ".join(COLUMNS)
_UPDATED = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c != "id")
# A batch is copied (binary COPY: a few microseconds a row in the driver, where binding
# arrays or a VALUES list costs ten times that) into a temporary table of the connection's
# own, then merged by the rule of ``sql.UPSERT`` in one statement (one row per flow: the
# batch was merged in memory first, see ``rows.merge_into``), in id order.
STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS stage (LIKE flows INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
COPY_STAGE = f"COPY stage ({_COLS}) FROM STDIN (FORMAT BINARY)"
MERGE_STAGE = (
    f"INSERT INTO flows ({_COLS}) SELECT {_COLS} FROM stage ORDER BY id "
    f"ON CONFLICT (id) DO UPDATE SET {_UPDATED}, presumed = 0 "
    "WHERE (flows.state = 'active' OR flows.presumed = 1) AND excluded.state <> 'active'"
)
VALUES_INSERT = (
    "INSERT INTO flow_values (col, value) SELECT * FROM unnest($1::text[], $2::text[]) "
    "AS t(col, value) ORDER BY 1, 2 ON CONFLICT DO NOTHING"
)
VALUES_OF = "SELECT value FROM flow_values WHERE col = $1 ORDER BY value LIMIT $2"
# Columns whose values ``flow_values`` lists: row index of the value, and how it is listed.
_VALUE_COLUMNS: tuple[tuple[str, int], ...] = (
    ("method", COLUMNS.index("method")),
    ("host", COLUMNS.index("host")),  # listed lowercased, as SQLite lists it from ``rhost``
    ("authority", COLUMNS.index("authority")),
    ("replica", COLUMNS.index("replica")),
)
_TEXT_INDEXES = tuple(i for i, t in enumerate(COPY_TYPES) if t == "text" and i > 0)
_DOC = COLUMNS.index("doc")
ESTIMATE = (
    "SELECT COALESCE(sum(n_live_tup), 0) FROM pg_stat_user_tables "
    "WHERE relname = 'flows_default' OR relname LIKE 'flows\\_p%'"
)

_QMARK = re.compile(r"\?")


@functools.lru_cache(maxsize=2048)
def native(statement: str) -> str:
    """A statement of ``sql``/``search``/``filtersql`` (``?`` placeholders) with
    PostgreSQL's ``$1, $2, ...`` (their SQL text holds no ``?`` in a literal)."""
    counter = iter(range(1, 1 << 30))
    return _QMARK.sub(lambda _m: f"${next(counter)}", statement)


def _no_nul(value: object) -> object:
    """PostgreSQL text cannot hold NUL: a parameter's NUL is U+FFFD, as stored (``_clean``)."""
    return value.replace("\x00", "\ufffd") if type(value) is str and "\x00" in value else value


def _clean(row: Row) -> Row:
    """A row whose text holds NUL (the document says so: JSON escapes it as ``\\u0000``)
    with each NUL replaced by U+FFFD; the document itself (bytea) keeps it."""
    if b"\\u0000" not in row[_DOC]:
        return row
    return tuple(_no_nul(v) if i in _TEXT_INDEXES else v for i, v in enumerate(row))


def _configure(conn: psycopg.Connection) -> None:
    conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
    conn.execute(STAGE)


class PostgresRepository(FlowRepository):
    """Flows in a PostgreSQL database shared by any number of store replicas."""

    def __init__(
        self,
        dsn: str,
        pool_size: int = 8,
        scan_limit: int = DEFAULT_SCAN_LIMIT,
        open_timeout: float = 15.0,
        password: str | None = None,
    ) -> None:
        # the pool logs every failed reconnection, over several lines: the consumer says
        # once that the database is down, and once that it is back
        logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
        self.dsn = dsn
        # a password from a file (``FLEET_STORE_DB_PASSWORD_FILE``) goes beside the URL,
        # never into it: the URL is what gets printed
        self._auth: dict[str, Any] = {"password": password} if password is not None else {}
        self.scan_limit = scan_limit
        self.open_timeout = open_timeout
        self._pool = ConnectionPool(
            dsn,
            min_size=min(2, pool_size),
            max_size=pool_size,
            open=False,
            kwargs={"autocommit": True, "cursor_factory": RawCursor, **self._auth},
            configure=_configure,
            check=ConnectionPool.check_connection,
            timeout=POOL_TIMEOUT,
            name="proxyfleet-store",
        )
        self._threads = ThreadPoolExecutor(pool_size, thread_name_prefix="store-pg")
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="store-decode")
        self._known_values: set[tuple[str, str]] = set()  # committed to ``flow_values``
        self._identity = ""
        self._closed = False

    # -- plumbing -------------------------------------------------------------------------
    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RepositoryError("store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    def _connect(self, **options: Any) -> psycopg.Connection:
        """A plain connection of its own (schema work, retention), ``%s`` placeholders."""
        return psycopg.connect(self.dsn, autocommit=True, **self._auth, **options)

    def _conn(self) -> Any:
        """A pooled connection (context manager); ``PoolTimeout`` when none comes in
        ``POOL_TIMEOUT`` (the database down: callers answer ``RepositoryError``)."""
        return self._pool.connection()

    # -- lifecycle --------------------------------------------------------------------------
    async def open(self) -> None:
        try:
            await self._run(self._open)
        except (psycopg.Error, PoolTimeout, pgschema.SchemaError, RepositoryError) as exc:
            raise RepositoryError(f"cannot open the PostgreSQL database: {_line(exc)}") from None

    def _open(self) -> None:
        # schema work first, on a plain connection (``%s`` placeholders, transactions): the
        # pool's connections make their stage table after ``flows``
        deadline = time.monotonic() + self.open_timeout
        while True:  # the database may still be starting (compose, a restart): retry a while
            try:
                conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10, **self._auth)
                break
            except psycopg.OperationalError as exc:
                if time.monotonic() >= deadline:
                    raise RepositoryError(f"cannot connect: {_line(exc)}") from None
                time.sleep(0.5)
        with conn:
            before = pgschema.migrate(conn)
            if before != pgschema.SCHEMA_VERSION:
                log.info("schema at version %d (was %d)", pgschema.SCHEMA_VERSION, before)
            pgschema.ensure_partitions(conn)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
                ("db_id", secrets.token_hex(8)),
            )
            row = conn.execute("SELECT value FROM meta WHERE key = 'db_id'").fetchone()
            assert row is not None
            self._identity = str(row[0])
        self._pool.open(wait=True, timeout=self.open_timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._threads.shutdown, True)
        await loop.run_in_executor(None, self._decoder.shutdown, True)
        await loop.run_in_executor(None, functools.partial(self._pool.close, timeout=5.0))

    async def identity(self) -> str:
        if not self._identity:
            raise RepositoryError("store is not open")
        return self._identity

    async def ping(self) -> None:
        await self._run(self._ping)

    def _ping(self) -> None:
        try:
            with self._conn() as conn:
                conn.execute("SELECT 1").fetchall()
        except (psycopg.Error, PoolTimeout) as exc:
            raise RepositoryError(f"database unreachable: {_line(exc)}") from None

    # -- ingest -----------------------------------------------------------------------------
    async def ingest(self, payloads: Sequence[bytes]) -> IngestResult:
        if self._closed:
            raise RepositoryError("store is closed")
        loop = asyncio.get_running_loop()
        decoded = await loop.run_in_executor(self._decoder, decode_payloads, payloads)
        extra_bad = await self._run(self._write_rows, decoded.rows) if decoded.rows else 0
        return IngestResult.of(decoded, extra_bad)

    async def upsert_events(self, events: Sequence[Mapping[str, Any]]) -> int:
        loop = asyncio.get_running_loop()
        decoded = await loop.run_in_executor(self._decoder, rows_of, events)
        extra = await self._run(self._write_rows, decoded.rows) if decoded.rows else 0
        return decoded.bad_events + extra

    def _write_rows(self, rows: list[Row]) -> int:
        """Merge ``rows`` in one transaction; return how many the database refused."""
        rows = [_clean(r) for r in rows]
        values = self._new_values(rows)
        try:
            with self._conn() as conn:
                try:
                    with conn.transaction():
                        self._upsert(conn, rows)
                        self._add_values(conn, values)
                    bad = 0
                except psycopg.DataError:
                    # a value the database refused: keep the others, one savepoint each
                    with conn.transaction():
                        bad = self._one_by_one(conn, rows)
                        self._add_values(conn, values)
        except (psycopg.Error, PoolTimeout) as exc:
            raise RepositoryError(f"ingest failed: {_line(exc)}") from None
        if len(self._known_values) > KNOWN_VALUES_MAX:  # a cache: a hostile publisher's
            self._known_values.clear()  # million hosts must not live here too
        self._known_values |= values
        return bad

    @staticmethod
    def _upsert(conn: psycopg.Connection, rows: list[Row], clear: bool = False) -> None:
        """Copy ``rows`` into the stage and merge them (inside the caller's transaction;
        the stage empties at its commit, or now with ``clear``)."""
        cur = conn.cursor()
        with cur.copy(COPY_STAGE) as copy:
            copy.set_types(COPY_TYPES)
            write = copy.write_row
            for row in rows:
                write(row)
        cur.execute(MERGE_STAGE)
        if clear:
            cur.execute("DELETE FROM stage")

    def _one_by_one(self, conn: psycopg.Connection, rows: list[Row]) -> int:
        bad = 0
        for row in rows:
            try:
                with conn.transaction():
                    self._upsert(conn, [row], clear=True)
            except psycopg.DataError as exc:
                log.warning("flow %s not stored: %s", row[0], _line(exc))
                bad += 1
        return bad

    def _new_values(self, rows: list[Row]) -> set[tuple[str, str]]:
        found: set[tuple[str, str]] = set()
        for row in rows:
            for column, index in _VALUE_COLUMNS:
                value = row[index]
                if value is not None:
                    found.add((column, value.lower() if column == "host" else value))
        return found - self._known_values

    @staticmethod
    def _add_values(conn: psycopg.Connection, values: set[tuple[str, str]]) -> None:
        if values:
            cols, vals = zip(*values, strict=True)
            conn.execute(VALUES_INSERT, [list(cols), list(vals)])

    async def estimate_rows(self) -> int | None:
        return await self._run(self._estimate)

    def _estimate(self) -> int | None:
        try:
            with self._conn() as conn:
                row = conn.execute(ESTIMATE).fetchone()
        except (psycopg.Error, PoolTimeout):
            return None
        return int(row[0]) if row else None

    # -- gone replicas ----------------------------------------------------------------------
    async def end_active_flows(
        self, replica: str, reason: str, started_before: float | None = None
    ) -> int:
        return await self._run(self._end_active, replica, reason, time.time(), started_before)

    def _end_active(
        self, replica: str, reason: str, now: float, started_before: float | None
    ) -> int:
        params: list[object] = [replica]
        if started_before is None:
            select = sql.ACTIVE_OF_REPLICA
        else:
            select = sql.ACTIVE_OF_REPLICA_BEFORE
            params.append(started_before)
        ended = 0
        try:
            with self._conn() as conn, conn.transaction():
                found = conn.execute(native(select + " ORDER BY id FOR UPDATE"), params).fetchall()
                for flow_id, doc in found:
                    cur = conn.execute(
                        native(sql.END_ACTIVE),
                        [reason, now, ended_doc(bytes(doc), reason, now), flow_id],
                    )
                    ended += max(cur.rowcount, 0)
        except (psycopg.Error, PoolTimeout) as exc:
            raise RepositoryError(f"ending the flows of {replica} failed: {_line(exc)}") from None
        return ended

    # -- retention --------------------------------------------------------------------------
    async def prune(self, max_age_s: float, max_count: int) -> int:
        return await self._run(self._prune, max_age_s, max_count, time.time())

    def _prune(self, max_age_s: float, max_count: int, now: float) -> int:
        """Age: drop the day partitions wholly older than the cutoff, and delete the older
        rows of the default partition (and, for a retention shorter than a day, of the
        day partitions too). Count: drop or delete from the oldest end down to the limit.
        """
        cutoff = time_bound(max(0.0, now - max_age_s))
        deleted = 0
        try:
            with self._connect() as conn:
                # one store at a time makes partitions and prunes (the others would wait on
                # its rows, then find them gone); the lock ends with this connection
                row = conn.execute(
                    "SELECT pg_try_advisory_lock(%s)", (pgschema.RETENTION_LOCK,)
                ).fetchone()
                if not row or not row[0]:
                    return 0
                pgschema.ensure_partitions(conn, now)
                deleted += self._drop_below(conn, cutoff, inclusive=False)
                table = "flows" if max_age_s < DAY_S else "flows_default"
                deleted += _delete_chunks(conn, table, "<", cutoff)
                # the count limit reads max_count index entries to find where it falls:
                # skip that while the statistics say the table is far below it
                row = conn.execute(ESTIMATE).fetchone()
                estimate = int(row[0]) if row and row[0] is not None else 0
                far_below = 0 < estimate < max_count // 2
                last = None
                if not far_below:
                    last = conn.execute(
                        "SELECT id FROM flows ORDER BY id DESC LIMIT 1 OFFSET %s", (max_count,)
                    ).fetchone()
                if last is not None:
                    deleted += self._drop_below(conn, last[0], inclusive=True)
                    deleted += _delete_chunks(conn, "flows", "<=", last[0])
        except (psycopg.Error, pgschema.SchemaError) as exc:
            raise RepositoryError(f"prune failed: {_line(exc)}") from None
        return deleted

    @staticmethod
    def _drop_below(conn: psycopg.Connection, bound: str, inclusive: bool) -> int:
        """Drop every day partition all of whose ids are below ``bound`` (or at it)."""
        n = 0
        for part in pgschema.existing_partitions(conn):
            if part.high <= bound or (inclusive and part.high <= bound + "\x00"):
                n += pgschema.drop_partition(conn, part)
        return n

    # -- queries ----------------------------------------------------------------------------
    def _reader(self, fn: Callable[[sql.Execute], T]) -> T:
        """Run ``fn`` with an ``execute`` over one pooled connection; map the errors."""
        try:
            with self._conn() as conn:

                def execute(statement: str, params: list[object]) -> Rows:
                    values = [_no_nul(p) for p in params]
                    if statement.startswith(search.BOUNDED_COUNT):
                        return _budgeted(conn, native(statement), values)
                    # a LIKE's best plan depends on its pattern (the trigram index or
                    # not): never the generic plan of a prepared statement
                    prepare = False if " LIKE " in statement else None
                    return conn.execute(native(statement), values, prepare=prepare).fetchall()

                return fn(execute)
        except FilterTimeout as exc:
            raise QueryError("q", str(exc), code="BAD_FILTER") from None
        except (psycopg.Error, PoolTimeout) as exc:
            raise RepositoryError(f"query failed: {_line(exc)}") from None

    def _vocabulary(self, execute: sql.Execute) -> Callable[[str], list[str] | None]:
        def values(column: str) -> list[str] | None:
            fixed = search.FIXED_VOCABULARIES.get(column)
            if fixed is not None:
                return list(fixed)
            rows = execute(VALUES_OF, [column, search.VOCABULARY_MAX + 1])
            if len(rows) > search.VOCABULARY_MAX:
                return None
            return [r[0] for r in rows]

        return values

    async def list(self, query: FlowQuery) -> Page:
        found = await self._run(self._listing, plan(query), False)
        return found.flows, found.next_cursor

    async def listing(self, query: FlowQuery) -> Listing:
        return await self._run(self._listing, plan(query), True)

    def _listing(self, p: Plan, counted: bool) -> Listing:
        return self._reader(
            lambda ex: search.answer(ex, p, self.scan_limit, counted, self._vocabulary(ex))
        )

    async def count(self, query: FlowQuery) -> int:
        p = plan(query)
        return await self._run(
            self._reader,
            lambda ex: search.count_all(ex, p, self.scan_limit, self._vocabulary(ex)),
        )

    async def get(self, flow_id: str) -> FlowRecord | None:
        rows = await self._run(self._reader, lambda ex: ex(sql.GET, [flow_id]))
        if not rows:
            return None
        doc, req_body, resp_body = rows[0]
        return FlowRecord(orjson.loads(doc), decode_body(req_body), decode_body(resp_body))

    async def export_records(
        self, ids: Sequence[str], max_bytes: int, render: str = "wire"
    ) -> Exported:
        if not ids:
            return Exported([], complete=True)
        wanted = list(ids)
        return await self._run(
            self._reader,
            lambda ex: render_rows(
                ex(sql.records_in(len(wanted)), list(wanted)), max_bytes, render
            ),
        )


def _budgeted(conn: psycopg.Connection, statement: str, params: list[object]) -> Rows:
    """A listing's bounded count, given ``COUNT_BUDGET_MS``: counting up to 10,001 matches
    can read that many rows, tens of milliseconds on a big table when the filter's column
    is not in the index it walks. Past the budget: no row (``search.bounded_count`` then
    answers the page's matches as a lower bound, ``filtered_count_exact`` false)."""
    try:
        with conn.transaction():
            conn.execute(f"SET LOCAL statement_timeout = {COUNT_BUDGET_MS}")
            return conn.execute(statement, params).fetchall()
    except psycopg.errors.QueryCanceled:
        return []


def _delete_chunks(conn: psycopg.Connection, table: str, op: str, bound: str) -> int:
    """Delete the rows of ``table`` with ``id <op> bound``, oldest first, a chunk per
    transaction (ingest goes on in between)."""
    deleted = 0
    statement = (
        f"DELETE FROM {table} WHERE id IN "
        f"(SELECT id FROM {table} WHERE id {op} %s ORDER BY id LIMIT %s)"
    )
    while True:
        n = conn.execute(statement, (bound, PRUNE_CHUNK)).rowcount
        deleted += max(n, 0)
        if n < PRUNE_CHUNK:
            return deleted


def _line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
