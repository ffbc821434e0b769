"""The storage interface of the flow store, independent of the database behind it.

SQLite (``services.store.sqlite``) is the embedded default; a PostgreSQL backend
implements the same class so the consumer, the RPC layer and the pruner never
know which one they talk to. Every method is async: a backend runs its blocking
work off the event loop (threads for SQLite, a native async driver for PostgreSQL).
"""

from __future__ import annotations

import abc
import asyncio
import base64
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from libs.common import har
from libs.common.models import FlowQuery
from services.store.rows import FINAL_STATES, Decoded, decode_body, split_payloads

Summary = dict[str, Any]
MAX_PING_SINCE = 253402300799.0  # 9999-12-31: a count that reads one index edge
Page = tuple[list[Summary], str | None]


@dataclass(frozen=True, slots=True)
class Listing:
    """A page of a listing with what a client needs to present it.

    ``filtered_count``: flows matching the filters, exact when ``count_exact``, else a
    lower bound (counting stops at a bound; a filter rechecked row by row counts what
    it has seen). ``scanned``/``partial``: a filter that SQL cannot decide alone is
    checked on at most a budget of rows per call; ``partial`` says the budget ran out
    before the page was full, and ``next_cursor`` then continues where the scan stopped.
    """

    flows: list[Summary]
    next_cursor: str | None
    filtered_count: int | None = None
    count_exact: bool = True
    scanned: int | None = None
    partial: bool = False

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"flows": self.flows, "next_cursor": self.next_cursor}
        if self.filtered_count is not None:
            out["filtered_count"] = self.filtered_count
            out["filtered_count_exact"] = self.count_exact
        if self.scanned is not None:
            out["scanned"] = self.scanned
            out["partial"] = self.partial
        return out


class QueryError(Exception):
    """A query the store cannot answer as asked (answered as ``BAD_QUERY``)."""

    def __init__(
        self, field: str, message: str, code: str = "BAD_QUERY", position: int | None = None
    ) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.code = code  # BAD_FILTER for a ``q`` that does not parse
        self.position = position  # where in ``q`` (0-based), for BAD_FILTER


class RepositoryError(Exception):
    """The database failed (locked, full, gone); answered as ``STORE_UNAVAILABLE``."""


