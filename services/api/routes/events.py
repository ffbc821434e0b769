"""``/api/events``: the system event log (stream EVENTS), read straight from JetStream.

Replica lifecycle, listeners, config roll-outs, kills, store ingest errors and the
audit record of every mutating API call, filtered by ``type`` and ``source`` (subject
filters, applied by NATS), by time (``since``/``until``, or the ``time_range``
shorthand ``5m``/``1h``/``24h``/``7d``/``all`` of seed 002), and by minimum
``severity`` (``warning`` = warnings and errors, as a log level filters: someone
asking for warnings wants to see the errors too), newest first by default. The
cursor is the stream sequence (``seq``) the previous page ended at.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from libs.common import subjects
from libs.common.models import Severity, SystemEvent
from services.api.deps import EventsDep
from services.api.errors import problem_responses
from services.api.eventlog import Keep
from services.api.params import Timestamp, openapi_parameters, validate_query

router = APIRouter(prefix="/events", tags=["events"])

Token = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]

# "at least" order; a stored severity this API does not know ranks as info
SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "error": 2}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SHORTHAND = re.compile(r"^([1-9][0-9]{0,5})([smhd])$")


def parse_time_range(value: str) -> float | None:
    """``5m`` / ``1h`` / ``24h`` / ``7d`` -> seconds; ``all`` -> None (no bound)."""
    text = value.strip().lower()
    if text == "all":
        return None
    m = _SHORTHAND.match(text)
    if m is None:
        raise ValueError("expected <n>s, <n>m, <n>h or <n>d (5m, 1h, 24h, 7d) or all")
    return float(int(m.group(1)) * _UNITS[m.group(2)])


class EventFilter(BaseModel):
    """What both the listing and the live stream filter on."""

    model_config = ConfigDict(extra="forbid")

    type: Token | None = Field(
        None, description="event type: replica_started, config_rejected, audit, ..."
    )
    source: Token | None = Field(
        None, description="what the event is about: a replica id, a store id, or api"
    )

    def subject(self) -> str:
        return subjects.events_filter(self.source, self.type)


class EventListParams(EventFilter):
    """The query of ``GET /api/events``; unknown parameters are rejected."""

    since: Timestamp | None = Field(None, description="events recorded at or after this time")
    until: Timestamp | None = Field(None, description="events recorded before this time")
    order: Literal["desc", "asc"] = Field(
        "desc", description="desc: newest first (default); asc: oldest first"
    )
    cursor: int | None = Field(
        None, ge=0, description="next_cursor of the previous page (a stream sequence)"
    )
    limit: int = Field(100, ge=1, le=1000)
    severity: Severity | None = Field(
        None,
        description="at least this severity: info (everything), warning (warnings and "
        "errors), error",
    )
    time_range: str | None = Field(
        None,
        description="the last <n>s|m|h|d (5m, 1h, 24h, 7d) before now, or all; "
        "instead of since/until",
        examples=["1h"],
    )

    @field_validator("until")
    @classmethod
    def _time_range(cls, v: float | None, info: ValidationInfo) -> float | None:
        since = info.data.get("since")
        if v is not None and since is not None and since > v:
            raise ValueError("must not be before since")
        return v

    @field_validator("time_range")
    @classmethod
    def _shorthand(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        parse_time_range(v)
        given = [name for name in ("since", "until") if info.data.get(name) is not None]
        if given:
            raise ValueError(f"give time_range or {'/'.join(given)}, not both")
        return v

    def window(self, now: float) -> tuple[float | None, float | None]:
        """(since, until) after resolving ``time_range`` against ``now``."""
        if self.time_range is None:
            return self.since, self.until
        seconds = parse_time_range(self.time_range)
        return (None if seconds is None else now - seconds), None

    def keep(self) -> Keep | None:
        """The severity filter as a predicate on records (None: keep everything)."""
        if self.severity is None or self.severity == "info":
            return None
        floor = SEVERITY_RANK[self.severity]
        return lambda rec: SEVERITY_RANK.get(str(rec.get("severity")), 0) >= floor


class EventRecord(SystemEvent):
    """A stored event and its stream sequence (the cursor and the SSE id)."""

    model_config = ConfigDict(extra="allow")

    seq: int = Field(description="stream sequence in EVENTS")
    id: str | None = None  # type: ignore[assignment]  # records written by hand may lack it


class EventPage(BaseModel):
    """A page of events; pass ``next_cursor`` as ``cursor`` for the next (null: no more)."""

    events: list[EventRecord]
    next_cursor: int | None


async def event_list_params(request: Request) -> EventListParams:
    return validate_query(EventListParams, dict(request.query_params))


@router.get(
    "",
    summary="The system event log, filtered, newest first (cursor = stream sequence)",
    response_model=EventPage,
    responses=problem_responses(401, 403, 422, 503),
    openapi_extra={"parameters": openapi_parameters(EventListParams)},
)
async def list_events(
    log: EventsDep, params: Annotated[EventListParams, Depends(event_list_params)]
) -> dict[str, Any]:
    since, until = params.window(time.time())
    page = await log.page(
        params.subject(),
        since=since,
        until=until,
        cursor=params.cursor,
        limit=params.limit,
        order=params.order,
        keep=params.keep(),
    )
    return {"events": page.events, "next_cursor": page.next_cursor}
