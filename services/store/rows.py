"""Flow events <-> rows of the ``flows`` table, shared by every SQL backend.

This is the ingest hot path (tens of thousands of events a second), so it is
plain tuple building with no models. It is also the trust boundary: events come
from any publisher on ``fleet.flows.>``, and one value the driver cannot bind
would fail a whole batch forever, so every column is coerced to its type here
and an event without a usable id or state is rejected (``BadEvent``).
"""

from __future__ import annotations

import binascii
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from libs.common.flowfilter import (
    DEFAULT_PORTS,
    authority_parts,
    decision,
    intercept_summary,
    policy_summary,
    replay_of,
    rule_ids,
    tag_list,
    url_authority,
)

FINAL_STATES = frozenset({"completed", "error", "killed"})
STATES = FINAL_STATES | {"active"}
# The kinds a proxy records; another publisher's kind is stored as none (column and
# document alike), so that the filter language's ~kind reads one fixed vocabulary.
KINDS = ("http", "tunnel", "websocket")
MAX_ID_LEN = 64
BODY_COMPRESSION_LEVEL = 1  # zlib: ~3x on text bodies at a few microseconds per KiB

# Table columns in insert order. ``rhost`` is the host reversed (suffix globs become
# prefix ranges on an index); bodies are zlib-compressed, NULL when empty; ``authority``
# is the URL authority the Host header gives (``host[:port]``, as ``~u`` sees the URL),
# only where it differs from the request's own (see ``services.store.filtersql``).
# The policy's account of the flow (schema 4): ``rules`` and ``tags`` are the matched rule
# ids and the tags as ``~rule``/``~tag`` see them (``flowfilter.rule_ids``/``tag_list``),
# space-delimited with a space at each end (`` a b ``: ``LIKE '% a %'`` finds one exactly),
# NULL when none; ``decision`` is ``flowfilter.decision`` (block, respond, allow,
# intercept, modify; NULL: no rule matched); ``policy`` and ``intercept`` are compact JSON
# of the decision (``{revision, matched}``) and of the intercept outcome, bounded, for the
# listing and the decision log without reading ``doc``; ``replay_of`` the replayed flow.
COLUMNS = (
    "id",
    "replica",
    "state",
    "kind",
    "scheme",
    "method",
    "host",
    "rhost",
    "port",
    "path",
    "status",
    "started_at",
    "ended_at",
    "req_size",
    "resp_size",
    "req_truncated",
    "resp_truncated",
    "error",
    "doc",
    "req_body",
    "resp_body",
    "authority",
    "rules",
    "tags",
    "decision",
    "replay_of",
    "policy",
    "intercept",
    "timings",
)
# ``timings`` (schema 5): where a flow's time went, for a listing's waterfall without
# reading ``doc``: the points of ``PHASE_POINTS`` as whole microseconds after
# ``started_at``, a compact JSON array (null for a point not measured), NULL when none was.
PHASE_POINTS = ("dns", "connect", "tls", "request_sent", "first_byte")
DAY_S = 86_400.0
MAX_PHASE_S = 30 * DAY_S  # a point further from the start than this is not a point

# What a listing returns per flow (no headers, no bodies), in SELECT order.
SUMMARY_COLUMNS = tuple(
    c for c in COLUMNS if c not in ("rhost", "doc", "req_body", "resp_body", "authority")
)

Row = tuple[Any, ...]
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 63) - 1


class BadEvent(ValueError):
    """An event the store cannot keep (no id, unknown state, wrong shapes)."""


def _str(v: Any) -> str | None:
    return v if type(v) is str else None


def _int(v: Any) -> int | None:
    return v if type(v) is int and _INT_MIN <= v <= _INT_MAX else None


def _num(v: Any) -> float | None:
    return float(v) if type(v) is float or type(v) is int else None


def _take_body(part: dict[str, Any]) -> bytes | None:
    """Remove ``body_b64`` from a request/response part; return the body compressed."""
    b64 = part.pop("body_b64", None)
    if not b64:
        return None
    if type(b64) is not str:
        raise BadEvent("body_b64 must be a string")
    try:
        raw = _a2b_base64(b64)
    except (binascii.Error, ValueError):
        raise BadEvent("body_b64 is not base64") from None
    return _compress(raw, BODY_COMPRESSION_LEVEL) if raw else None


_a2b_base64 = binascii.a2b_base64
_compress = zlib.compress
_dumps = orjson.dumps
_loads = orjson.loads


def reverse_host(host: str) -> str:
    """``a.example.com`` -> ``moc.elpmaxe.a``: subdomains of a name share a prefix."""
    return host.lower()[::-1]