@dataclass(frozen=True, slots=True)
class FlowRecord:
    """One stored flow in full: the merged event document plus its bodies.

    ``doc`` is the last event kept for the flow with the ``body_b64`` fields
    removed; bodies are bytes here and become base64 again only on the wire.
    """

    doc: dict[str, Any]
    request_body: bytes
    response_body: bytes

    @property
    def bodies_known(self) -> bool:
        """Whether the bodies are the flow's own: it is final and its replica said so.

        Bodies travel with the final event only, and the table keeps an empty body as
        NULL, so "empty" and "not known yet" look alike in the row; the state in the
        document tells them apart. A flow the store ended itself for a gone replica
        (``ended_by_store``) is final without its bodies ever having arrived.
        """
        doc = self.doc
        return doc.get("state") in FINAL_STATES and not doc.get("ended_by_store")

    def to_wire(self) -> dict[str, Any]:
        """The record in event form: bodies back in ``request/response.body_b64``
        (``""`` for an empty body), absent while they are not known (active flows)."""
        doc = dict(self.doc)
        if not self.bodies_known:
            return doc
        request = doc.get("request")
        if isinstance(request, dict):
            doc["request"] = {**request, "body_b64": _b64(self.request_body)}
        response = doc.get("response")
        if isinstance(response, dict):
            doc["response"] = {**response, "body_b64": _b64(self.response_body)}
        return doc


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What one ingested batch of FLOWS messages contained."""

    events: int  # events in the decodable messages (duplicates included)
    bad_events: int  # malformed events skipped
    undecodable: tuple[int, ...]  # indexes of messages that are not a JSON array of events

    @classmethod
    def of(cls, decoded: Decoded, extra_bad: int = 0) -> IngestResult:
        return cls(decoded.events, decoded.bad_events + extra_bad, tuple(decoded.undecodable))


@dataclass(frozen=True, slots=True)
class Exported:
    """Serialised wire documents of an export page: ``(id, json)`` newest first, and
    whether every id asked for was looked at (False: the byte budget stopped it)."""

    flows: list[tuple[str, bytes]]
    complete: bool


Render = Callable[["FlowRecord", int], bytes]  # a record, the byte budget -> its JSON


def wire_bytes(record: FlowRecord, max_bytes: int) -> bytes:
    """``record.to_wire()`` as JSON; one that is over ``max_bytes`` on its own loses its
    bodies (the parts say ``body_omitted``), so that any flow can be exported."""
    doc = record.to_wire()
    data = orjson.dumps(doc)
    if len(data) <= max_bytes:
        return data
    for name in ("request", "response"):
        part = doc.get(name)
        if isinstance(part, dict) and "body_b64" in part:
            doc[name] = {k: v for k, v in part.items() if k != "body_b64"} | {"body_omitted": True}
    return orjson.dumps(doc)


def har_entry(record: FlowRecord, max_bytes: int) -> bytes:
    """A record as its HAR entry (``fleet.store.har``): built here from the stored bytes,
    so that an export page crosses NATS once, already in the form the API streams."""
    known = record.bodies_known
    return har.record_entry(
        record.doc,
        record.request_body if known else None,
        record.response_body if known else None,
        max_bytes,
    )


RENDERERS: dict[str, Render] = {"wire": wire_bytes, "har": har_entry}  # by name: picklable


def render_rows(rows: Iterable[tuple[Any, ...]], max_bytes: int, render: str) -> Exported:
    """Stored rows ``(id, doc, req_body, resp_body)`` rendered one at a time until the
    byte budget: what a reader thread or an ingest worker process does with a page."""
    fn = RENDERERS[render]
    out: list[tuple[str, bytes]] = []
    used = 0
    for flow_id, doc, req_body, resp_body in rows:
        record = FlowRecord(orjson.loads(doc), decode_body(req_body), decode_body(resp_body))
        data = fn(record, max_bytes)
        if out and used + len(data) + 1 > max_bytes:
            return Exported(out, complete=False)
        out.append((flow_id, data))
        used += len(data) + 1
    return Exported(out, complete=True)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class FlowRepository(abc.ABC):
    """Where flows live. Writes are idempotent by flow id; order of arrival is irrelevant."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Create or migrate the schema; raise ``RepositoryError`` if the database is unusable."""

    @abc.abstractmethod
    async def upsert_events(self, events: Sequence[Mapping[str, Any]]) -> int:
        """Merge flow events in one transaction; return how many were malformed and skipped.

        Merge rule: a ``started`` event inserts a flow that is absent and never
        overwrites one; a final event inserts, or replaces a flow still ``active``;
        a final event for a finished flow changes nothing. Raises
        ``RepositoryError`` when nothing was committed.
        """

    async def ingest(self, payloads: Sequence[bytes]) -> IngestResult:
        """Decode FLOWS message payloads and merge all their events in one transaction.

        What the consumer calls; backends override it to keep decoding off the loop
        and overlap it with writing. Raises ``RepositoryError`` when nothing was
        committed (undecodable payloads are reported, not raised).
        """
        events, undecodable = await asyncio.to_thread(split_payloads, payloads)
        bad = await self.upsert_events(events)
        return IngestResult(len(events), bad, tuple(undecodable))

    @abc.abstractmethod
    async def list(self, query: FlowQuery) -> Page:
        """A page of flow summaries, newest first, and the cursor of the next page (or None)."""

    async def listing(self, query: FlowQuery) -> Listing:
        """``list`` with its counts (backends that can count cheaply override this)."""
        flows, cursor = await self.list(query)
        return Listing(flows, cursor)

    @abc.abstractmethod
    async def get(self, flow_id: str) -> FlowRecord | None:
        """The full record of one flow, or None if it is not stored."""

    async def export_records(
        self, ids: Sequence[str], max_bytes: int, render: str = "wire"
    ) -> Exported:
        """The flows ``ids`` (newest first, as a listing gives them) in wire form, each
        serialised (``FlowRecord.to_wire``), as many as fit in ``max_bytes`` together.

        For ``fleet.store.export``: one reply must fit a NATS message, so this stops at
        the first flow that would not fit (always taking at least one: see
        ``wire_bytes``; ``render`` names another serialisation in ``export.RENDERERS``,
        e.g. ``"har"``).
        Ids no longer stored (pruned meanwhile) are skipped. Backends
        override this to read the flows in one query; this default asks ``get`` for each.
        """
        out: list[tuple[str, bytes]] = []
        used = 0
        for flow_id in ids:
            record = await self.get(flow_id)
            if record is None:
                continue
            data = RENDERERS[render](record, max_bytes)
            if out and used + len(data) + 1 > max_bytes:
                return Exported(out, complete=False)
            out.append((flow_id, data))
            used += len(data) + 1
        return Exported(out, complete=True)

    @abc.abstractmethod
    async def count(self, query: FlowQuery) -> int:
        """How many flows match the query's filters (its page fields are ignored)."""

    @abc.abstractmethod
    async def prune(self, max_age_s: float, max_count: int) -> int:
        """Delete flows older than ``max_age_s`` and all but the newest ``max_count``.

        Oldest first, in small transactions so that ingest keeps going meanwhile.
        Returns the number of flows deleted.
        """

    @abc.abstractmethod
    async def identity(self) -> str:
        """This database's id: made once when it is created, the same for every store
        replica that shares it (and for any path it is opened by)."""

    @abc.abstractmethod
    async def end_active_flows(
        self, replica: str, reason: str, started_before: float | None = None
    ) -> int:
        """End every flow of ``replica`` still ``active`` as ``error`` with ``reason``
        (only those started before ``started_before``, when given).

        For a replica that is gone (killed, hung): nobody else will end its flows. The
        rows are marked presumed, so that a real final event for one of them, arriving
        later, still replaces it (see the merge rule). Idempotent; returns how many
        flows it ended.
        """

    async def ping(self) -> None:
        """Raise ``RepositoryError`` unless the database answers now (readiness, and the
        consumer's wait while the database is down)."""
        await self.count(FlowQuery.model_validate({"limit": 1, "since": MAX_PING_SINCE}))

    async def estimate_rows(self) -> int | None:
        """About how many flows are stored, cheaply (for metrics); None if unknown."""
        return None

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish pending writes and release the database."""
