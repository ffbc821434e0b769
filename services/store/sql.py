"""The store's SQL text, kept portable between SQLite and PostgreSQL.

Plain SQL only: ``INSERT ... ON CONFLICT (id) DO UPDATE ... WHERE`` for the
merge, ``DELETE ... WHERE id IN (SELECT ... LIMIT n)`` for chunked pruning,
``UNION ALL`` of per-value sub-selects for set-valued filters. Placeholders are
``?``; a backend with another paramstyle rewrites them. (PostgreSQL must give
``id`` and ``rhost`` the "C" collation so that string ranges match SQLite's.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.store.query import Plan, prefix_end
from services.store.rows import COLUMNS, SUMMARY_COLUMNS

# Runs one statement and returns its rows (a reader thread's connection, either backend).
Execute = Callable[[str, list[object]], list[tuple[Any, ...]]]
Statement = tuple[str | None, list[object]]
SPLIT_MAX_VALUES = 100  # more distinct values than this: let the planner range-scan

_UPDATED = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c != "id")

# Merge rule, idempotent and order-independent: insert if absent; replace only an
# active row, and only with a final event. A started event never overwrites anything.
# A row the store itself ended (``presumed = 1``: its replica was gone, see
# ``END_ACTIVE``) counts as active for a final event: the replica's own account of the
# flow, arriving late (redelivered, or the replica was not gone after all), wins.
UPSERT = (
    f"INSERT INTO flows ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)}) "
    f"ON CONFLICT (id) DO UPDATE SET {_UPDATED}, presumed = 0 "
    "WHERE (flows.state = 'active' OR flows.presumed = 1) AND excluded.state <> 'active'"
)

# Ending the open flows of a replica that is gone (one transaction: select, then update
# each still-active row). ``state = 'active'`` again in the update: a final event
# committed in between wins.
ACTIVE_OF_REPLICA = "SELECT id, doc FROM flows WHERE state = 'active' AND replica = ?"
ACTIVE_OF_REPLICA_BEFORE = ACTIVE_OF_REPLICA + " AND started_at < ?"
END_ACTIVE = (
    "UPDATE flows SET state = 'error', error = ?, ended_at = ?, doc = ?, presumed = 1 "
    "WHERE id = ? AND state = 'active'"
)

# The database's identity (one random id, made when the database is created): how a store
# tells "another replica on my database" from "another database" (``services.store.claim``).
META_INSERT = "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING"
META_GET = "SELECT value FROM meta WHERE key = ?"

SUMMARY = ", ".join(SUMMARY_COLUMNS)
GET = "SELECT doc, req_body, resp_body FROM flows WHERE id = ?"
DELETE_BEFORE = (
    "DELETE FROM flows WHERE id IN (SELECT id FROM flows WHERE id < ? ORDER BY id LIMIT ?)"
)
DELETE_UPTO = (
    "DELETE FROM flows WHERE id IN (SELECT id FROM flows WHERE id <= ? ORDER BY id LIMIT ?)"
)
NTH_NEWEST = "SELECT id FROM flows ORDER BY id DESC LIMIT 1 OFFSET ?"

Where = tuple[str, list[object]]


def conditions(plan: Plan, pinned: tuple[str, object] | None = None) -> Where:
    """WHERE clause and parameters for ``plan``.

    ``pinned`` replaces the range filter on one column by an equality (one branch
    of a split query).
    """
    clauses: list[str] = []
    params: list[object] = []
    for column, value in plan.equal:
        clauses.append(f"{column} = ?")
        params.append(value)
    if pinned is not None:
        clauses.append(f"{pinned[0]} = ?")
        params.append(pinned[1])
    if plan.rhost_prefix is not None and (pinned is None or pinned[0] != "rhost"):
        clauses.append("rhost >= ? AND rhost < ?")
        params += [plan.rhost_prefix, prefix_end(plan.rhost_prefix)]
    if pinned is None or pinned[0] != "status":
        if plan.status_min is not None:
            clauses.append("status >= ?")
            params.append(plan.status_min)
        if plan.status_max is not None:
            clauses.append("status <= ?")
            params.append(plan.status_max)
    if plan.path_prefix is not None:
        clauses.append("path >= ? AND path < ?")
        params += [plan.path_prefix, prefix_end(plan.path_prefix)]
    for column, token in plan.tokens:
        # NOT NULL spelled out: the partial ``(id) WHERE <column> IS NOT NULL`` index applies
        clauses.append(f"{column} IS NOT NULL AND {token_like(column)}")
        params.append(token_pattern(token))
    if plan.decided:
        clauses.append("decision IS NOT NULL")
    if plan.id_from is not None:
        clauses.append("id >= ?")
        params.append(plan.id_from)
    if plan.id_below is not None:
        clauses.append("id < ?")
        params.append(plan.id_below)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def token_like(column: str) -> str:
    """The condition that a space-delimited column (``rules``, ``tags``) holds a token
    (``token_pattern``; ASCII case folded on both sides, as the filter language folds it)."""
    return f"lower({column}) LIKE ? ESCAPE '\\'"


def token_pattern(token: str) -> str:
    escaped = token.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"% {escaped} %"


def count(plan: Plan) -> Where:
    where, params = conditions(plan)
    return f"SELECT count(*) FROM flows{where}", params


def page(plan: Plan, limit: int) -> Where:
    """One page, newest first, when no filter needs splitting."""
    where, params = conditions(plan)
    return f"SELECT {SUMMARY} FROM flows{where} ORDER BY id DESC LIMIT ?", [*params, limit]


def split_page(plan: Plan, column: str, values: list[object], limit: int) -> Where:
    """One page for a set-valued filter, as a merge of one index range per value.

    ``rhost`` in a glob's range, or ``status`` between bounds, read through the
    ``(column, id)`` index would need a sort of every match before the first row
    comes out; ``column = v`` for each value reads at most ``limit`` entries per
    value, already newest first.
    """
    parts: list[str] = []
    params: list[object] = []
    for i, value in enumerate(values):
        where, p = conditions(plan, pinned=(column, value))
        parts.append(
            f"SELECT id FROM (SELECT id FROM flows{where} ORDER BY id DESC LIMIT ?) AS s{i}"
        )
        params += [*p, limit]
    union = " UNION ALL ".join(parts)
    sql = (
        f"SELECT {SUMMARY} FROM flows WHERE id IN "
        f"({union} ORDER BY id DESC LIMIT ?) ORDER BY id DESC"
    )
    return sql, [*params, limit]


Split = tuple[str, object, object, bool]


def split_candidates(plan: Plan) -> list[Split]:
    """Range filters that could be split per value: (column, low, high, high inclusive)."""
    out: list[Split] = []
    if plan.rhost_prefix is not None:
        out.append(("rhost", plan.rhost_prefix, prefix_end(plan.rhost_prefix), False))
    if (plan.status_min is not None or plan.status_max is not None) and not any(
        c == "status" for c, _ in plan.equal
    ):
        lo = plan.status_min if plan.status_min is not None else 0
        hi = plan.status_max if plan.status_max is not None else 999
        out.append(("status", lo, hi, True))
    return out


def records_in(n: int) -> str:
    """The stored documents and bodies of ``n`` flows by id, newest first (an export page:
    the ids a listing selected, read by primary key)."""
    marks = ", ".join("?" for _ in range(n))
    return f"SELECT id, doc, req_body, resp_body FROM flows WHERE id IN ({marks}) ORDER BY id DESC"


def page_statement(execute: Execute, p: Plan) -> Statement:
    """The page query of a plan without ``q``; a range filter with few distinct values is
    split per value (``split_page``).

    With both a host glob and a status range, the one with fewer distinct values is
    split (the other stays a filter); with too many values for either, the planner gets
    the plain range query. ``(None, [])``: no row can match.
    """
    best: tuple[str, list[object]] | None = None
    for column, low, high, inclusive in split_candidates(p):
        values = distinct_in_range(execute, column, low, high, inclusive)
        if values is not None and (best is None or len(values) < len(best[1])):
            best = (column, values)
    if best is None:
        return page(p, p.limit + 1)
    column, values = best
    if not values:
        return None, []
    return split_page(p, column, values, p.limit + 1)


def distinct_in_range(
    execute: Execute, column: str, low: object, high: object, inclusive: bool
) -> list[object] | None:
    """The distinct values of ``column`` in a range, by index seeks; None if too many.

    One statement (a recursive seek from value to value): on SQLite each seek is a few
    microseconds in-process, on PostgreSQL a round trip each would cost a millisecond.
    """
    high_op = "<=" if inclusive else "<"
    seek = f"SELECT {column} FROM flows WHERE {column} {{op}} {{low}} AND {column} {high_op} ? "
    seek += f"ORDER BY {column} LIMIT 1"
    statement = (
        "WITH RECURSIVE seen(x, n) AS ("
        f"SELECT ({seek.format(op='>=', low='?')}), 1 "
        f"UNION ALL SELECT ({seek.format(op='>', low='seen.x')}), n + 1 FROM seen "
        "WHERE seen.x IS NOT NULL AND n <= ?) "
        "SELECT x FROM seen WHERE x IS NOT NULL"
    )
    rows = execute(statement, [low, high, high, SPLIT_MAX_VALUES])
    values = [r[0] for r in rows]
    return values if len(values) <= SPLIT_MAX_VALUES else None
