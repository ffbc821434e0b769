"""The PostgreSQL schema: versioned migrations, and the time partitions of ``flows``.

Migrations are numbered and applied in order at start, each in the transaction that
records it in ``schema_migrations``, under a transaction-level advisory lock: stores
starting at once queue on the lock, and the second finds the work done. A database
whose newest migration is past what this code knows belongs to a newer store and is
refused (running old code on it could write what the new schema forbids).

``flows`` is partitioned by range of ``id``: an id starts with 12 hex digits of epoch
milliseconds (``query.time_bound``), so one day of flows is one id range and
retention by age drops whole partitions instead of deleting rows. Partitions are made
ahead of time (today and the next days); an id outside every partition (a clock far
off, a publisher's odd id) lands in ``flows_default``, whose rows are moved into a
day's partition if one is made for them later.

Column types follow the SQLite schema so that both backends answer every query alike:
``text COLLATE "C"`` (byte order, as SQLite compares), ``bigint`` for every integer,
``bytea`` for the stored document and the (zlib-compressed) bodies. The bodies are kept
out of line (``STORAGE EXTERNAL``, no second compression; ``toast_tuple_target`` small),
the document compressed inline: the hot row a listing reads stays a few hundred bytes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql as pgsql

from services.store.filtersql import URL_SEARCH
from services.store.query import time_bound

log = logging.getLogger("proxyfleet.store.postgres")

MIGRATE_LOCK = 0x70726F78_79666C74 & 0x7FFFFFFFFFFFFFFF  # advisory lock key ("proxyflt")
PARTITION_LOCK = MIGRATE_LOCK - 1
RETENTION_LOCK = MIGRATE_LOCK - 2  # held by the one store running a retention pass
PARTITIONS_AHEAD = 2  # days of partitions made beyond today
TOAST_TARGET = 256  # bytes: rows larger than this move the bodies out of line

_TEXT = 'text COLLATE "C"'

FLOWS = f"""
CREATE TABLE flows (
    id {_TEXT} NOT NULL,
    replica {_TEXT},
    state {_TEXT} NOT NULL,
    kind {_TEXT},
    scheme {_TEXT},
    method {_TEXT},
    host {_TEXT},
    rhost {_TEXT},
    port bigint,
    path {_TEXT},
    status bigint,
    started_at double precision,
    ended_at double precision,
    req_size bigint,
    resp_size bigint,
    req_truncated integer NOT NULL DEFAULT 0,
    resp_truncated integer NOT NULL DEFAULT 0,
    error {_TEXT},
    doc bytea NOT NULL,
    req_body bytea,
    resp_body bytea,
    presumed integer NOT NULL DEFAULT 0,
    authority {_TEXT},
    rules {_TEXT},
    tags {_TEXT},
    decision {_TEXT},
    replay_of {_TEXT},
    policy {_TEXT},
    intercept {_TEXT},
    PRIMARY KEY (id)
) PARTITION BY RANGE (id)
"""

# The same indexes as SQLite's (``sqlite.SCHEMA`` / ``LATE_INDEXES``), made on the parent
# so that every partition gets them.
BTREE_INDEXES = """
CREATE INDEX flows_rhost ON flows (rhost, id);
CREATE INDEX flows_method ON flows (method, id);
CREATE INDEX flows_status ON flows (status, id);
CREATE INDEX flows_state ON flows (state, id);
CREATE INDEX flows_replica ON flows (replica, id);
CREATE INDEX flows_authority ON flows (authority, id) WHERE authority IS NOT NULL;
CREATE INDEX flows_rhost_status_id ON flows (rhost, status, id, kind);
CREATE INDEX flows_status_method_id ON flows (status, method, id, kind);
CREATE INDEX flows_decided ON flows (id) WHERE decision IS NOT NULL;
CREATE INDEX flows_decision ON flows (decision, id) WHERE decision IS NOT NULL;
CREATE INDEX flows_ruled ON flows (id) WHERE rules IS NOT NULL;
CREATE INDEX flows_tagged ON flows (id) WHERE tags IS NOT NULL
"""

# Substring and regex search (``~u``, and ``~d`` past the host vocabulary): a trigram index
# on exactly the expression ``filtersql`` compares with LIKE, so that the planner can use
# it. A larger pending list than the default: GIN insertion is most of an ingest's cost.
TRGM_INDEXES = [
    f"CREATE INDEX flows_url_trgm ON flows USING gin (lower({URL_SEARCH}) gin_trgm_ops) "
    "WITH (gin_pending_list_limit = 16384)",
]

# The distinct values of the columns a flow keeps once inserted (``filtersql`` runs a
# regex over them for ``~m``, ``~d``, ``~replica``): written in the ingest transaction, so
# never behind the flows. A value whose flows were all pruned stays: an ``IN`` with one
# name too many selects the same rows.
VALUES_TABLE = f"""
CREATE TABLE flow_values (
    col {_TEXT} NOT NULL,
    value {_TEXT} NOT NULL,
    PRIMARY KEY (col, value)
)
"""

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "flows, partitioned by day of id; meta; the value vocabulary; btree indexes",
        [
            FLOWS,
            "ALTER TABLE flows ALTER COLUMN doc SET STORAGE MAIN",
            "ALTER TABLE flows ALTER COLUMN req_body SET STORAGE EXTERNAL",
            "ALTER TABLE flows ALTER COLUMN resp_body SET STORAGE EXTERNAL",
            "CREATE TABLE flows_default PARTITION OF flows DEFAULT",
            "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL)",
            VALUES_TABLE,
            *[s.strip() for s in BTREE_INDEXES.split(";")],
        ],
    ),
    (
        2,
        "a pg_trgm index for URL and host substring search",
        ["CREATE EXTENSION IF NOT EXISTS pg_trgm", *TRGM_INDEXES],
    ),
    (
        3,
        "timings: a flow's phase points, for a listing's waterfall (rows.PHASE_POINTS)",
        [f"ALTER TABLE flows ADD COLUMN timings {_TEXT}"],
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


class SchemaError(Exception):
    """The database's schema cannot be used by this store (newer, or a migration failed)."""


