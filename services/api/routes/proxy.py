"""``/api/proxy``: the listeners of the replicas: status, start, graceful stop.

Status is the registry (each replica's own heartbeat); ``?replica=`` narrows it to
one (404 for an id not registered). Start and stop are
commands: to ``fleet.cmd.all.<verb>`` as a scatter-gather that waits for as
many replies as there are registered replicas, or to one replica when the
body names it. A stop drains in-flight requests up to ``deadline`` seconds
on the replica, so the API waits that long plus the command timeout.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from libs.common.models import CommandReply, ReplicaStatus
from services.api import audit
from services.api.deps import FleetDep
from services.api.errors import ApiError, problem_responses
from services.api.fleet import Fleet

router = APIRouter(prefix="/proxy", tags=["proxy"])

_REPLICA_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ReplicaId = Annotated[
    str, Field(pattern=_REPLICA_PATTERN, description="a replica id from the status")
]
FleetState = Literal["running", "stopped", "partial", "no_replicas"]


class Target(BaseModel):
    """Optional body of start: one replica, or (absent) all of them."""

    model_config = ConfigDict(extra="forbid")

    replica: ReplicaId | None = None

    @field_validator("replica")
    @classmethod
    def _not_all(cls, v: str | None) -> str | None:
        if v == "all":
            raise ValueError("omit replica to address all replicas")
        return v


class StopRequest(Target):
    """Optional body of stop: the target and how long in-flight requests may finish."""

    deadline: float = Field(default=10.0, ge=0, le=3600, description="drain seconds before cutting")


class ReplicaView(BaseModel):
    """One replica as its last heartbeat reported it."""

    id: str
    state: str
    listen: str
    mode: str
    active_connections: int
    active_flows: int
    flows_total: int
    uptime_s: float
    config_revision: int
    config_error: str | None
    policy_revision: int
    policy_error: str | None = Field(
        description="a policy revision it refused (keeps the last good)"
    )
    intercepts_pending: int = Field(description="exchanges held for a decision")
    events_dropped: int
    updated_at: float
    version: str

    @classmethod
    def of(cls, s: ReplicaStatus, now: float) -> ReplicaView:
        return cls(
            id=s.id,
            state=s.state,
            listen=s.listen,
            mode=s.mode,
            active_connections=s.active_connections,
            active_flows=s.active_flows,
            flows_total=s.flows_total,
            uptime_s=round(max(0.0, now - s.started_at), 3),
            config_revision=s.config_revision,
            config_error=s.config_error,
            policy_revision=s.policy_revision,
            policy_error=s.policy_error,
            intercepts_pending=s.intercepts_pending,
            events_dropped=s.events_dropped,
            updated_at=s.updated_at,
            version=s.version,
        )


class Totals(BaseModel):
    replicas: int
    running: int
    active_connections: int
    active_flows: int
    flows_total: int


class FleetStatus(BaseModel):
    """The fleet: ``running`` (all), ``stopped`` (all), ``partial`` (mixed), ``no_replicas``."""

    state: FleetState
    replicas: list[ReplicaView]
    totals: Totals


class ReplicaOutcome(BaseModel):
    """One replica's answer to start/stop (``NO_REPLY`` when it did not answer in time)."""

    id: str
    ok: bool
    state: str | None
    code: str | None = None
    message: str | None = None
    aborted: int | None = Field(
        default=None, description="stop: in-flight flows cut at the deadline"
    )


class LifecycleResult(BaseModel):
    action: Literal["start", "stop"]
    ok: bool = Field(description="every addressed replica answered ok")
    replicas: list[ReplicaOutcome]


def fleet_state(replicas: list[ReplicaStatus]) -> FleetState:
    states = {r.state for r in replicas}
    if not states:
        return "no_replicas"
    if states == {"running"}:
        return "running"
    if states == {"stopped"}:
        return "stopped"
    return "partial"


