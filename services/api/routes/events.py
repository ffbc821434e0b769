"""``/api/events``: the system event log (stream EVENTS), read straight from JetStream.

Replica lifecycle, listeners, config roll-outs, kills, store ingest errors and the
audit record of every mutating API call, filtered by ``type`` and ``source`` (subject
filters, applied by NATS) and by time, newest first by default. The cursor is the
stream sequence (``seq``) the previous page ended at.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from libs.common import subjects
from libs.common.models import SystemEvent
from services.api.deps import EventsDep
from services.api.errors import problem_responses
from services.api.params import Timestamp, openapi_parameters, validate_query

router = APIRouter(prefix="/events", tags=["events"])

Token = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


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

    @field_validator("until")
    @classmethod
    def _time_range(cls, v: float | None, info: ValidationInfo) -> float | None:
        since = info.data.get("since")
        if v is not None and since is not None and since > v:
            raise ValueError("must not be before since")
        return v


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
    page = await log.page(
        params.subject(),
        since=params.since,
        until=params.until,
        cursor=params.cursor,
        limit=params.limit,
        order=params.order,
    )
    return {"events": page.events, "next_cursor": page.next_cursor}