def migrate(conn: psycopg.Connection) -> int:
    """Bring the schema to ``SCHEMA_VERSION``; return the version found before.

    Safe when several stores run it at once (the advisory lock serialises them).
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version integer PRIMARY KEY, description text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
        found = int(row[0]) if row and row[0] is not None else 0
        if found > SCHEMA_VERSION:
            raise SchemaError(
                f"database schema version {found} is newer than this store knows "
                f"({SCHEMA_VERSION}): upgrade the store"
            )
        for version, description, statements in MIGRATIONS:
            if version <= found:
                continue
            for statement in statements:
                try:
                    conn.execute(statement)
                except psycopg.Error as exc:
                    raise SchemaError(
                        f"migration {version} ({description}) failed: {_first_line(exc)}"
                    ) from None
            conn.execute(
                "INSERT INTO schema_migrations (version, description) VALUES (%s, %s)",
                (version, description),
            )
            log.info("schema migration %d applied: %s", version, description)
    return found


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@dataclass(frozen=True, slots=True)
class Partition:
    """One day of flows: ids in ``[low, high)``."""

    name: str
    low: str
    high: str


def day_partition(day: datetime) -> Partition:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    end = start + timedelta(days=1)
    return Partition(
        f"flows_p{start:%Y%m%d}", time_bound(start.timestamp()), time_bound(end.timestamp())
    )


def wanted_partitions(now: float, ahead: int = PARTITIONS_AHEAD) -> list[Partition]:
    today = datetime.fromtimestamp(now, UTC)
    return [day_partition(today + timedelta(days=d)) for d in range(ahead + 1)]


def existing_partitions(conn: psycopg.Connection) -> list[Partition]:
    """The day partitions of ``flows`` (not the default one), oldest first."""
    rows = conn.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'flows'::regclass"
    ).fetchall()
    out = []
    for name, bound in rows:
        # FOR VALUES FROM ('019a...') TO ('019b...')
        # no bound: a partition another store is detaching right now
        if bound is None or not str(name).startswith("flows_p") or "FROM ('" not in bound:
            continue
        low = bound.split("FROM ('", 1)[1].split("'", 1)[0]
        high = bound.split("TO ('", 1)[1].split("'", 1)[0]
        out.append(Partition(str(name), low, high))
    return sorted(out, key=lambda p: p.low)


def ensure_partitions(conn: psycopg.Connection, now: float | None = None) -> list[str]:
    """Make the partitions of today and the next days that are missing; return their names."""
    made: list[str] = []
    have = {p.name for p in existing_partitions(conn)}
    for part in wanted_partitions(time.time() if now is None else now):
        if part.name not in have:
            create_partition(conn, part)
            made.append(part.name)
    return made


def create_partition(conn: psycopg.Connection, part: Partition) -> None:
    """Make one day partition, moving in any rows the default partition holds for it."""
    name = pgsql.Identifier(part.name)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
        exists = conn.execute("SELECT to_regclass(%s)", (part.name,)).fetchone()
        if exists and exists[0] is not None:
            return  # another store made it meanwhile
        # the default partition is locked first: no row for the new range can arrive
        # there between the move and the attach
        conn.execute("LOCK TABLE flows_default IN SHARE ROW EXCLUSIVE MODE")
        conn.execute(
            pgsql.SQL(
                "CREATE TABLE {} (LIKE flows INCLUDING DEFAULTS INCLUDING STORAGE "
                "INCLUDING COMPRESSION) WITH (toast_tuple_target = {})"
            ).format(name, pgsql.Literal(TOAST_TARGET))
        )
        moved = conn.execute(
            pgsql.SQL(
                "WITH moved AS (DELETE FROM flows_default WHERE id >= %s AND id < %s "
                "RETURNING *) INSERT INTO {} SELECT * FROM moved"
            ).format(name),
            (part.low, part.high),
        ).rowcount
        conn.execute(
            pgsql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK (id >= {} AND id < {})").format(
                name,
                pgsql.Identifier(part.name + "_range"),
                pgsql.Literal(part.low),
                pgsql.Literal(part.high),
            )
        )
        conn.execute(
            pgsql.SQL("ALTER TABLE flows ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
                name, pgsql.Literal(part.low), pgsql.Literal(part.high)
            )
        )
    log.info("partition %s made%s", part.name, f" ({moved} flows moved in)" if moved else "")


def drop_partition(conn: psycopg.Connection, part: Partition) -> int:
    """Drop one partition whole; return how many flows it held."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK,))
        exists = conn.execute("SELECT to_regclass(%s)", (part.name,)).fetchone()
        if not exists or exists[0] is None:
            return 0  # another store dropped it meanwhile
        row = conn.execute(
            pgsql.SQL("SELECT count(*) FROM {}").format(pgsql.Identifier(part.name))
        ).fetchone()
        n = int(row[0]) if row else 0
        conn.execute(
            pgsql.SQL("ALTER TABLE flows DETACH PARTITION {}").format(pgsql.Identifier(part.name))
        )
        conn.execute(pgsql.SQL("DROP TABLE {}").format(pgsql.Identifier(part.name)))
    log.info("partition %s dropped (%d flows)", part.name, n)
    return n
