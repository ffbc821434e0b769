"""``/api/flows``: recorded flows from the store, and killing a live one on its replica.

Listing and reading go to the flow store. Killing goes to the replicas first:
the replica that holds the connection is the authority on whether a flow is
live (the store may not have seen a flow that started a millisecond ago), and
the store is asked only to tell "unknown" (404) from "already finished" (409).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Path, Request, Response
from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field

from libs.common import telemetry
from libs.common.bodies import Part, header, raw_body, render_flow, undo_coding
from services.api import audit
from services.api.deps import FleetDep, StoreDep
from services.api.errors import ApiError, problem_responses
from services.api.params import (
    FlowListParams,
    flow_list_params,
    openapi_parameters,
    validate_query,
)

router = APIRouter(prefix="/flows", tags=["flows"])

FlowId = Annotated[
    str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="flow id (from a listing)")
]
_JSON = "application/json"
_NOT_FOUND = "Unknown flow (FLOW_NOT_FOUND)"


class MatchedRule(BaseModel):
    """One policy rule that matched the flow and was applied."""

    model_config = ConfigDict(extra="allow")

    rule: str | None = Field(None, description="the rule's id")
    phase: str | None = Field(None, description="request or response")
    action: str | None = Field(
        None,
        description="block, respond, map_remote, set_headers, remove_headers, replace_body, "
        "delay, tag, allow or intercept",
    )
    note: str | None = None


class PolicyDecision(BaseModel):
    """The rules policy's account of a flow: the revision in force and the rules that
    matched, in the order they applied (null on a flow no policy was in force for)."""

    model_config = ConfigDict(extra="allow")

    revision: int | None = None
    matched: list[MatchedRule] = Field(default_factory=list)


class InterceptOutcome(BaseModel):
    """How a held exchange (an ``intercept`` rule) ended."""

    model_config = ConfigDict(extra="allow")

    phase: str | None = None
    rule: str | None = None
    outcome: str | None = Field(
        None,
        description="approved, allowed_once, denied, modified, timeout_allowed, "
        "timeout_denied, killed, client_gone or cached",
    )
    by: str | None = Field(None, description="the API key id that decided (null: nobody)")
    held_ms: float | None = None
    modified: list[str] = Field(
        default_factory=list, description="what the decision changed: method, url, headers, ..."
    )


Decision = Literal["block", "respond", "allow", "intercept", "modify"]


class FlowSummary(BaseModel):
    """One flow in a listing (no headers, no bodies)."""

    model_config = ConfigDict(extra="allow")

    id: str
    replica: str | None = None
    state: Literal["active", "completed", "error", "killed"] | None = None
    kind: str | None = None
    scheme: str | None = None
    method: str | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None
    status: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    duration_ms: float | None = None
    request_size: int | None = None
    response_size: int | None = None
    request_truncated: bool | None = None
    response_truncated: bool | None = None
    error: str | None = None
    tags: list[str] = Field(default_factory=list)
    decision: Decision | None = Field(
        None,
        description="the last final action that applied (block, respond, allow, intercept), "
        "modify when only edits applied, null when no rule matched",
    )
    policy: PolicyDecision | None = None
    intercept: InterceptOutcome | None = None
    replay_of: str | None = Field(None, description="the flow this one replays")
    timings: dict[str, float | None] | None = Field(
        None,
        description="epoch seconds: start, dns, connect, tls, request_sent, first_byte, end "
        "(for a page's waterfall); null when only start and end are known",
    )


class FlowPage(BaseModel):
    """A page of flows, newest first; pass ``next_cursor`` as ``cursor`` for the next."""

    flows: list[FlowSummary]
    next_cursor: str | None
    filtered_count: int | None = Field(
        None, description="flows matching the filters (a lower bound unless exact)"
    )
    filtered_count_exact: bool | None = Field(
        None, description="false: at least filtered_count (counting stops at 10,000)"
    )
    scanned: int | None = Field(
        None, description="q filters rechecked row by row: rows looked at for this page"
    )
    partial: bool | None = Field(
        None,
        description="the scan budget (FLEET_STORE_SCAN_LIMIT) ran out before the page was "
        "full: next_cursor continues the scan",
    )


class MessagePart(BaseModel):
    """A request or response as recorded, its body inline.

    ``body`` is text when the recorded bytes are UTF-8 (``encoding: utf-8``),
    else base64 (``encoding: base64``); null while the flow is still active
    (``""`` is an empty body). ``size`` is the real size on the wire,
    ``truncated`` whether capture kept less than that. ``headers`` are
    ``[name, value]`` pairs in wire order.

    With ``decode=true`` the part also has ``content_encoding`` (the recorded
    Content-Encoding, null when none) and ``decoded``: true when ``body`` is the
    body with that coding undone (its size in ``decoded_size``). When a coding
    was named but could not be undone, ``body`` is as recorded and
    ``decode_error`` says why: ``truncated`` (cut at the capture limit),
    ``unsupported`` (not gzip, deflate, br or zstd) or ``invalid`` (corrupt, or
    over 64 MiB decoded).
    """

    model_config = ConfigDict(extra="allow")

    headers: list[list[str]]
    size: int
    truncated: bool
    body: str | None
    encoding: Literal["utf-8", "base64"] | None
    content_encoding: str | None = None
    decoded: bool | None = None
    decoded_size: int | None = None
    decode_error: Literal["truncated", "unsupported", "invalid"] | None = None


class ResponsePart(MessagePart):
    status: int
    reason: str | None = None
    http_version: str | None = None


class FlowDetail(BaseModel):
    """Everything recorded about one flow."""

    model_config = ConfigDict(extra="allow")

    id: str
    replica: str | None = None
    kind: str | None = None
    state: Literal["active", "completed", "error", "killed"]
    client: list[Any] | None = Field(default=None, description="[address, port]")
    server: list[Any] | None = Field(default=None, description="[address, port]")
    scheme: str | None = None
    method: str | None = None
    host: str | None = None
    port: int | None = None
    path: str | None = None
    http_version: str | None = None
    request: MessagePart | None = None
    response: ResponsePart | None = None
    timings: dict[str, float | None] | None = Field(
        None,
        description="epoch seconds: start, dns, connect, tls (the upstream connection, when "
        "this flow opened it; else null), request_sent, first_byte, end",
    )
    error: str | None = None
    trace_id: str | None = Field(
        None, description="the flow's trace in the tracing backend (null when tracing is off)"
    )
    traceparent: str | None = Field(None, description="W3C traceparent of the flow's span")
    tags: list[str] | None = None
    policy: PolicyDecision | None = None
    intercept: InterceptOutcome | None = None
    replay_of: str | None = Field(None, description="the flow this one replays")
    is_replay: Literal["request"] | None = Field(None, description="request: a replay")


class KillResult(BaseModel):
    killed: bool
    id: str
    replica: str = Field(description="the replica that held the connection")


class BodyParams(BaseModel):
    """Query parameters of the detail and raw body routes; any other is a 422."""

    model_config = ConfigDict(extra="forbid")

    decode: Literal["true", "false"] = Field(
        "false",
        description="undo the body's Content-Encoding (gzip, deflate, br, zstd; layered "
        "codings in order); a body that does not decode is served as recorded, saying why",
    )


async def body_params(request: Request) -> bool:
    """``decode`` as a bool; only ``true``/``false``, errors name ``query.<param>``."""
    if not request.query_params:
        return False  # the common case: no model to validate
    return validate_query(BodyParams, dict(request.query_params)).decode == "true"


Decode = Annotated[bool, Depends(body_params)]
_BODY_PARAMS = {"parameters": openapi_parameters(BodyParams)}


@router.get(
    "",
    summary="List flows (newest first, cursor pagination)",
    response_model=FlowPage,
    responses=problem_responses(401, 403, 422, 502, 503),
    openapi_extra={"parameters": openapi_parameters()},
)
async def list_flows(
    store: StoreDep, params: Annotated[FlowListParams, Depends(flow_list_params)]
) -> Response:
    query = params.to_query().model_dump_json(exclude_none=True).encode()
    _, raw = await store.call("list", query)
    return Response(raw, media_type=_JSON)  # the store's page as it came: no re-encoding


@router.get(
    "/{flow_id}",
    summary="Everything recorded about one flow, bodies inline",
    description="Bodies are inline as recorded on the wire; `decode=true` undoes their "
    "Content-Encoding and says so per part (`decoded`, `content_encoding`, `decoded_size`, "
    "or `decode_error` when the recorded body cannot be decoded and is shown as recorded). "
    "Bodies are null while the flow is active.",
    response_model=FlowDetail,
    responses=problem_responses(401, 403, 404, 422, 502, 503, _404=_NOT_FOUND),
    openapi_extra=_BODY_PARAMS,
)
async def get_flow(flow_id: FlowId, store: StoreDep, decode: Decode) -> Response:
    flow = await store.get_flow(flow_id)
    if telemetry.ENABLED and isinstance(flow.get("traceparent"), str):
        found = telemetry.link(flow["traceparent"], {"proxyfleet.flow.id": flow_id})
        if found is not None:  # this request's span points at the flow's trace
            trace.get_current_span().add_link(found.context, found.attributes)
    return Response(orjson.dumps(render_flow(flow, decode)), media_type=_JSON)


_BODY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The recorded bytes, with the recorded Content-Type "
        "(application/octet-stream when none). X-Flow-Body-Size is the real size, "
        "X-Flow-Body-Truncated whether capture kept less, X-Flow-Content-Encoding the "
        "recorded Content-Encoding (the bytes are not decoded). With decode=true the "
        "coding is undone: the decoded bytes come with X-Flow-Decoded (the coding undone) "
        "instead; a body that cannot be decoded comes as recorded with X-Flow-Decode-Error "
        "(truncated, unsupported or invalid).",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **problem_responses(
        401, 403, 404, 422, 502, 503, _404="Unknown flow, or no body recorded (BODY_NOT_AVAILABLE)"
    ),
}


@router.get(
    "/{flow_id}/request/body",
    summary="The recorded request body, raw",
    response_class=Response,
    responses=_BODY_RESPONSES,
    openapi_extra=_BODY_PARAMS,
)
async def request_body(flow_id: FlowId, store: StoreDep, decode: Decode) -> Response:
    return await _body(store, flow_id, "request", decode)


@router.get(
    "/{flow_id}/response/body",
    summary="The recorded response body, raw",
    response_class=Response,
    responses=_BODY_RESPONSES,
    openapi_extra=_BODY_PARAMS,
)
async def response_body(flow_id: FlowId, store: StoreDep, decode: Decode) -> Response:
    return await _body(store, flow_id, "response", decode)


async def _body(store: StoreDep, flow_id: str, which: Part, decode: bool) -> Response:
    flow = await store.get_flow(flow_id)
    found = raw_body(flow, which)
    if found is None:
        state = flow.get("state")
        why = "the flow is still active" if state == "active" else f"no {which} was recorded"
        raise ApiError(404, "BODY_NOT_AVAILABLE", f"flow {flow_id}: {why}")
    data, part = found
    content_type = _safe(header(part.get("headers"), "content-type")) or "application/octet-stream"
    headers: dict[str, str] = {
        "X-Flow-Body-Size": str(part.get("size", len(data))),
        "X-Flow-Body-Truncated": "true" if part.get("truncated") else "false",
        # recorded content from arbitrary servers: never let a browser run it here
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
    }
    if decode:
        uncoded = undo_coding(data, part)
        data = uncoded.data
        coding = _safe(uncoded.content_encoding)
        if uncoded.decoded:
            headers["X-Flow-Decoded"] = coding or "true"
        elif coding:
            headers["X-Flow-Content-Encoding"] = coding
        if uncoded.error is not None:
            headers["X-Flow-Decode-Error"] = uncoded.error
    else:
        encoding = _safe(header(part.get("headers"), "content-encoding"))
        if encoding:
            headers["X-Flow-Content-Encoding"] = encoding  # bytes stay as recorded (not decoded)
    # as a header, not media_type: Starlette would append "; charset=utf-8" to text/*
    headers["Content-Type"] = content_type
    return Response(data, headers=headers)


def _safe(value: str | None) -> str | None:
    """A recorded header value fit to send back (printable ASCII only)."""
    if value is None:
        return None
    value = value.strip()
    return value if value and value.isascii() and value.isprintable() else None


@router.delete(
    "/{flow_id}",
    summary="Kill the active connection of a flow on whichever replica holds it",
    responses=problem_responses(
        401,
        403,
        404,
        409,
        422,
        503,
        _404=_NOT_FOUND,
        _409="The flow has finished (FLOW_NOT_ACTIVE)",
    ),
    openapi_extra=audit.action("flow.kill"),
)
async def kill_flow(
    request: Request, flow_id: FlowId, fleet: FleetDep, store: StoreDep
) -> KillResult:
    audit.note(request, "flow.kill", flow=flow_id)
    registered = await fleet.replicas()
    silent: list[str] = []
    if registered:
        replies = await fleet.broadcast("kill", {"flow_id": flow_id}, expected=len(registered))
        for reply in replies:
            if reply.ok:
                audit.note(request, "flow.kill", flow=flow_id, replica=reply.replica)
                return KillResult(killed=True, id=flow_id, replica=reply.replica)
        answered = {r.replica for r in replies}
        silent = [s.id for s in registered if s.id not in answered]
    flow = await store.get_flow(flow_id)
    state = flow.get("state")
    if state == "active" and silent:
        raise ApiError(
            503,
            "NO_REPLICAS",
            f"flow {flow_id} is active but replicas {', '.join(silent)} did not answer",
        )
    detail = (
        f"flow {flow_id} is {state}"
        if state != "active"
        else f"flow {flow_id} has no live connection on any replica (its replica may be gone)"
    )
    raise ApiError(409, "FLOW_NOT_ACTIVE", detail)
