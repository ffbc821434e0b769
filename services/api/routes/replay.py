"""``POST /api/flows/{id}/replay``: send a recorded request again, as a new flow.

The request is rebuilt from the stored flow (method, the URL the proxy connected to,
the recorded headers and body) with the caller's edits on top, and sent to one
replica (``replica``, else the one that recorded it if it still runs, else any
running one), which relays it like a client's and records it with ``replay_of``
(``~replay`` matches it). Redacted header values were never stored, so they are not
sent: give them in ``headers`` to replay them. A body cut at capture (``truncated``)
cannot be replayed as recorded: 422 unless the caller supplies one.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, Body, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from libs.common.flowfilter import url_authority
from libs.common.policy import header_syntax, header_value
from libs.common.replay import MAX_BODY, REPLAY_VERB, ReplayRequest, Token, check_url
from services.api import audit
from services.api.deps import FleetDep, StoreDep
from services.api.errors import ApiError, FieldError, problem_responses
from services.api.fleet import Fleet
from services.api.routes.flows import FlowId
from services.api.routes.proxy import ReplicaId

router = APIRouter(prefix="/flows", tags=["flows"])

ACTION = "flow.replay"


class ReplayEdits(BaseModel):
    """What to change before sending the request again (all optional)."""

    model_config = ConfigDict(extra="forbid")

    method: Token | None = None
    url: str | None = Field(default=None, max_length=8192, description="absolute http(s) URL")
    headers: list[tuple[str, str]] | None = Field(
        default=None, max_length=500, description="replaces the recorded headers"
    )
    body: str | None = Field(default=None, max_length=MAX_BODY, description="UTF-8 text body")
    body_b64: str | None = Field(
        default=None, max_length=(MAX_BODY * 4) // 3 + 4, description="a binary body, base64"
    )
    replica: ReplicaId | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return None if v is None else check_url(v)

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: list[tuple[str, str]] | None) -> list[tuple[str, str]] | None:
        return None if v is None else [(header_syntax(n), header_value(x)) for n, x in v]

    @field_validator("body_b64")
    @classmethod
    def _b64(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("not base64") from None
        return v

    @model_validator(mode="after")
    def _one_body(self) -> ReplayEdits:
        if self.body is not None and self.body_b64 is not None:
            raise ValueError("give body or body_b64, not both")
        return self


class ReplayResult(BaseModel):
    flow_id: str = Field(description="the new flow (GET /api/flows/{flow_id})")
    replay_of: str
    replica: str


def _invalid(field: str, code: str, message: str, status: int = 422) -> ApiError:
    return ApiError(
        status, code, message, errors=[FieldError(field=field, message=message, type=code.lower())]
    )


def build_request(flow: dict[str, Any], edits: ReplayEdits) -> ReplayRequest:
    """The replica's request: the recorded one with ``edits`` on top."""
    if flow.get("state") == "active":
        raise ApiError(409, "FLOW_STILL_ACTIVE", f"flow {flow.get('id')} has not finished")
    if flow.get("kind") not in ("http", None):
        raise _invalid(
            "path.flow_id",
            "REPLAY_UNSUPPORTED",
            f"a {flow.get('kind')} flow cannot be replayed (HTTP requests only)",
        )
    request = flow.get("request") if isinstance(flow.get("request"), dict) else {}
    assert isinstance(request, dict)
    if edits.body is not None:
        body_b64 = base64.b64encode(edits.body.encode("utf-8")).decode("ascii")
    elif edits.body_b64 is not None:
        body_b64 = edits.body_b64
    elif request.get("truncated"):
        raise _invalid(
            "body.body",
            "REPLAY_BODY_TRUNCATED",
            f"the recorded request body was cut at capture ({request.get('size')} bytes "
            "sent): supply body or body_b64 to replay it",
        )
    else:
        body_b64 = str(request.get("body_b64") or "")
    scheme = str(flow.get("scheme") or "http")
    url = edits.url or (
        f"{scheme}://{url_authority(scheme, str(flow.get('host')), flow.get('port'))}"
        f"{flow.get('path') or '/'}"
    )
    headers = edits.headers
    if headers is None:
        headers = [
            (str(p[0]), str(p[1]))
            for p in request.get("headers") or ()
            if isinstance(p, list | tuple) and len(p) == 2
        ]
    try:
        return ReplayRequest(
            replay_of=str(flow.get("id")),
            method=edits.method or str(flow.get("method") or "GET"),
            url=url,
            headers=headers,
            body_b64=body_b64,
        )
    except ValueError as exc:  # a recorded request our own checks refuse (e.g. a bad URL)
        raise _invalid("path.flow_id", "REPLAY_UNSUPPORTED", f"cannot replay: {exc}") from None


async def _pick_replica(fleet: Fleet, wanted: str | None, recorded_by: Any) -> str:
    replicas = await fleet.replicas()
    running = [r.id for r in replicas if r.state == "running"]
    if wanted is not None:
        if wanted not in {r.id for r in replicas}:
            raise _invalid("body.replica", "REPLICA_NOT_FOUND", f"no replica {wanted}", 404)
        return wanted
    if recorded_by in running:
        return str(recorded_by)
    if running:
        return running[0]
    raise ApiError(503, "NO_REPLICAS", "no running proxy replica to replay through")


@router.post(
    "/{flow_id}/replay",
    status_code=201,
    summary="Send a recorded request again (optionally edited), recorded as a new flow",
    responses=problem_responses(
        401,
        403,
        404,
        409,
        422,
        502,
        503,
        _404="Unknown flow (FLOW_NOT_FOUND) or replica (REPLICA_NOT_FOUND)",
        _409="The flow has not finished (FLOW_STILL_ACTIVE)",
        _422="Invalid edits, a truncated body not supplied (REPLAY_BODY_TRUNCATED), or a "
        "tunnel/websocket flow (REPLAY_UNSUPPORTED)",
        _502="The replica could not send it (REPLAY_FAILED)",
    ),
    openapi_extra=audit.action(ACTION),
)
async def replay_flow(
    request: Request,
    flow_id: FlowId,
    fleet: FleetDep,
    store: StoreDep,
    edits: Annotated[ReplayEdits | None, Body()] = None,
) -> ReplayResult:
    audit.note(request, ACTION, flow=flow_id)
    edits = edits or ReplayEdits()
    flow = await store.get_flow(flow_id)
    replay = build_request(flow, edits)
    replica = await _pick_replica(fleet, edits.replica, flow.get("replica"))
    reply = await fleet.command(replica, REPLAY_VERB, replay.model_dump())
    new_id = reply.data.get("flow_id")
    if not reply.ok or not isinstance(new_id, str):
        raise ApiError(502, "REPLAY_FAILED", f"replica {replica}: {reply.message or reply.code}")
    audit.note(request, ACTION, flow=flow_id, replica=replica, new_flow=new_id)
    return ReplayResult(flow_id=new_id, replay_of=flow_id, replica=replica)
