"""Listing and counting with a ``q`` filter, over any DB-API connection (portable SQL).

The filter is compiled to SQL (``filtersql``) against the database's own vocabulary
(distinct methods, hosts, replicas, ... read by index seeks). An exact condition is
one query like any listing; an inexact one is a scan of candidates newest first, in
chunks, each rechecked with the filter evaluator the live stream uses, until the
page is full or ``scan_limit`` rows were looked at. Then the page is ``partial`` and
its cursor continues the scan: a body search over millions of flows costs a bounded
amount per call, and the client decides whether to go on.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import orjson

from libs.common.flowfilter import FlowView, predicate
from services.store import filtersql, sql
from services.store.query import Plan, encode_cursor, time_bound
from services.store.repository import Listing
from services.store.rows import KINDS, STATES, SUMMARY_COLUMNS, decode_body, summary

COUNT_BOUND = 10_000  # filtered_count is exact up to this many flows
SCAN_CHUNK = 500  # candidate rows fetched per query of a scan
VOCABULARY_MAX = 5000  # distinct values listed for a regex-over-values rewrite

Execute = sql.Execute
_N_SUMMARY = len(SUMMARY_COLUMNS)


FIXED_VOCABULARIES = {"state": tuple(sorted(STATES)), "kind": KINDS}


def _source(column: str) -> str:
    return "rhost" if column == "host" else column  # hosts are listed from their index


def _value(column: str, stored: str) -> str:
    return stored[::-1] if column == "host" else stored


def distinct_values(execute: Execute, column: str) -> list[str] | None:
    """Distinct values of a column by index seeks (None when there are too many); the
    columns ingest keeps to a fixed set need no query."""
    fixed = FIXED_VOCABULARIES.get(column)
    if fixed is not None:
        return list(fixed)
    source = _source(column)
    values: list[str] = []
    last = ""
    op = ">="
    while len(values) <= VOCABULARY_MAX:
        rows = execute(
            f"SELECT {source} FROM flows WHERE {source} {op} ? ORDER BY {source} LIMIT 1",
            [last],
        )
        if not rows:
            return values
        last = rows[0][0]
        op = ">"
        values.append(_value(column, last))
    return None


@dataclass
class _Known:
    values: set[str] | None  # None: more than VOCABULARY_MAX
    top: int  # the largest rowid looked at
    at: float  # when the values were last listed in full


class Vocabularies:
    """Distinct values of the columns a flow gets when it is inserted and keeps (method,
    host, Host-header authority, replica), kept current between queries by reading only
    the rows added since: rowids grow with insertion, and pruning deletes the oldest.

    Listing every host is a few hundred index seeks; reading the rows since the last
    query is usually a handful. A value whose flows were all pruned lingers until the
    next full listing (``REFRESH`` seconds): an ``IN`` with one name too many selects the
    same rows. Columns an update changes (``state``, ``kind``) are always listed afresh.
    """

    CACHED = frozenset({"method", "host", "authority", "replica"})
    REFRESH = 60.0
    MAX_NEW_ROWS = 20_000  # more rows added since than this: list the values afresh

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[str, _Known] = {}

    def bind(self, execute: Execute) -> filtersql.Vocabulary:
        return lambda column: self.values(execute, column)

    def values(self, execute: Execute, column: str) -> list[str] | None:
        if column not in self.CACHED:
            return distinct_values(execute, column)
        top = int(execute(MAX_ROWID, [])[0][0] or 0)
        now = time.monotonic()
        with self._lock:
            known = self._known.get(column)
        if (
            known is None
            or now - known.at > self.REFRESH
            or top < known.top
            or top - known.top > self.MAX_NEW_ROWS
        ):
            listed = distinct_values(execute, column)
            known = _Known(set(listed) if listed is not None else None, top, now)
        elif top > known.top and known.values is not None:
            source = _source(column)
            added = execute(
                f"SELECT DISTINCT {source} FROM flows WHERE rowid > ? AND rowid <= ? "
                f"AND {source} IS NOT NULL",
                [known.top, top],
            )
            values = known.values | {_value(column, r[0]) for r in added}
            known = _Known(values if len(values) <= VOCABULARY_MAX else None, top, known.at)
        with self._lock:
            self._known[column] = known
        return sorted(known.values) if known.values is not None else None


MAX_ROWID = "SELECT max(rowid) FROM flows"


def vocabulary(execute: Execute) -> filtersql.Vocabulary:
    """Distinct values of a column, listed afresh (see ``Vocabularies`` for the cache)."""
    return lambda column: distinct_values(execute, column)


def listing(
    execute: Execute,
    p: Plan,
    scan_limit: int,
    counted: bool = True,
    vocab: filtersql.Vocabulary | None = None,
) -> Listing | None:
    """The page for a plan with a filter, or None when the plan has none (the caller's
    plain listing applies); ``counted``: with the bounded ``filtered_count``; ``vocab``:
    the columns' distinct values (listed afresh when not given)."""
    if p.tree is None:
        return None
    compiled = filtersql.compile_tree(p.tree, vocab or vocabulary(execute))
    where, params = _where(p, compiled)
    if compiled.exact:
        rows = execute(
            f"SELECT {sql.SUMMARY} FROM flows{where} ORDER BY id DESC LIMIT ?",
            [*params, p.limit + 1],
        )
        return _page(execute, rows, p.limit, (where, params) if counted else None)
    return _scan(execute, p, compiled, where, params, scan_limit)


