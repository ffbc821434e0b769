"""``/api/logs/decisions``: the decision log of the rules policy, newest first.

A view over the recorded flows that some policy rule matched (the store's ``decision``
column is set): what was decided (the last final action that applied: ``block``,
``respond``, ``allow``, ``intercept``; ``modify`` when only edits applied), by which
rules at which policy revision, and how a held exchange ended. It is the store's
listing (``fleet.store.list`` with ``decision``/``rule``/``since``), so it pages with the
listing's cursor and costs one index range: no second copy of the flows, no new verb.

``time_range`` is the shorthand of ``/api/events`` (``5m``, ``1h``, ``24h``, ``all``, any
``<n>s|m|h|d``; default ``1h``), resolved against the time of the request. ``before`` is
the ``next_cursor`` of the previous page (an opaque cursor, not a time: two decisions in
the same millisecond are never lost or repeated between pages).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from libs.common import har
from services.api.deps import StoreDep
from services.api.errors import ApiError, problem_responses
from services.api.params import openapi_parameters, validate_query
from services.api.routes.events import parse_time_range
from services.api.routes.flows import Decision, InterceptOutcome, MatchedRule

router = APIRouter(prefix="/logs", tags=["logs"])


class DecisionLogParams(BaseModel):
    """The query of ``GET /api/logs/decisions``; unknown parameters are rejected."""

    model_config = ConfigDict(extra="forbid")

    time_range: str = Field(
        "1h",
        description="decisions on flows started in the last <n>s|m|h|d (5m, 1h, 24h), or all",
        examples=["24h"],
    )
    limit: int = Field(100, ge=1, le=1000)
    before: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="next_cursor of the previous page: the entries after it (older)",
    )
    rule: str | None = Field(
        None,
        max_length=128,
        pattern=r"^[!-~]+$",
        description="only flows this rule (id; ASCII case ignored) matched",
    )
    decision: Decision | None = Field(None, description="only flows with this decision")

    @field_validator("time_range")
    @classmethod
    def _time_range(cls, v: str) -> str:
        parse_time_range(v)
        return v.strip().lower()

    def since(self, now: float) -> float | None:
        seconds = parse_time_range(self.time_range)
        return None if seconds is None else max(0.0, now - seconds)


class DecisionEntry(BaseModel):
    """One flow the policy decided something about."""

    flow_id: str
    time: float | None = Field(None, description="epoch seconds: when the flow started")
    replica: str | None = None
    method: str | None = None
    url: str
    status: int | None = Field(None, description="response status (null: no response)")
    revision: int | None = Field(None, description="the policy revision in force")
    decision: Decision
    rules: list[MatchedRule] = Field(
        description="the rules that matched and were applied, in order"
    )
    tags: list[str]
    intercept: InterceptOutcome | None = None


class DecisionLogPage(BaseModel):
    """A page of the decision log; pass ``next_cursor`` as ``before`` for the next."""

    entries: list[DecisionEntry]
    next_cursor: str | None
    filtered_count: int | None = Field(
        None, description="decisions matching the query (a lower bound unless exact)"
    )
    filtered_count_exact: bool | None = None


async def decision_log_params(request: Request) -> DecisionLogParams:
    return validate_query(DecisionLogParams, dict(request.query_params))


def entry(flow: dict[str, Any]) -> dict[str, Any]:
    """A decision log entry from a listing's flow summary."""
    policy = flow.get("policy")
    policy = policy if isinstance(policy, dict) else {}
    matched = policy.get("matched")
    return {
        "flow_id": flow.get("id"),
        "time": flow.get("started_at"),
        "replica": flow.get("replica"),
        "method": flow.get("method"),
        "url": har.url(flow),
        "status": flow.get("status"),
        "revision": policy.get("revision"),
        "decision": flow.get("decision"),
        "rules": matched if isinstance(matched, list) else [],
        "tags": flow.get("tags") or [],
        "intercept": flow.get("intercept"),
    }


@router.get(
    "/decisions",
    summary="The decision log: flows the rules policy matched, newest first",
    description="Each entry is one flow some rule matched: the `decision` (the last final "
    "action that applied, or `modify` when only edits did), the matched `rules` in order, "
    "the policy `revision`, the flow's `tags` and how an intercept ended. `time_range` "
    "(default `1h`) bounds when the flows started; `before` is the `next_cursor` of the "
    "previous page.",
    response_model=DecisionLogPage,
    responses=problem_responses(401, 403, 422, 502, 503),
    openapi_extra={"parameters": openapi_parameters(DecisionLogParams)},
)
async def decision_log(
    store: StoreDep, params: Annotated[DecisionLogParams, Depends(decision_log_params)]
) -> dict[str, Any]:
    query: dict[str, Any] = {"decision": params.decision or "any", "limit": params.limit}
    since = params.since(time.time())
    if since is not None:
        query["since"] = since
    if params.before is not None:
        query["cursor"] = params.before
    if params.rule is not None:
        query["rule"] = params.rule
    try:
        page, _ = await store.call("list", query)
    except ApiError as exc:  # the store names its own field: ours is ``before``
        if exc.errors:
            exc.errors = [
                e.model_copy(update={"field": "query.before"}) if e.field == "query.cursor" else e
                for e in exc.errors
            ]
        raise
    flows = page.get("flows")
    out: dict[str, Any] = {
        "entries": [entry(f) for f in flows if isinstance(f, dict)]
        if isinstance(flows, list)
        else [],
        "next_cursor": page.get("next_cursor"),
    }
    if "filtered_count" in page:
        out["filtered_count"] = page["filtered_count"]
        out["filtered_count_exact"] = page.get("filtered_count_exact")
    return out
