"""``/healthz`` and ``/readyz``: for orchestrators, without authentication.

Liveness says the process serves HTTP at all; readiness says it can do its
job, which for a stateless API means its NATS connection is up (requests that
need NATS would otherwise fail with 503 anyway).
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel

from services.api.errors import ApiError, problem_responses

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    nats: Literal["connected"]


@router.get("/healthz", summary="Liveness (always 200 while the process serves)")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    summary="Readiness: 200 once NATS is connected, 503 while it is not",
    responses=problem_responses(503, _503="NATS is not connected (NOT_READY)"),
)
async def readyz(request: Request) -> Readiness:
    services = getattr(request.app.state, "services", None)
    if services is None or not services.bus.connected:
        raise ApiError(503, "NOT_READY", "NATS is not connected", headers={"Retry-After": "1"})
    return Readiness(status="ready", nats="connected")