def _page(
    execute: Execute, rows: list[tuple[Any, ...]], limit: int, counted: sql.Where | None
) -> Listing:
    """A page from up to ``limit + 1`` selected rows (one more: there is a next page);
    ``counted``: the WHERE clause to give it a bounded ``filtered_count``."""
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = encode_cursor(rows[-1][0]) if more and rows else None
    flows = [summary(r) for r in rows]
    if counted is None:
        return Listing(flows, cursor)
    n, exact = bounded_count(execute, *counted, len(rows) + more)
    return Listing(flows, cursor, n, exact)


def answer(
    execute: Execute,
    p: Plan,
    scan_limit: int,
    counted: bool = True,
    vocab: filtersql.Vocabulary | None = None,
) -> Listing:
    """The page for any plan, on either backend; ``counted``: with its bounded
    ``filtered_count`` (a listing; an export page needs none)."""
    found = listing(execute, p, scan_limit, counted, vocab)
    if found is not None:
        return found
    statement, params = sql.page_statement(execute, p)
    rows = execute(statement, params) if statement else []
    return _page(execute, rows, p.limit, sql.conditions(p) if counted else None)


def count_all(
    execute: Execute, p: Plan, scan_limit: int, vocab: filtersql.Vocabulary | None = None
) -> int:
    """How many flows match a plan (a filter that SQL cannot decide alone: among at most
    ``scan_limit`` candidates)."""
    if p.tree is not None:
        return count(execute, p, scan_limit, vocab)[0]
    statement, params = sql.count(p)
    return int(execute(statement, params)[0][0])


def _where(p: Plan, compiled: filtersql.Compiled) -> tuple[str, list[object]]:
    """The plan's column conditions and the filter's, as one WHERE clause."""
    where, params = sql.conditions(p)
    cond = compiled.condition
    if cond.prunes:
        where = f"{where} AND ({cond.sql})" if where else f" WHERE ({cond.sql})"
        params = [*params, *cond.params]
    return where, params


BOUNDED_COUNT = "SELECT count(*) FROM (SELECT 1 FROM flows"  # how the statement starts


def bounded_count(
    execute: Execute, where: str, params: list[object], floor: int = 0
) -> tuple[int, bool]:
    """How many rows match, counting at most ``COUNT_BOUND + 1`` (exact when below).

    A backend may give up on the count (its ``execute`` answers no row: PostgreSQL past a
    time budget); then the answer is ``floor`` (the matches already seen on the page) as
    a lower bound, like a count past the bound.
    """
    rows = execute(f"{BOUNDED_COUNT}{where} LIMIT ?) AS bounded", [*params, COUNT_BOUND + 1])
    if not rows:
        return floor, False
    n = int(rows[0][0])
    return min(n, COUNT_BOUND), n <= COUNT_BOUND