def event_row(event: Mapping[str, Any], owned: bool = False) -> Row:
    """The table row for one event (columns in ``COLUMNS`` order), or ``BadEvent``.

    ``owned``: the event was decoded for this call alone, so its ``body_b64``
    fields are removed in place instead of on copies (the hot path).
    """
    if type(event) is not dict:
        raise BadEvent("event is not an object")
    get = event.get
    flow_id = get("id")
    if type(flow_id) is not str or not 0 < len(flow_id) <= MAX_ID_LEN:
        raise BadEvent("id missing or not a short string")
    if not owned:
        event = dict(event)
    state = get("state")
    if state not in STATES:
        if get("event") != "started":
            raise BadEvent(f"flow {flow_id}: unknown state {state!r}")
        state = event["state"] = "active"
    request = get("request")
    authority = None
    if type(request) is dict:
        if not owned:
            request = event["request"] = dict(request)
        req_body = _take_body(request)
        req_size, req_truncated = request.get("size"), request.get("truncated")
        authority = request.get("headers")  # the Host header, resolved below
    elif request is None:
        req_body = req_size = req_truncated = None
    else:
        raise BadEvent(f"flow {flow_id}: request is not an object")
    response = get("response")
    if type(response) is dict:
        if not owned:
            response = event["response"] = dict(response)
        resp_body = _take_body(response)
        status, resp_size = response.get("status"), response.get("size")
        resp_truncated = response.get("truncated")
    elif response is None:
        resp_body = status = resp_size = resp_truncated = None
    else:
        raise BadEvent(f"flow {flow_id}: response is not an object")
    timings = get("timings")
    phases = None
    if type(timings) is dict:
        started_at, ended_at = _num(timings.get("start")), _num(timings.get("end"))
        if started_at is not None:
            phases = _offsets(timings, started_at)
    elif timings is None:
        started_at = ended_at = None
    else:
        raise BadEvent(f"flow {flow_id}: timings is not an object")
    kind = get("kind")
    if kind is not None and kind not in KINDS:
        kind = event["kind"] = None
    try:
        doc = _dumps(event)
    except TypeError as exc:  # orjson.JSONEncodeError: values JSON cannot carry
        raise BadEvent(f"flow {flow_id}: {exc}") from None
    host = get("host")
    if type(host) is not str:
        host = None
    scheme = _str(get("scheme"))
    port = _int(get("port"))
    authority = _authority(authority, scheme or "http", host, port)
    method = get("method")
    rules, tags, decided, policy, intercept = _policy(event)
    return (
        flow_id,
        _str(get("replica")),
        state,
        kind,
        scheme,
        method.upper() if type(method) is str else None,
        host,
        host.lower()[::-1] if host is not None else None,
        port,
        _str(get("path")),
        _int(status) or None,
        started_at,
        ended_at,
        _int(req_size),
        _int(resp_size),
        1 if req_truncated else 0,
        1 if resp_truncated else 0,
        _str(get("error")),
        doc,
        req_body,
        resp_body,
        authority,
        rules,
        tags,
        decided,
        replay_of(event),
        policy,
        intercept,
        phases,
    )


def _offsets(timings: dict[str, Any], start: float) -> str | None:
    """``PHASE_POINTS`` as whole microseconds after ``start`` (the ``timings`` column).
    On the ingest path: integers, no rounding (half the cost of ``round``)."""
    get = timings.get
    out: list[int | None] = []
    measured = False
    for name in PHASE_POINTS:
        at = get(name)
        if (type(at) is float or type(at) is int) and -DAY_S <= at - start <= MAX_PHASE_S:
            out.append(int((at - start) * 1e6))
            measured = True
        else:  # absent, not a number, or nowhere near the flow (1e308 would overflow)
            out.append(None)
    return _dumps(out).decode() if measured else None


def _points(offsets: str | None, start: float | None, end: float | None) -> dict[str, Any] | None:
    """The ``timings`` of a listing entry (epoch seconds, as the flow's own) from the
    column; None when nothing but start and end is known."""
    if offsets is None or start is None:
        return None
    try:
        values = _loads(offsets)
    except ValueError:
        return None
    if type(values) is not list or len(values) != len(PHASE_POINTS):
        return None
    out: dict[str, Any] = {"start": start}
    for name, us in zip(PHASE_POINTS, values, strict=True):
        out[name] = start + us / 1e6 if type(us) is int else None
    out["end"] = end
    return out


def _delimited(values: list[str]) -> str | None:
    return " " + " ".join(values) + " " if values else None


def _json(value: dict[str, Any] | None) -> str | None:
    return _dumps(value).decode() if value is not None else None


_NO_POLICY: tuple[None, None, None, None, None] = (None, None, None, None, None)


def _policy(
    event: dict[str, Any],
) -> tuple[str | None, str | None, str | None, str | None, str | None]:
    """``rules``, ``tags``, ``decision``, ``policy`` and ``intercept`` of an event: plain,
    bounded values whatever the event holds (a wrong type is left out, a long one cut)."""
    get = event.get
    if get("policy") is None and not get("tags") and get("intercept") is None:
        return _NO_POLICY  # most flows: no rule matched (the ingest hot path)
    return (
        _delimited(rule_ids(event)),
        _delimited(tag_list(event)),
        decision(event),
        _json(policy_summary(event)),
        _json(intercept_summary(event)),
    )


