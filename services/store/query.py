"""A ``FlowQuery`` turned into what SQL needs: id bounds and column conditions.

Flow ids start with 12 hex digits of epoch milliseconds, so time filters and the
page cursor are both bounds on ``id``, and every query is a range on the
primary key or on an ``(x, id)`` index read newest first. Validation that
``FlowQuery`` cannot express alone (glob shape, min <= max, cursor format) lives
here and raises ``QueryError`` naming the field.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass

from libs.common.flowfilter import FilterError, Node, parse
from libs.common.models import FlowQuery
from services.store.repository import QueryError
from services.store.rows import MAX_ID_LEN, reverse_host

ID_TIME_DIGITS = 12
MAX_TIME_S = ((1 << (4 * ID_TIME_DIGITS)) - 1) / 1000.0  # the last millisecond an id can hold


def time_bound(seconds: float) -> str:
    """The smallest id of a flow started in the millisecond of ``seconds``."""
    return f"{math.floor(seconds * 1000):0{ID_TIME_DIGITS}x}"


def encode_cursor(flow_id: str) -> str:
    """Opaque page cursor: the last id of a page, base64url without padding."""
    return base64.urlsafe_b64encode(flow_id.encode()).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> str:
    """The id a cursor stands for, or ``QueryError`` if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        flow_id = raw.decode("ascii")
    except (binascii.Error, ValueError):
        raise QueryError("cursor", "not a cursor returned by this store") from None
    if not 0 < len(flow_id) <= MAX_ID_LEN or not flow_id.isprintable():
        raise QueryError("cursor", "not a cursor returned by this store")
    return flow_id


def prefix_end(prefix: str) -> str:
    """The smallest string greater than every string starting with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


@dataclass(frozen=True, slots=True)
class Plan:
    """The normalised filters of one query.

    ``equal`` holds ``(column, value)`` pairs; ``rhost_prefix`` is set for a
    ``*.suffix`` host glob (the reversed suffix including its dot); the status
    range is inclusive; ids satisfy ``id_from <= id < id_below``.
    """

    equal: tuple[tuple[str, str | int], ...]
    rhost_prefix: str | None
    status_min: int | None
    status_max: int | None
    id_from: str | None
    id_below: str | None
    limit: int
    path_prefix: str | None = None
    tree: Node | None = None  # the ``q`` filter, parsed
    # ``(column, token)``: the space-delimited column holds the token (``rule``, ``tag``)
    tokens: tuple[tuple[str, str], ...] = ()
    decided: bool = False  # ``decision=any``: some rule matched


def _host(host: str) -> tuple[str | None, str | None]:
    """(exact reversed host, reversed glob prefix) for a host filter."""
    h = host.strip().lower()
    if not h:
        raise QueryError("host", "must not be empty")
    if "*" not in h:
        return reverse_host(h), None
    suffix = h[2:]
    if not h.startswith("*.") or not suffix or "*" in suffix or suffix.startswith("."):
        raise QueryError("host", "only an exact host or a leading '*.' glob (*.example.com)")
    return None, reverse_host("." + suffix)


def _time(field: str, value: float) -> str:
    if not math.isfinite(value) or not 0 <= value <= MAX_TIME_S:
        raise QueryError(field, "must be epoch seconds between 0 and the year 10889")
    return time_bound(value)


def plan(query: FlowQuery) -> Plan:
    """Validate and normalise ``query``, or raise ``QueryError``."""
    equal: list[tuple[str, str | int]] = []
    rhost_prefix = None
    if query.host is not None:
        exact, rhost_prefix = _host(query.host)
        if exact is not None:
            equal.append(("rhost", exact))
    if query.method is not None:
        if not query.method.strip():
            raise QueryError("method", "must not be empty")
        equal.append(("method", query.method.strip().upper()))
    if query.status is not None:
        equal.append(("status", query.status))
    if query.state is not None:
        equal.append(("state", query.state))
    if query.replica is not None:
        equal.append(("replica", query.replica))
    decided = query.decision == "any"
    if query.decision is not None and not decided:
        equal.append(("decision", query.decision))
    tokens = tuple(
        (column, value)
        for column, value in (("rules", query.rule), ("tags", query.tag))
        if value is not None
    )
    lo, hi = query.min_status, query.max_status
    if lo is not None and hi is not None and lo > hi:
        raise QueryError("min_status", f"must not exceed max_status ({lo} > {hi})")
    id_from = _time("since", query.since) if query.since is not None else None
    id_below = _time("until", query.until) if query.until is not None else None
    if query.since is not None and query.until is not None and query.since > query.until:
        raise QueryError("since", "must not be after until")
    if query.cursor is not None:
        after = decode_cursor(query.cursor)
        id_below = after if id_below is None else min(after, id_below)
    tree = None
    if query.q is not None:
        try:
            tree = parse(query.q)
        except FilterError as exc:
            raise QueryError("q", exc.message, code="BAD_FILTER", position=exc.position) from None
    return Plan(
        tuple(equal),
        rhost_prefix,
        lo,
        hi,
        id_from,
        id_below,
        query.limit,
        query.path,
        tree,
        tokens,
        decided,
    )
