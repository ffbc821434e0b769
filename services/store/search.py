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

import base64
from collections.abc import Callable
from typing import Any

import orjson

from libs.common.flowfilter import FlowView, predicate
from services.store import filtersql, sql
from services.store.query import Plan, encode_cursor
from services.store.repository import Listing
from services.store.rows import SUMMARY_COLUMNS, decode_body, summary

COUNT_BOUND = 10_000  # filtered_count is exact up to this many flows
SCAN_CHUNK = 500  # candidate rows fetched per query of a scan
VOCABULARY_MAX = 5000  # distinct values listed for a regex-over-values rewrite

Execute = Callable[[str, list[object]], list[tuple[Any, ...]]]
_N_SUMMARY = len(SUMMARY_COLUMNS)


def vocabulary(execute: Execute) -> filtersql.Vocabulary:
    """Distinct values of a column by index seeks (None when there are too many)."""

    def distinct(column: str) -> list[str] | None:
        source = "rhost" if column == "host" else column
        values: list[str] = []
        last = ""
        op = ">="
        while len(values) <= VOCABULARY_MAX:
            rows = execute(
                f"SELECT {source} FROM flows WHERE {source} {op} ? ORDER BY {source} LIMIT 1",
                [last],
            )
            if not rows:
                break
            last = rows[0][0]
            op = ">"
            values.append(last[::-1] if column == "host" else last)
        else:
            return None
        return values

    return distinct


def listing(execute: Execute, p: Plan, scan_limit: int, counted: bool = True) -> Listing | None:
    """The page for a plan with a filter, or None when the plan has none (the caller's
    plain listing applies); ``counted``: with the bounded ``filtered_count``."""
    if p.tree is None:
        return None
    compiled = filtersql.compile_tree(p.tree, vocabulary(execute))
    where, params = sql.conditions(p)
    cond = compiled.condition
    if cond.prunes:
        where = f"{where} AND ({cond.sql})" if where else f" WHERE ({cond.sql})"
        params = [*params, *cond.params]
    if compiled.exact:
        rows = execute(
            f"SELECT {sql.SUMMARY} FROM flows{where} ORDER BY id DESC LIMIT ?",
            [*params, p.limit + 1],
        )
        more = len(rows) > p.limit
        rows = rows[: p.limit]
        cursor = encode_cursor(rows[-1][0]) if more and rows else None
        flows = [summary(r) for r in rows]
        if not counted:
            return Listing(flows, cursor)
        count, exact = bounded_count(execute, where, params)
        return Listing(flows, cursor, count, exact)
    return _scan(execute, p, compiled, where, params, scan_limit)


def bounded_count(execute: Execute, where: str, params: list[object]) -> tuple[int, bool]:
    """How many rows match, counting at most ``COUNT_BOUND + 1`` (exact when below)."""
    rows = execute(
        f"SELECT count(*) FROM (SELECT 1 FROM flows{where} LIMIT ?) AS bounded",
        [*params, COUNT_BOUND + 1],
    )
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
    chunk_where = f"{where} AND id < ?" if where else " WHERE id < ?"
    statement = f"SELECT {sql.SUMMARY}{extra} FROM flows{chunk_where} ORDER BY id DESC LIMIT ?"
    first = f"SELECT {sql.SUMMARY}{extra} FROM flows{where} ORDER BY id DESC LIMIT ?"
    found: list[tuple[Any, ...]] = []
    scanned = 0
    last_id: str | None = None
    exhausted = False
    while len(found) <= p.limit:
        budget = scan_limit - scanned
        if budget <= 0:
            break
        size = min(SCAN_CHUNK, budget)
        if last_id is None:
            rows = execute(first, [*params, size])
        else:
            rows = execute(statement, [*params, last_id, size])
        for row in rows:
            scanned += 1
            last_id = row[0]
            if check(_view(row, compiled)):
                found.append(row)
                if len(found) > p.limit:
                    break
        if len(rows) < size and len(found) <= p.limit:
            exhausted = True
            break
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


def _view(row: tuple[Any, ...], compiled: filtersql.Compiled) -> FlowView:
    """The flow the filter rechecks: the stored document when the filter reads headers
    or bodies, else one rebuilt from the row's columns (no JSON decoding)."""
    s = dict(zip(SUMMARY_COLUMNS, row[:_N_SUMMARY], strict=True))
    authority = row[_N_SUMMARY]
    if compiled.needs_doc:
        doc: dict[str, Any] = orjson.loads(row[_N_SUMMARY + 1])
        if compiled.needs_bodies:
            for name, blob in (("request", row[_N_SUMMARY + 2]), ("response", row[_N_SUMMARY + 3])):
                part = doc.get(name)
                if isinstance(part, dict) and doc.get("state") != "active":
                    part["body_b64"] = base64.b64encode(decode_body(blob)).decode("ascii")
        return FlowView(doc)
    doc = {k: s[k] for k in ("kind", "scheme", "method", "host", "port", "path", "state")}
    doc["replica"] = s["replica"]
    doc["error"] = s["error"]
    if s["status"] is not None:
        doc["response"] = {"status": s["status"]}
    if authority is not None:
        doc["request"] = {"headers": [["Host", authority]]}
    return FlowView(doc)


def count(execute: Execute, p: Plan, scan_limit: int) -> tuple[int, bool]:
    """``count`` with a filter: exact SQL counts exactly; a rechecked filter counts the
    matches among at most ``scan_limit`` candidates (exact if they were all of them)."""
    assert p.tree is not None
    compiled = filtersql.compile_tree(p.tree, vocabulary(execute))
    where, params = sql.conditions(p)
    cond = compiled.condition
    if cond.prunes:
        where = f"{where} AND ({cond.sql})" if where else f" WHERE ({cond.sql})"
        params = [*params, *cond.params]
    if compiled.exact:
        rows = execute(f"SELECT count(*) FROM flows{where}", params)
        return int(rows[0][0]), True
    wide = Plan(**{**_fields(p), "limit": scan_limit})
    result = _scan(execute, wide, compiled, where, params, scan_limit)
    return len(result.flows), not result.partial and result.next_cursor is None


def _fields(p: Plan) -> dict[str, Any]:
    return {name: getattr(p, name) for name in p.__dataclass_fields__}