def _authority(headers: Any, scheme: str, host: str | None, port: int | None) -> str | None:
    """The URL authority the first Host header gives (``host[:port]``, default port left
    out, case kept), or None when there is none or it says what the request says."""
    if type(headers) is not list:
        return None
    for pair in headers:
        if type(pair) is list and len(pair) == 2 and type(pair[0]) is str:
            if pair[0].lower() == "host" and type(pair[1]) is str:
                h, p = authority_parts(pair[1])
                if not h:
                    return None
                shown = url_authority(scheme, h, p if p is not None else DEFAULT_PORTS.get(scheme))
                if host is not None and shown == url_authority(scheme, host, port):
                    return None
                return shown
    return None


def merge_into(rows: dict[str, Row], row: Row) -> None:
    """Apply the merge rule within one batch, so each flow is written once per transaction.

    Same outcome as writing the events one after the other: the first final event
    of a flow wins, a ``started`` event only counts when nothing else came.
    """
    current = rows.get(row[0])
    if current is None or (current[2] == "active" and row[2] != "active"):
        rows[row[0]] = row


@dataclass(slots=True)
class Decoded:
    """A batch ready to write: one row per flow, plus what could not be used."""

    rows: list[Row]
    events: int  # events found in the decodable payloads
    bad_events: int  # of those, malformed and skipped
    undecodable: list[int]  # indexes of payloads that are not a JSON array


def rows_of(events: Iterable[Any], owned: bool = False) -> Decoded:
    """Rows for already-decoded events (malformed ones counted and skipped).

    ``owned``: the events may be modified (they were decoded for this call).
    """
    merged: dict[str, Row] = {}
    count = bad = 0
    for event in events:
        count += 1
        try:
            merge_into(merged, event_row(event, owned))
        except BadEvent:
            bad += 1
    return Decoded(list(merged.values()), count, bad, [])


def split_payloads(payloads: Sequence[bytes]) -> tuple[list[Any], list[int]]:
    """The events of FLOWS message payloads (each a JSON array of events), and the
    indexes of the payloads that are not one."""
    events: list[Any] = []
    undecodable: list[int] = []
    for i, payload in enumerate(payloads):
        try:
            batch = orjson.loads(payload)
        except orjson.JSONDecodeError:
            undecodable.append(i)
            continue
        if type(batch) is not list:
            undecodable.append(i)
            continue
        events += batch
    return events, undecodable


def decode_payloads(payloads: Sequence[bytes]) -> Decoded:
    """Rows for FLOWS message payloads, one per flow."""
    events, undecodable = split_payloads(payloads)
    decoded = rows_of(events, owned=True)
    decoded.undecodable = undecodable
    return decoded


def summary(row: Row) -> dict[str, Any]:
    """A listing entry from a row selected as ``SUMMARY_COLUMNS``."""
    (
        flow_id,
        replica,
        state,
        kind,
        scheme,
        method,
        host,
        port,
        path,
        status,
        started_at,
        ended_at,
        req_size,
        resp_size,
        req_truncated,
        resp_truncated,
        error,
        _rules,  # for the filter's recheck (``search``); the ids are in ``policy`` too
        tags,
        decided,
        replay_of,
        policy,
        intercept,
        phases,
    ) = row
    duration = None
    if started_at is not None and ended_at is not None:
        duration = round((ended_at - started_at) * 1000.0, 3)
    return {
        "id": flow_id,
        "replica": replica,
        "state": state,
        "kind": kind,
        "scheme": scheme,
        "method": method,
        "host": host,
        "port": port,
        "path": path,
        "status": status,
        "started_at": started_at,
        "ended_at": ended_at,
        "duration_ms": duration,
        "request_size": req_size,
        "response_size": resp_size,
        "request_truncated": bool(req_truncated),
        "response_truncated": bool(resp_truncated),
        "error": error,
        "tags": tags.split() if tags else [],
        "decision": decided,
        "policy": _loads(policy) if policy else None,
        "intercept": _loads(intercept) if intercept else None,
        "replay_of": replay_of,
        "timings": _points(phases, started_at, ended_at),
    }


def decode_body(blob: bytes | None) -> bytes:
    """A stored body back to its bytes (NULL = empty)."""
    return zlib.decompress(blob) if blob else b""


def ended_doc(doc: bytes, reason: str, now: float) -> bytes:
    """The stored event document of an active flow, rewritten as the store's error event."""
    try:
        event = orjson.loads(doc)
    except orjson.JSONDecodeError:
        event = {}
    if not isinstance(event, dict):
        event = {}
    # ended_by_store: final, but its bodies never arrived (FlowRecord.bodies_known)
    event.update(event="error", state="error", error=reason, ended_by_store=True)
    timings = event.get("timings")
    if isinstance(timings, dict):
        event["timings"] = {**timings, "end": now}
    return orjson.dumps(event)
