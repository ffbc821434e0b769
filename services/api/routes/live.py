"""Live streams over Server-Sent Events: ``/api/flows/stream`` and ``/api/events/stream``.

Both send ``event: connected`` first (on a fresh connect once the subscription is in
place, so everything stored after it is delivered; on a resume before the replay), then
one SSE event per flow event / system event with an
``id:`` to resume from: reconnecting with ``Last-Event-ID`` (the header browsers send
by themselves, or the ``last_event_id`` parameter) continues right after it, with no
gap and no repeat while the stream still holds it. A ``: heartbeat`` comment goes out
every ``FLEET_API_SSE_HEARTBEAT`` seconds.

- flows: ``id: <FLOWS stream sequence>:<index>`` (one FLOWS message carries a batch of
  events, the index is the event's place in it); ``data`` is the flow event without
  bodies. A client that falls more than ``FLEET_API_STREAM_QUEUE_SIZE`` events behind
  gets ``event: dropped`` and the stream ends (reconnect with its ``last_event_id``, which
  is always set, to catch up). A resume id beyond the stream's end is a 422; one older
  than the oldest event kept gets ``connected`` with ``gap: true`` and ``resumes_at``.
  ``q`` filters with the filter language, on the same code the store rechecks with.
- events: ``id: <EVENTS stream sequence>``; ``data`` is the ``SystemEvent`` plus ``seq``.
  This stream is read at the client's pace from JetStream, so it never drops.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from services.api.deps import EventsDep, FlowHubDep, SettingsDep
from services.api.errors import ApiError, FieldError, problem_responses
from services.api.eventlog import EventLog
from services.api.params import (
    STREAM_EXCLUDED,
    FlowListParams,
    flow_stream_params,
    openapi_parameters,
    validate_query,
)
from services.api.routes.events import EventFilter
from services.api.sse import SEP, sse_response
from services.api.streams import LAST, FlowHub, Item, Position, Subscriber, format_id, parse_id

log = logging.getLogger("proxyfleet.api.live")

router = APIRouter(tags=["live"])

SSE_MEDIA_TYPE = "text/event-stream"


def _sse_doc(text: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": text,
            "content": {SSE_MEDIA_TYPE: {"schema": {"type": "string"}}},
        },
        **problem_responses(401, 403, 422, 503),
    }


LastEventIdHeader = Annotated[
    str | None,
    Header(alias="Last-Event-ID", description="resume after this id (sent by EventSource clients)"),
]
LastEventIdQuery = Annotated[
    str | None, Query(description="the same as the Last-Event-ID header, for a first connect")
]


def _bad_id(value: str, expected: str) -> ApiError:
    return ApiError(
        422,
        "VALIDATION_ERROR",
        f"invalid Last-Event-ID {value[:80]!r}",
        errors=[FieldError(field="header.last-event-id", message=expected, type="value_error")],
    )


def _connected(resumed_after: str | None, **extra: Any) -> ServerSentEvent:
    body = orjson.dumps({"resumed_after": resumed_after, **extra}).decode()
    return ServerSentEvent(body, event="connected", sep=SEP)


# -- flows ------------------------------------------------------------------------------------
def _frame(item: Item) -> bytes:
    return b"id: " + format_id(item.pos).encode() + b"\ndata: " + item.payload + b"\n\n"


async def flow_events(
    hub: FlowHub,
    sub: Subscriber,
    resume: Position | None,
    start: Position,
    gap: int | None = None,
) -> AsyncIterator[Any]:
    """``connected``, the replay (when resuming), then the live feed; see
    ``services.api.streams``. ``start``: where the stream stood when the client came (what
    ``dropped`` names when nothing was sent yet); ``gap``: the oldest sequence the stream
    still holds, when the resume id is older (``connected`` says so and where it goes on).
    """
    last: Position = resume if resume is not None else start
    try:
        if resume is not None:
            extra: dict[str, Any] = {}
            if gap is not None:
                extra = {"gap": True, "resumes_at": format_id((gap, 0))}
            yield _connected(format_id(resume), **extra)
            async for item in hub.replay(sub, last):
                last = item.pos
                yield _frame(item)
            sub.after = last
        await hub.join(sub)
        if resume is None:
            yield _connected(None)
        if resume is not None:  # what was stored while joining
            async for item in hub.replay(sub, last):
                last = item.pos
                yield _frame(item)
        while not hub.closing.is_set():
            if sub.dropped is not None:
                yield _dropped(sub.dropped, last)
                return
            if not sub.queue:
                sub.wake.clear()
                if sub.dropped is None and not sub.queue and not hub.closing.is_set():
                    await sub.wake.wait()
                continue
            item = sub.queue.popleft()
            if item.pos <= last:  # already sent by the replay
                continue
            last = item.pos
            yield _frame(item)
    except Exception as exc:  # NATS failed under us: say so, the client reconnects and resumes
        log.warning("flow stream ended: %r", exc)
        yield _dropped(f"the live feed failed ({type(exc).__name__}); reconnect to resume", last)
    finally:
        hub.leave(sub)


def _dropped(reason: str, last: Position) -> ServerSentEvent:
    body = {"reason": reason, "last_event_id": format_id(last)}  # always: resume from it
    return ServerSentEvent(orjson.dumps(body).decode(), event="dropped", sep=SEP)


@router.get(
    "/flows/stream",
    summary="Live flow events (SSE), with the filters of GET /api/flows",
    response_class=EventSourceResponse,
    responses=_sse_doc(
        "`text/event-stream`: `event: connected` first, then one event per flow event "
        "(`id: <stream seq>:<index>`, `data`: the flow event without bodies); "
        "`event: dropped` ends the stream of a client that reads too slowly."
    ),
    openapi_extra={"parameters": openapi_parameters(exclude=STREAM_EXCLUDED)},
)
async def flow_stream(
    request: Request,
    hub: FlowHubDep,
    settings: SettingsDep,
    params: Annotated[FlowListParams, Depends(flow_stream_params)],
    last_event_id: LastEventIdQuery = None,
    last_event_id_header: LastEventIdHeader = None,
) -> EventSourceResponse:
    resume: Position | None = None
    raw = last_event_id_header or last_event_id
    if raw:
        resume = parse_id(raw)
        if resume is None:
            raise _bad_id(raw, "expected <sequence>:<index> as sent in an id: line")
    first, last_seq = await _bounds(hub)
    gap: int | None = None
    if resume is not None:
        if resume[0] > last_seq:
            raise _bad_id(
                raw or "",
                f"not an id of this stream: it ends at sequence {last_seq} (an id from "
                "another installation, or from before the stream was reset?); reconnect "
                "without Last-Event-ID",
            )
        if resume[0] + 1 < first:  # events between it and the oldest kept were pruned
            gap = first
    # a client dropped before anything was sent resumes from where it came in
    start: Position = resume if resume is not None else (last_seq, LAST)
    sub = hub.subscriber(params.to_query())
    return sse_response(
        request, flow_events(hub, sub, resume, start, gap), settings.api_sse_heartbeat
    )


async def _bounds(hub: FlowHub) -> tuple[int, int]:
    try:
        return await hub.bounds()
    except Exception as exc:  # NATS or the stream away
        raise ApiError(
            503, "BUS_UNAVAILABLE", f"the flow stream is not reachable: {exc!r}"
        ) from None


# -- events -----------------------------------------------------------------------------------
async def system_events(
    log: EventLog, subject: str, after: int, resumed: bool, hub: FlowHub
) -> AsyncIterator[Any]:
    yield _connected(str(after) if resumed else None)
    async for rec in log.tail(subject, after, hub.closing):
        yield b"id: %d\ndata: %s\n\n" % (rec["seq"], orjson.dumps(rec))


async def _event_filter(request: Request) -> EventFilter:
    query = dict(request.query_params)
    query.pop("last_event_id", None)
    return validate_query(EventFilter, query)


@router.get(
    "/events/stream",
    summary="Live system events (SSE), filtered by type and source",
    response_class=EventSourceResponse,
    responses=_sse_doc(
        "`text/event-stream`: `event: connected` first, then one event per system event "
        "(`id: <stream seq>`, `data`: the event with its `seq`)."
    ),
    openapi_extra={"parameters": openapi_parameters(EventFilter)},
)
async def event_stream(
    request: Request,
    log: EventsDep,
    hub: FlowHubDep,
    settings: SettingsDep,
    flt: Annotated[EventFilter, Depends(_event_filter)],
    last_event_id: LastEventIdQuery = None,
    last_event_id_header: LastEventIdHeader = None,
) -> EventSourceResponse:
    raw = last_event_id_header or last_event_id
    if raw:
        text = raw.strip()
        if not text.isdigit():
            raise _bad_id(raw, "expected a stream sequence as sent in an id: line")
        after, resumed = int(text), True
    else:
        bounds = await log.bounds()  # from now on: after the last event stored so far
        after, resumed = (bounds[1] if bounds else 0), False
    return sse_response(
        request,
        system_events(log, flt.subject(), after, resumed, hub),
        settings.api_sse_heartbeat,
    )