def _scan(
    execute: Execute,
    p: Plan,
    compiled: filtersql.Compiled,
    where: str,
    params: list[object],
    scan_limit: int,
) -> Listing:
    check = predicate(p.tree) if p.tree is not None else None
    assert check is not None
    extra = ", authority"
    if compiled.needs_doc:
        extra += ", doc"
    if compiled.needs_bodies:
        extra += ", req_body, resp_body"
    head = f"SELECT {sql.SUMMARY}{extra} FROM flows{where}"
    joiner = " AND " if where else " WHERE "
    windows = scan_windows(p)
    k = 0
    found: list[tuple[Any, ...]] = []
    scanned = 0
    last_id: str | None = None
    exhausted = False
    while len(found) <= p.limit:
        budget = scan_limit - scanned
        if budget <= 0:
            break
        size = min(SCAN_CHUNK, budget)
        bounds, values = [], list(params)
        if last_id is not None:
            bounds.append("id < ?")
            values.append(last_id)
        if windows[k] is not None:
            bounds.append("id >= ?")
            values.append(windows[k])
        statement = head + (joiner + " AND ".join(bounds) if bounds else "")
        rows = execute(f"{statement} ORDER BY id DESC LIMIT ?", [*values, size])
        for row in rows:
            scanned += 1
            last_id = row[0]
            if check(_view(row, compiled)):
                found.append(row)
                if len(found) > p.limit:
                    break
        if len(rows) < size and len(found) <= p.limit:
            if windows[k] is None:
                exhausted = True
                break
            k += 1  # this window is done: the next, older one
    page = found[: p.limit]
    if len(found) > p.limit:
        cursor: str | None = encode_cursor(page[-1][0])
        partial = False
    elif exhausted or last_id is None:
        cursor, partial = None, False
    else:  # the budget ran out: continue after the last row looked at
        cursor, partial = encode_cursor(last_id), True
    return Listing(
        [summary(r[:_N_SUMMARY]) for r in page],
        cursor,
        filtered_count=len(found),
        count_exact=exhausted,
        scanned=scanned,
        partial=partial,
    )


SCAN_WINDOWS_S = (3600.0, 86_400.0, 7 * 86_400.0)  # how far back each window reaches


def scan_windows(p: Plan, now: float | None = None) -> list[str | None]:
    """Lower id bounds of the windows a scan reads in turn, newest first (None: no bound).

    A rechecked filter reads its candidates newest first, and a page usually fills from the
    newest flows; a window keeps the database from reading every candidate in the table
    first (PostgreSQL: a trigram bitmap gathers all its matches, in every partition, before
    the sort by id; with ``id >=`` it reads the newest partitions only). The order of the
    candidates, hence the page and its cursor, is the same with or without windows."""
    now = time.time() if now is None else now
    out: list[str | None] = []
    for seconds in SCAN_WINDOWS_S:
        bound = time_bound(max(0.0, now - seconds))
        if p.id_below is not None and bound >= p.id_below:
            continue  # every candidate is older: the window is empty
        if p.id_from is not None and bound <= p.id_from:
            break  # the plan's own lower bound is no wider
        out.append(bound)
    return [*out, None]


def _view(row: tuple[Any, ...], compiled: filtersql.Compiled) -> FlowView:
    """The flow the filter rechecks: the stored document when the filter reads headers
    or bodies, else one rebuilt from the row's columns (no JSON decoding)."""
    s = dict(zip(SUMMARY_COLUMNS, row[:_N_SUMMARY], strict=True))
    authority = row[_N_SUMMARY]
    if compiled.needs_doc:
        doc: dict[str, Any] = orjson.loads(row[_N_SUMMARY + 1])
        if not compiled.needs_bodies:
            return FlowView(doc)
        # bodies travel with the final event (not with one the store wrote for a gone replica)
        known = doc.get("state") != "active" and not doc.get("ended_by_store")
        blobs = {"request": row[_N_SUMMARY + 2], "response": row[_N_SUMMARY + 3]}

        def body(which: str) -> bytes | None:  # decompressed only if the filter asks
            return decode_body(blobs[which]) if known else None

        return FlowView(doc, body)
    doc = {k: s[k] for k in ("kind", "scheme", "method", "host", "port", "path", "state")}
    doc["replica"] = s["replica"]
    doc["error"] = s["error"]
    if s["status"] is not None:
        doc["response"] = {"status": s["status"]}
    if authority is not None:
        doc["request"] = {"headers": [["Host", authority]]}
    if s["rules"]:  # the ids as ``flowfilter.rule_ids`` listed them at ingest
        doc["policy"] = {"matched": [{"rule": r} for r in s["rules"].split()]}
    if s["tags"]:
        doc["tags"] = s["tags"].split()
    return FlowView(doc)


def count(
    execute: Execute, p: Plan, scan_limit: int, vocab: filtersql.Vocabulary | None = None
) -> tuple[int, bool]:
    """``count`` with a filter: exact SQL counts exactly; a rechecked filter counts the
    matches among at most ``scan_limit`` candidates (exact if they were all of them)."""
    assert p.tree is not None
    compiled = filtersql.compile_tree(p.tree, vocab or vocabulary(execute))
    where, params = _where(p, compiled)
    if compiled.exact:
        rows = execute(f"SELECT count(*) FROM flows{where}", params)
        return int(rows[0][0]), True
    wide = replace(p, limit=scan_limit)
    result = _scan(execute, wide, compiled, where, params, scan_limit)
    return len(result.flows), not result.partial and result.next_cursor is None