@router.get(
    "/status",
    summary="State of every replica's listener (or of the one named by replica=)",
    responses=problem_responses(
        401, 403, 404, 422, 503, _404="Unknown replica (REPLICA_NOT_FOUND)"
    ),
)
async def proxy_status(
    fleet: FleetDep,
    replica: Annotated[
        str | None,
        Query(
            pattern=_REPLICA_PATTERN,
            description="only this replica (state and totals are then its own)",
        ),
    ] = None,
) -> FleetStatus:
    if replica is None:
        replicas = await fleet.replicas()
    else:
        one = await fleet.replica(replica)
        if one is None:
            raise ApiError(404, "REPLICA_NOT_FOUND", f"no replica {replica} is registered")
        replicas = [one]
    now = time.time()
    return FleetStatus(
        state=fleet_state(replicas),
        replicas=[ReplicaView.of(r, now) for r in replicas],
        totals=Totals(
            replicas=len(replicas),
            running=sum(r.state == "running" for r in replicas),
            active_connections=sum(r.active_connections for r in replicas),
            active_flows=sum(r.active_flows for r in replicas),
            flows_total=sum(r.flows_total for r in replicas),
        ),
    )


@router.post(
    "/start",
    summary="Open the listener on every replica (or the one named)",
    responses=problem_responses(
        401, 403, 404, 422, 503, _404="Unknown replica (REPLICA_NOT_FOUND)"
    ),
    openapi_extra=audit.action("proxy.start"),
)
async def proxy_start(
    request: Request, fleet: FleetDep, body: Annotated[Target | None, Body()] = None
) -> LifecycleResult:
    target = body or Target()
    audit.note(request, "proxy.start", replica=target.replica)
    result = await _lifecycle(fleet, "start", target.replica, {}, fleet.command_timeout)
    audit.note(request, "proxy.start", outcome=_outcome(result), replica=target.replica)
    return result


@router.post(
    "/stop",
    summary="Stop the listener gracefully: drain in-flight requests up to a deadline",
    responses=problem_responses(
        401, 403, 404, 422, 503, _404="Unknown replica (REPLICA_NOT_FOUND)"
    ),
    openapi_extra=audit.action("proxy.stop"),
)
async def proxy_stop(
    request: Request,
    fleet: FleetDep,
    body: Annotated[StopRequest | None, Body()] = None,
) -> LifecycleResult:
    req = body or StopRequest()
    audit.note(request, "proxy.stop", replica=req.replica, deadline=req.deadline)
    result = await _lifecycle(
        fleet, "stop", req.replica, {"deadline": req.deadline}, req.deadline + fleet.command_timeout
    )
    audit.note(
        request,
        "proxy.stop",
        outcome=_outcome(result),
        replica=req.replica,
        deadline=req.deadline,
        aborted={o.id: o.aborted for o in result.replicas if o.aborted},
    )
    return result


def _outcome(result: LifecycleResult) -> str:
    return "ok" if result.ok else "partial"


async def _lifecycle(
    fleet: Fleet,
    verb: Literal["start", "stop"],
    replica: str | None,
    body: dict[str, Any],
    wait: float,
) -> LifecycleResult:
    if replica is not None:
        if await fleet.replica(replica) is None:
            raise ApiError(404, "REPLICA_NOT_FOUND", f"no replica {replica} is registered")
        outcomes = [_from_reply(await fleet.command(replica, verb, body, wait))]
    else:
        registered = await fleet.replicas()
        if not registered:
            raise ApiError(503, "NO_REPLICAS", "no proxy replica is registered")
        replies = await fleet.broadcast(verb, body, expected=len(registered), timeout=wait)
        if not replies:
            raise ApiError(
                503,
                "NO_REPLICAS",
                f"none of the {len(registered)} registered replicas answered within {wait:g}s",
            )
        answered = {r.replica for r in replies}
        outcomes = [_from_reply(r) for r in replies] + [
            ReplicaOutcome(
                id=s.id,
                ok=False,
                state=s.state,
                code="NO_REPLY",
                message=f"no answer within {wait:g}s",
            )
            for s in registered
            if s.id not in answered
        ]
    outcomes.sort(key=lambda o: o.id)
    return LifecycleResult(action=verb, ok=all(o.ok for o in outcomes), replicas=outcomes)


def _from_reply(reply: CommandReply) -> ReplicaOutcome:
    aborted = reply.data.get("aborted")
    return ReplicaOutcome(
        id=reply.replica,
        ok=reply.ok,
        state=reply.status.state if reply.status is not None else None,
        code=reply.code,
        message=reply.message,
        aborted=aborted if isinstance(aborted, int) else None,
    )
