"""The SQLite flow repository: WAL, one writer, reader threads, optional ingest workers.

No SQLite call runs on the event loop. A single writer connection (its own
thread) does schema, pruning and ``upsert_events``; readers have their own
connections, and WAL lets them read a consistent snapshot while a batch is
being written. Ingest of FLOWS batches either runs in-process (decode thread,
then the writer thread; one batch at a time, since both hold the GIL) or, with
``ingest_workers`` > 0, in worker processes that each decode and write with their
own connection, so that ingest is not capped at one core (see ``writer``).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

import orjson

from libs.common import logs
from libs.common.flowfilter import FilterTimeout
from libs.common.models import FlowQuery
from services.store import search, sql, writer
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
from services.store.rows import Row, decode_body, decode_payloads, ended_doc, rows_of

log = logging.getLogger("proxyfleet.store.sqlite")

T = TypeVar("T")
Values = list[object]  # (module-level: inside the class ``list`` is the query method)
Rows = list[tuple[Any, ...]]
Statement = tuple[str | None, Values]

# 2: ``presumed`` (flows the store ended for a gone replica) and the ``meta`` table.
# 3: ``authority`` (the Host header's host where it differs from ``host``).
# 4: the policy's account of a flow: ``rules``, ``tags``, ``decision``, ``replay_of``,
#    ``policy``, ``intercept`` (see ``rows.COLUMNS``).
# 5: ``timings`` (a flow's phase points, for a listing's waterfall).
SCHEMA_VERSION = 5
SCHEMA = """
CREATE TABLE IF NOT EXISTS flows (
    id TEXT PRIMARY KEY,
    replica TEXT,
    state TEXT NOT NULL,
    kind TEXT,
    scheme TEXT,
    method TEXT,
    host TEXT,
    rhost TEXT,
    port INTEGER,
    path TEXT,
    status INTEGER,
    started_at REAL,
    ended_at REAL,
    req_size INTEGER,
    resp_size INTEGER,
    req_truncated INTEGER NOT NULL DEFAULT 0,
    resp_truncated INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    doc BLOB NOT NULL,
    req_body BLOB,
    resp_body BLOB,
    presumed INTEGER NOT NULL DEFAULT 0,
    authority TEXT,
    rules TEXT,
    tags TEXT,
    decision TEXT,
    replay_of TEXT,
    policy TEXT,
    intercept TEXT,
    timings TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS flows_rhost ON flows (rhost, id);
CREATE INDEX IF NOT EXISTS flows_method ON flows (method, id);
CREATE INDEX IF NOT EXISTS flows_status ON flows (status, id);
CREATE INDEX IF NOT EXISTS flows_state ON flows (state, id);
CREATE INDEX IF NOT EXISTS flows_replica ON flows (replica, id);
"""
# Indexes on columns added by a migration (created after it has run), and the pairs the
# filter language meets most (``~d host & ~c 200``, ``~m POST & ~c 500``): a page and its
# bounded count read one index range instead of checking rows: ``id`` third keeps a page
# newest first without a sort, ``kind`` last answers the HTTP check every such operator
# carries, so that the count never reads the table.
LATE_INDEXES = """
CREATE INDEX IF NOT EXISTS flows_authority ON flows (authority, id) WHERE authority IS NOT NULL;
CREATE INDEX IF NOT EXISTS flows_rhost_status_id ON flows (rhost, status, id, kind);
CREATE INDEX IF NOT EXISTS flows_status_method_id ON flows (status, method, id, kind);
CREATE INDEX IF NOT EXISTS flows_decided ON flows (id) WHERE decision IS NOT NULL;
CREATE INDEX IF NOT EXISTS flows_decision ON flows (decision, id) WHERE decision IS NOT NULL;
CREATE INDEX IF NOT EXISTS flows_ruled ON flows (id) WHERE rules IS NOT NULL;
CREATE INDEX IF NOT EXISTS flows_tagged ON flows (id) WHERE tags IS NOT NULL;
"""
# Columns each schema version added to ``flows`` (an older table gains what it lacks).
ADDED_COLUMNS = (
    ("presumed", "INTEGER NOT NULL DEFAULT 0"),  # 2
    ("authority", "TEXT"),  # 3
    ("rules", "TEXT"),  # 4
    ("tags", "TEXT"),
    ("decision", "TEXT"),
    ("replay_of", "TEXT"),
    ("policy", "TEXT"),
    ("intercept", "TEXT"),
    ("timings", "TEXT"),  # 5
)

# Rows, estimated from the rowid range (two b-tree edge lookups, no scan); NULL when empty.
ROWID_SPAN = "SELECT (SELECT max(rowid) FROM flows) - (SELECT min(rowid) FROM flows) + 1"
PRUNE_CHUNK = 2000  # rows per delete transaction: ~10-30 ms of writer time
ANALYZE_EVERY = 120  # prune passes between statistics refreshes (an hour at the default)
DEFAULT_SCAN_LIMIT = 20_000  # FLEET_STORE_SCAN_LIMIT
EXPORT_SPLIT_MIN = 100  # flows per worker share of an export page, at least


def _private_file(path: Path) -> None:
    """Create the database file 0600 before SQLite does (its -wal and -shm files get the
    same mode); an existing one is narrowed to 0600. Flows hold captured traffic."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class SQLiteRepository(FlowRepository):
    """Flows in one SQLite file (``$FLEET_DATA_DIR/flows.db`` by default)."""

    def __init__(
        self,
        path: Path,
        readers: int = 2,
        ingest_workers: int = 0,
        scan_limit: int = DEFAULT_SCAN_LIMIT,
    ) -> None:
        self.path = Path(path)
        self.ingest_workers = ingest_workers
        self.scan_limit = scan_limit  # rows a rechecked filter looks at per call
        self._vocabularies = search.Vocabularies()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="store-decode")
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="store-reader")
        self._pool: ProcessPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._prunes = 0
        self._analyzed_rows = 0  # rows when statistics were last refreshed
        self._ingest_lock = asyncio.Lock()
        self._restart_lock = asyncio.Lock()
        self._closed = False
        self._identity = ""

    # -- plumbing -------------------------------------------------------------------------
    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RepositoryError("store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    async def _prep(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RepositoryError("store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._decoder, writer.without_gc, fn, *args)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise RepositoryError("store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._readers, fn, *args)

    @property
    def _w(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RepositoryError("store is not open")
        return self._conn

    def _reader(self) -> sqlite3.Connection:
        """This reader thread's connection (opened on first use, query-only)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = writer.connect(self.path, cache_kib=32768)
            conn.execute("PRAGMA query_only = ON")
            conn.execute("PRAGMA mmap_size = 268435456")
            self._local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        return conn

    # -- lifecycle --------------------------------------------------------------------------
    async def open(self) -> None:
        try:
            await self._write(self._open)
        except (sqlite3.Error, OSError) as exc:
            raise RepositoryError(f"cannot open database {self.path}: {exc}") from None
        if self.ingest_workers > 0:
            await self._start_pool()

    def _open(self) -> None:
        if not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, mode=0o700)
        _private_file(self.path)
        conn = writer.connect(self.path)
        try:
            # 16 KiB pages: a flow row is ~1-2 KB; bigger pages mean fewer WAL frames and
            # b-tree splits per insert (~30% less writer CPU). Only applies to a new file.
            conn.execute(f"PRAGMA page_size = {writer.PAGE_SIZE}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot use WAL (journal_mode is {mode})")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if not 0 <= version <= SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"schema version {version}, expected {SCHEMA_VERSION}")
            # CREATE TABLE IF NOT EXISTS keeps an older flows table: add what it lacks
            if 0 < version < SCHEMA_VERSION:
                have = {row[1] for row in conn.execute("PRAGMA table_info(flows)")}
                for name, kind in ADDED_COLUMNS:
                    if name not in have:
                        conn.execute(f"ALTER TABLE flows ADD COLUMN {name} {kind}")
            conn.executescript(SCHEMA)
            conn.executescript(LATE_INDEXES)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute(sql.META_INSERT, ("db_id", secrets.token_hex(8)))
            self._identity = str(conn.execute(sql.META_GET, ("db_id",)).fetchone()[0])
            # SQLite gives -wal and -shm the database's mode; ones left from before may differ
            for suffix in ("-wal", "-shm"):
                extra = self.path.with_name(self.path.name + suffix)
                if extra.exists():
                    os.chmod(extra, 0o600)
            self._analyze(conn)
            span = conn.execute(ROWID_SPAN).fetchone()
            self._analyzed_rows = int(span[0]) if span and span[0] is not None else 0
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def _start_pool(self) -> None:
        """Start the ingest worker processes (spawned: never fork a threaded process)."""
        self._pool = ProcessPoolExecutor(
            self.ingest_workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=writer.worker_init,
            initargs=(str(self.path), os.getpid(), logs.current_config()),
        )
        loop = asyncio.get_running_loop()
        try:
            pings = [
                loop.run_in_executor(self._pool, writer.worker_ping)
                for _ in range(self.ingest_workers)
            ]
            await asyncio.gather(*pings)
        except Exception as exc:
            await self._stop_pool()
            raise RepositoryError(f"cannot start ingest workers: {exc!r}") from None

    async def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, pool.shutdown, True)

    @staticmethod
    def _analyze(conn: sqlite3.Connection) -> None:
        """Refresh planner statistics, over whole indexes (~1 s per million flows).

        A sampled ANALYZE reads the first entries of each ``(column, id)`` index only, all
        of one value, and tells the planner every value is as rare as the first: then it
        walks ``status = 200`` (most of the table) for a rare host."""
        conn.execute("PRAGMA analysis_limit = 0")
        conn.execute("ANALYZE")

    async def close(self) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        self._closed = True
        await self._stop_pool()
        await loop.run_in_executor(None, self._readers.shutdown, True)
        await loop.run_in_executor(None, self._decoder.shutdown, True)
        with self._lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
        await loop.run_in_executor(self._writer, self._close_writer)
        await loop.run_in_executor(None, self._writer.shutdown, True)

    def _close_writer(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- ingest -----------------------------------------------------------------------------
    async def ingest(self, payloads: Sequence[bytes]) -> IngestResult:
        if self._closed:
            raise RepositoryError("store is closed")
        if self._pool is not None:
            return await self._ingest_in_worker(payloads)
        # In-process: decode in one thread, write in another, one batch at a time (two
        # batches overlapping only fight over the GIL); the caller prefetches meanwhile.
        async with self._ingest_lock:
            decoded = await self._prep(decode_payloads, payloads)
            extra_bad = await self._write_rows(decoded.rows)
        return IngestResult.of(decoded, extra_bad)

    async def _write_rows(self, rows: list[Row]) -> int:
        return await self._write(writer.write_rows, self._w, rows) if rows else 0

    async def _ingest_in_worker(self, payloads: Sequence[bytes]) -> IngestResult:
        pool = self._pool
        assert pool is not None
        loop = asyncio.get_running_loop()
        try:
            events, bad, undecodable = await loop.run_in_executor(
                pool, writer.worker_ingest, list(payloads)
            )
        except BrokenProcessPool:
            async with self._restart_lock:
                if self._pool is pool and not self._closed:  # not restarted meanwhile
                    log.error("an ingest worker died; restarting the workers")
                    await self._stop_pool()
                    await self._start_pool()
            raise RepositoryError("ingest worker died; batch will be redelivered") from None
        return IngestResult(events, bad, tuple(undecodable))

    async def upsert_events(self, events: Sequence[Mapping[str, Any]]) -> int:
        decoded = await self._prep(rows_of, events)
        return decoded.bad_events + await self._write_rows(decoded.rows)

    async def estimate_rows(self) -> int | None:
        return await self._read(self._estimate_rows)

    def _estimate_rows(self) -> int:
        # Two b-tree edge lookups instead of a count(*) scan. Rowids grow with insertion
        # and pruning deletes the oldest flows, so this is exact until pruning meets
        # flows that arrived out of order; then it is a slight overestimate.
        row = self._reader().execute(ROWID_SPAN).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    # -- identity and gone replicas ---------------------------------------------------------
    async def identity(self) -> str:
        if not self._identity:
            raise RepositoryError("store is not open")
        return self._identity

    async def end_active_flows(
        self, replica: str, reason: str, started_before: float | None = None
    ) -> int:
        return await self._write(self._end_active, replica, reason, time.time(), started_before)

    def _end_active(
        self, replica: str, reason: str, now: float, started_before: float | None
    ) -> int:
        conn = self._w
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if started_before is None:
                    rows = conn.execute(sql.ACTIVE_OF_REPLICA, (replica,)).fetchall()
                else:
                    rows = conn.execute(
                        sql.ACTIVE_OF_REPLICA_BEFORE, (replica, started_before)
                    ).fetchall()
                ended = 0
                for flow_id, doc in rows:
                    cur = conn.execute(
                        sql.END_ACTIVE, (reason, now, ended_doc(doc, reason, now), flow_id)
                    )
                    ended += max(cur.rowcount, 0)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise RepositoryError(f"ending the flows of {replica} failed: {exc}") from None
        return ended

    # -- retention --------------------------------------------------------------------------
    async def prune(self, max_age_s: float, max_count: int) -> int:
        deleted = 0
        cutoff = time_bound(max(0.0, time.time() - max_age_s))
        while True:
            n = await self._write(self._delete, sql.DELETE_BEFORE, cutoff)
            deleted += n
            if n < PRUNE_CHUNK:
                break
        last = await self._write(self._nth_newest, max_count)
        while last is not None:
            n = await self._write(self._delete, sql.DELETE_UPTO, last)
            deleted += n
            if n < PRUNE_CHUNK:
                break
        self._prunes += 1
        rows = await self._write(self._rows_w)
        # hourly, and whenever the table doubled since (a young store grows from nothing)
        if self._prunes % ANALYZE_EVERY == 0 or rows > 2 * self._analyzed_rows + 1000:
            await self._write(self._analyze_w)
            self._analyzed_rows = rows
        return deleted

    def _rows_w(self) -> int:
        row = self._w.execute(ROWID_SPAN).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _delete(self, statement: str, bound: str) -> int:
        try:
            cur = self._w.execute(statement, (bound, PRUNE_CHUNK))
        except sqlite3.Error as exc:
            raise RepositoryError(f"prune failed: {exc}") from None
        return max(cur.rowcount, 0)

    def _nth_newest(self, n: int) -> str | None:
        """The newest id that no longer fits in ``n`` flows (None: nothing to delete)."""
        try:
            row = self._w.execute(sql.NTH_NEWEST, (n,)).fetchone()
        except sqlite3.Error as exc:
            raise RepositoryError(f"prune failed: {exc}") from None
        return row[0] if row else None

    def _analyze_w(self) -> None:
        try:
            self._analyze(self._w)
        except sqlite3.Error as exc:
            log.warning("ANALYZE failed: %s", exc)

    # -- queries ----------------------------------------------------------------------------
    async def list(self, query: FlowQuery) -> Page:
        found = await self._read(self._listing, plan(query), False)
        return found.flows, found.next_cursor

    async def listing(self, query: FlowQuery) -> Listing:
        return await self._read(self._listing, plan(query), True)

    def _execute(self, statement: str, params: Values) -> Rows:
        return self._reader().execute(statement, params).fetchall()

    def _listing(self, p: Plan, counted: bool) -> Listing:
        """A page; ``counted``: with its ``filtered_count`` (a listing, not an export)."""
        vocab = self._vocabularies.bind(self._execute)
        try:
            return search.answer(self._execute, p, self.scan_limit, counted, vocab)
        except FilterTimeout as exc:
            raise QueryError("q", str(exc), code="BAD_FILTER") from None
        except sqlite3.Error as exc:
            raise RepositoryError(f"query failed: {exc}") from None

    async def count(self, query: FlowQuery) -> int:
        p = plan(query)
        return await self._read(self._count, p)

    def _count(self, p: Plan) -> int:
        vocab = self._vocabularies.bind(self._execute)
        try:
            return search.count_all(self._execute, p, self.scan_limit, vocab)
        except FilterTimeout as exc:
            raise QueryError("q", str(exc), code="BAD_FILTER") from None
        except sqlite3.Error as exc:
            raise RepositoryError(f"query failed: {exc}") from None

    async def get(self, flow_id: str) -> FlowRecord | None:
        return await self._read(self._get, flow_id)

    def _get(self, flow_id: str) -> FlowRecord | None:
        try:
            row = self._reader().execute(sql.GET, (flow_id,)).fetchone()
        except sqlite3.Error as exc:
            raise RepositoryError(f"query failed: {exc}") from None
        if row is None:
            return None
        doc, req_body, resp_body = row
        return FlowRecord(orjson.loads(doc), decode_body(req_body), decode_body(resp_body))

    async def export_records(
        self, ids: Sequence[str], max_bytes: int, render: str = "wire"
    ) -> Exported:
        if not ids:
            return Exported([], complete=True)
        pool = self._pool
        if pool is None or len(ids) < 2 * EXPORT_SPLIT_MIN:
            return await self._read(self._export_records, list(ids), max_bytes, render)
        # rendering is CPU work: split the page over the ingest workers (processes, so
        # in parallel), each reading its share with its own connection and budget
        shares = min(self.ingest_workers, len(ids) // EXPORT_SPLIT_MIN)
        size = -(-len(ids) // shares)
        loop = asyncio.get_running_loop()
        parts = await asyncio.gather(
            *(
                loop.run_in_executor(
                    pool, writer.worker_export, list(ids[k : k + size]), max_bytes // shares, render
                )
                for k in range(0, len(ids), size)
            )
        )
        flows: list[tuple[str, bytes]] = []
        for part in parts:
            flows += part.flows
            if not part.complete:  # the page ends where one share's budget did
                return Exported(flows, complete=False)
        return Exported(flows, complete=True)

    def _export_records(self, ids: Sequence[str], max_bytes: int, render: str) -> Exported:
        """One primary-key read of the page, rendered in this reader thread; rows are taken
        one at a time and reading stops at the byte budget (memory stays one reply)."""
        try:
            cur = self._reader().execute(sql.records_in(len(ids)), ids)
            try:
                return render_rows(cur, max_bytes, render)
            finally:
                cur.close()
        except sqlite3.Error as exc:
            raise RepositoryError(f"query failed: {exc}") from None
