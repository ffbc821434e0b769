"""The SQLite write path: connection set-up, one batch in one transaction, and the
entry points of the ingest worker processes.

Decoding a batch (orjson, base64, zlib) costs about twice the SQLite insert, and
all of it but the insert holds the GIL, so one store process ingests on one core
at most. ``SQLiteRepository`` can therefore hand batches to worker processes
(``worker_init`` / ``worker_ingest``), each with its own connection to the same
database file: decoding runs in parallel and SQLite serialises the commits.
This module is what such a worker imports, so it stays small.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from services.store import sql
from services.store.repository import Exported, RepositoryError, render_rows
from services.store.rows import Row, decode_payloads

log = logging.getLogger("proxyfleet.store.writer")

T = TypeVar("T")

PAGE_SIZE = 16384
BUSY_TIMEOUT_MS = 10_000  # another writer (worker, pruner) holds the lock for < 1 s
PARENT_CHECK_S = 0.5
_DATA_ERRORS = (sqlite3.IntegrityError, sqlite3.InterfaceError, OverflowError, ValueError)


def connect(path: Path | str, cache_kib: int = 65536) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) that waits on locks."""
    conn = sqlite3.connect(
        str(path),
        isolation_level=None,
        check_same_thread=False,
        timeout=BUSY_TIMEOUT_MS / 1000,
    )
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute(f"PRAGMA cache_size = -{cache_kib}")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA temp_store = MEMORY")
    return conn


def without_gc(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` with the cyclic garbage collector paused.

    Decoding a batch allocates ~20 containers per event, all alive until the batch
    is written; with the collector on, every batch sets off collections that walk
    the whole heap (measured: decoding ~30% slower). Decoded JSON has no cycles,
    so reference counting frees it all anyway. Callers are single decode threads
    or worker processes, so no other caller can end the pause early.
    """
    if not gc.isenabled():
        return fn(*args)
    gc.disable()
    try:
        return fn(*args)
    finally:
        gc.enable()


def write_rows(conn: sqlite3.Connection, rows: list[Row]) -> int:
    """Upsert ``rows`` in one transaction; return how many the database refused.

    Raises ``RepositoryError`` (nothing committed) when the database fails.
    """
    bad = 0
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(sql.UPSERT, rows)
        except _DATA_ERRORS:
            # A row the driver or a constraint refused: keep the others.
            conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
            bad = _one_by_one(conn, rows)
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise RepositoryError(f"ingest failed: {exc}") from None
    return bad


def _one_by_one(conn: sqlite3.Connection, rows: list[Row]) -> int:
    bad = 0
    for row in rows:
        try:
            conn.execute(sql.UPSERT, row)
        except _DATA_ERRORS as exc:
            log.warning("flow %s not stored: %s", row[0], exc)
            bad += 1
    return bad


# -- ingest worker processes -------------------------------------------------------------
_worker_conn: sqlite3.Connection | None = None

WorkerResult = tuple[int, int, list[int]]  # events, bad events, undecodable payload indexes


def worker_init(path: str, parent: int, log_config: tuple[str, str, str] | None = None) -> None:
    """Process-pool initializer: open this worker's connection (the schema exists).

    ``parent`` is the store's pid, passed in rather than read here: a worker still
    starting when the store is killed would otherwise take its new parent (init)
    for the store and never leave. ``log_config``: the store's logging set-up, so a
    (spawned) worker logs in the same format.
    """
    global _worker_conn
    if log_config is not None:
        from libs.common.logs import setup_logging

        setup_logging(*log_config)
    # The store process decides when workers end (pool shutdown after the batch in
    # progress); a Ctrl-C sent to the whole process group must not kill them mid-batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _worker_conn = connect(path, cache_kib=16384)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    gc.freeze()  # what start-up allocated is never garbage: keep it out of collections


def _exit_with_parent(parent: int) -> None:
    """End this worker when the store process is gone (killed with SIGKILL, say).

    The pool's task pipe never reports EOF to a worker (each holds both ends), so
    without this an orphan would wait forever. A transaction it had open is simply
    not committed, and the messages it was writing are redelivered.
    """
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def worker_ping() -> bool:
    """A no-op task: makes the pool start its processes (and fail early if it cannot)."""
    if _worker_conn is None:
        raise RepositoryError("ingest worker has no database connection")
    _worker_conn.execute("SELECT 1 FROM flows LIMIT 1").fetchall()
    return True


def worker_ingest(payloads: Sequence[bytes]) -> WorkerResult:
    """Decode FLOWS payloads and write their rows, in this worker process."""
    if _worker_conn is None:
        raise RepositoryError("ingest worker has no database connection")
    decoded = without_gc(decode_payloads, payloads)
    extra_bad = write_rows(_worker_conn, decoded.rows) if decoded.rows else 0
    return decoded.events, decoded.bad_events + extra_bad, decoded.undecodable


def worker_export(ids: list[str], max_bytes: int, render: str) -> Exported:
    """Read and render a share of an export page, in this worker process."""
    if _worker_conn is None:
        raise RepositoryError("ingest worker has no database connection")
    cur = _worker_conn.execute(sql.records_in(len(ids)), ids)
    try:
        return without_gc(render_rows, cur, max_bytes, render)
    finally:
        cur.close()
