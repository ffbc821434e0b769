"""``/api/approvals``: exchanges held by ``intercept`` rules, and the cached approvals.

Pending approvals live on the replicas that hold them (``libs.common.approvals``): the
list is scatter-gathered from every registered replica, the stream follows the
replicas' intercept events in EVENTS after a snapshot, and each decision is broadcast
to ``fleet.cmd.all.decide``, where the one replica holding the id answers it. ``approve``
also writes a cached approval (KV ``fleet_approvals``): later exchanges of the same rule,
method and URL (without its query string) pass without being held until it expires.
Decisions and cache deletions need the admin scope and are audited.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

import orjson
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sse_starlette import EventSourceResponse, ServerSentEvent

from libs.common import events
from libs.common.approvals import (
    CachedApproval,
    Decision,
    DecisionKind,
    PendingApproval,
    RequestEdit,
    ResponseEdit,
    strip_query,
)
from libs.common.policy import MAX_BODY, HeaderPair
from services.api import audit
from services.api.approvals_client import Approvals, PendingList, intercept_subjects
from services.api.deps import CallerDep, EventsDep, FlowHubDep, Services, SettingsDep, get_services
from services.api.errors import ApiError, FieldError, problem_responses
from services.api.eventlog import EventLog
from services.api.sse import SEP, sse_response
from services.api.streams import FlowHub

log = logging.getLogger("proxyfleet.api.approvals")

router = APIRouter(prefix="/approvals", tags=["approvals"])

MAX_DECISION_BODY = 1 << 20  # bytes of a decision's JSON body (a 64 KiB body, escaped)
MAX_TTL = 7 * 24 * 3600.0
SSE_MEDIA_TYPE = "text/event-stream"
_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"

ApprovalId = Annotated[
    str,
    Path(
        pattern=_ID_PATTERN,
        description="approval id (`<flow id>-<phase>`, from the pending list)",
    ),
]

APPROVE_ACTION = "approval.approve"
ALLOW_ONCE_ACTION = "approval.allow_once"
DENY_ACTION = "approval.deny"
MODIFY_ACTION = "approval.modify"
PURGE_ACTION = "approval.cache.purge"
FORGET_ACTION = "approval.cache.delete"

_KEY_DOC = (
    "A cached approval is identified by the rule id, the method (case-insensitive) and "
    "the URL without its query string (and fragment): `cache_key(rule, method, url)`, so "
    "one approval covers every query string of that URL."
)


async def _approvals(services: Annotated[Services, Depends(get_services)]) -> Approvals:
    return Approvals(services.bus, services.fleet)


ApprovalsDep = Annotated[Approvals, Depends(_approvals)]


# -- models -----------------------------------------------------------------------------------
class PendingListView(BaseModel):
    """The exchanges held on the replicas, oldest first."""

    pending: list[PendingApproval]
    missing: list[str] = Field(
        description="registered replicas that did not answer in time: what they hold is not listed"
    )


class CachedEntry(BaseModel):
    """A live cached approval (``CachedApproval``), its KV key and the time it has left."""

    key: str = Field(description="the KV key: cache_key(rule, method, url)")
    rule: str
    method: str
    url: str = Field(description="without the query string")
    by: str | None = Field(description="the approving API key's id")
    created_at: float
    expires_at: float
    expires_in_s: float = Field(description="seconds left")

    @classmethod
    def of(cls, entry: CachedApproval, now: float, key: str | None = None) -> CachedEntry:
        return cls(
            key=key or entry.key(),
            rule=entry.rule,
            method=entry.method,
            url=entry.url,
            by=entry.by,
            created_at=entry.created_at,
            expires_at=entry.expires_at,
            expires_in_s=round(entry.expires_at - now, 3),
        )


class CachedList(BaseModel):
    cached: list[CachedEntry]


class DecisionResult(BaseModel):
    """The holding replica applied the decision."""

    id: str
    decision: DecisionKind
    replica: str = Field(description="the replica that held the exchange")
    approval: PendingApproval = Field(description="the exchange as it was held")
    cached: CachedEntry | None = Field(
        default=None, description="approve: the cached approval written (null if it failed)"
    )


class ApproveBody(BaseModel):
    """Optional body of approve."""

    model_config = ConfigDict(extra="forbid")

    ttl_s: float | None = Field(
        default=None,
        ge=1,
        le=MAX_TTL,
        description="seconds the approval stays cached (default FLEET_API_APPROVAL_TTL)",
    )


class AllowOnceBody(BaseModel):
    """allow-once takes no fields (an empty object or no body)."""

    model_config = ConfigDict(extra="forbid")


class DenyBody(BaseModel):
    """Optional body of deny: the answer the client gets instead."""

    model_config = ConfigDict(extra="forbid")

    status: int | None = Field(default=None, ge=200, le=599, description="the answer's status")
    body: str | None = Field(default=None, max_length=MAX_BODY, description="the answer's body")


_CTL = re.compile(r"[\x00-\x20\x7f]")


def _some(model: BaseModel, what: str) -> None:
    if all(getattr(model, name) is None for name in type(model).model_fields):
        raise ValueError(f"{what} names nothing to change (use allow-once to let it pass)")


class RequestChange(RequestEdit):
    """``modify`` of a held request: what replaces its parts (null or absent: kept)."""

    headers: list[HeaderPair] | None = Field(default=None, max_length=200)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if _CTL.search(v):
            raise ValueError("a URL cannot hold spaces or control characters")
        try:
            parts = urlsplit(v)
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from None
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http:// or https:// URL")
        return v

    @model_validator(mode="after")
    def _changes_something(self) -> RequestChange:
        _some(self, "the request edit")
        return self


class ResponseChange(ResponseEdit):
    """``modify`` of a held response."""

    headers: list[HeaderPair] | None = Field(default=None, max_length=200)

    @model_validator(mode="after")
    def _changes_something(self) -> ResponseChange:
        _some(self, "the response edit")
        return self


class ModifyBody(BaseModel):
    """Exactly one of ``request`` (a held request) or ``response`` (a held response)."""

    model_config = ConfigDict(extra="forbid")

    request: RequestChange | None = None
    response: ResponseChange | None = None

    @model_validator(mode="after")
    def _one(self) -> ModifyBody:
        if (self.request is None) == (self.response is None):
            raise ValueError("give exactly one of request (request phase) or response")
        return self


M = TypeVar("M", bound=BaseModel)


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """``model_json_schema()`` with its ``$defs`` inlined (an OpenAPI request body)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    out: dict[str, Any] = walk(schema)
    return out


def _body_doc(model: type[BaseModel], required: bool = False) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": _inline(model.model_json_schema())}},
        }
    }


async def read_json(request: Request, model: type[M], required: bool = False) -> M | None:
    """The body as ``model``: 413 past ``MAX_DECISION_BODY`` bytes (never buffered
    whole), 422 naming ``body.<field>`` otherwise; None when optional and absent."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_DECISION_BODY:
            raise ApiError(
                413, "PAYLOAD_TOO_LARGE", f"a decision body is at most {MAX_DECISION_BODY} bytes"
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        if required:
            raise RequestValidationError(
                [{"loc": ("body",), "msg": "a JSON object is required", "type": "missing"}]
            )
        return None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(
            422,
            "VALIDATION_ERROR",
            "invalid body",
            errors=[FieldError(field="body", message=f"not JSON: {exc}", type="json_invalid")],
        ) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in exc.errors()]
        ) from None


def _decision_responses(**extra: str) -> dict[int | str, dict[str, Any]]:
    return problem_responses(
        401,
        403,
        404,
        409,
        413,
        422,
        502,
        503,
        _404="No replica holds this approval, or none is registered (APPROVAL_NOT_FOUND)",
        _409="It was already resolved: decided, timed out, killed (APPROVAL_ALREADY_DECIDED)",
        _413="Body too large (PAYLOAD_TOO_LARGE)",
        _502="A replica failed the command, or decided without sending the approval "
        "(REPLICA_ERROR)",
        _503="A registered replica did not answer and may hold it (NO_REPLICAS), or NATS is down",
        **extra,
    )


# -- pending ----------------------------------------------------------------------------------
@router.get(
    "/pending/list",
    summary="The exchanges held for a decision on every replica, oldest first",
    responses=problem_responses(401, 403, 422, 503),
)
async def pending_list(approvals: ApprovalsDep) -> PendingListView:
    found = await approvals.pending()
    return PendingListView(pending=found.pending, missing=found.missing)


LastEventIdHeader = Annotated[
    str | None,
    Header(alias="Last-Event-ID", description="replay the intercept events after this id"),
]
LastEventIdQuery = Annotated[
    str | None, Query(description="the same as the Last-Event-ID header, for a first connect")
]


def _event(data: dict[str, Any], seq: int) -> ServerSentEvent:
    return ServerSentEvent(orjson.dumps(data).decode(), event=data["type"], id=str(seq), sep=SEP)


def snapshot_data(found: PendingList) -> dict[str, Any]:
    return {
        "type": "snapshot",
        "timestamp": time.time(),
        "pending": [p.model_dump(mode="json") for p in found.pending],
        "missing": found.missing,
    }


_TYPES = {
    events.INTERCEPT_CREATED: "pending_created",
    events.INTERCEPT_RESOLVED: "pending_resolved",
    events.INTERCEPT_TIMEOUT: "pending_timeout",
}


def event_data(rec: dict[str, Any]) -> dict[str, Any] | None:
    """One stored intercept event as the stream sends it (None: not one it can show)."""
    kind = _TYPES.get(str(rec.get("type")))
    data = rec.get("data")
    if kind is None or not isinstance(data, dict):
        return None
    head = {
        "type": kind,
        "timestamp": rec.get("time"),
        "replica": rec.get("source"),
        "severity": rec.get("severity", "info"),
    }
    if kind == "pending_created":
        try:
            approval = PendingApproval.model_validate(data.get("approval"))
        except ValidationError:
            log.debug("intercept_created %s without a readable approval", rec.get("seq"))
            return None
        return {**head, "approval": approval.model_dump(mode="json")}
    if not isinstance(data.get("id"), str):
        return None
    return {**data, **head}


async def pending_events(
    approvals: Approvals, log_: EventLog, found: PendingList, after: int, hub: FlowHub
) -> AsyncIterator[Any]:
    """``snapshot``, then every intercept event stored after sequence ``after`` (the
    stream's end when the snapshot was asked for, or the client's resume id)."""
    shown = {p.id for p in found.pending}
    yield _event(snapshot_data(found), after)
    async for rec in log_.tail(intercept_subjects(), after, hub.closing):
        data = event_data(rec)
        if data is None:
            continue
        if data["type"] == "pending_created" and data["approval"]["id"] in shown:
            shown.discard(data["approval"]["id"])  # the snapshot already showed it
            continue
        yield _event(data, int(rec["seq"]))


@router.get(
    "/pending",
    summary="Pending approvals live (SSE): a snapshot, then created/resolved/timeout",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "`text/event-stream`: `event: snapshot` first (`data`: `type`, "
            "`timestamp`, `pending`, `missing`), then `pending_created` (`approval`), "
            "`pending_resolved` (`id`, `flow_id`, `decision`, `by`) and `pending_timeout` "
            "(`id`, `flow_id`, `on_timeout`), each with `type`, `timestamp`, `replica`, "
            "`severity` and `id: <EVENTS stream sequence>`.",
            "content": {SSE_MEDIA_TYPE: {"schema": {"type": "string"}}},
        },
        **problem_responses(401, 403, 422, 503),
    },
)
async def pending_stream(
    request: Request,
    approvals: ApprovalsDep,
    log_: EventsDep,
    hub: FlowHubDep,
    settings: SettingsDep,
    last_event_id: LastEventIdQuery = None,
    last_event_id_header: LastEventIdHeader = None,
) -> EventSourceResponse:
    raw = last_event_id_header or last_event_id
    resume: int | None = None
    if raw:
        text = raw.strip()
        if not text.isdigit() or len(text) > 20:
            raise ApiError(
                422,
                "VALIDATION_ERROR",
                f"invalid Last-Event-ID {raw[:80]!r}",
                errors=[
                    FieldError(
                        field="header.last-event-id",
                        message="expected a stream sequence as sent in an id: line",
                        type="value_error",
                    )
                ],
            )
        resume = int(text)
    # the stream's end before the snapshot: nothing stored after it is missed
    bounds = await log_.bounds()
    first, last = bounds if bounds is not None else (1, 0)
    after = last
    if resume is not None and first - 1 <= resume <= last:
        after = resume  # what happened since; an id the stream no longer holds: snapshot only
    found = await approvals.pending()
    return sse_response(
        request, pending_events(approvals, log_, found, after, hub), settings.api_sse_heartbeat
    )


# -- decisions --------------------------------------------------------------------------------
def _phase_of(approval_id: str) -> str | None:
    """The phase an approval id names (``<flow id>-request|response``), if it names one."""
    suffix = approval_id.rsplit("-", 1)[-1]
    return suffix if suffix in ("request", "response") else None


async def _decide(
    request: Request,
    approvals: Approvals,
    action: str,
    decision: Decision,
) -> tuple[DecisionResult, PendingApproval]:
    audit.note(request, action, approval=decision.id, decision=decision.decision)
    done = await approvals.decide(decision)
    audit.note(
        request,
        action,
        approval=decision.id,
        decision=decision.decision,
        flow=done.approval.flow_id,
        replica=done.replica,
        rule=done.approval.rule,
    )
    result = DecisionResult(
        id=decision.id, decision=decision.decision, replica=done.replica, approval=done.approval
    )
    return result, done.approval


@router.post(
    "/pending/{approval_id}/approve",
    summary="Let the exchange pass, and cache the approval for its rule, method and URL",
    description="The holding replica releases the exchange; then a cached approval is "
    "written (KV `fleet_approvals`) so later exchanges of the same rule, method and URL "
    "pass without being held until it expires (body `ttl_s`, 1 s to 7 days, default "
    f"`FLEET_API_APPROVAL_TTL`). {_KEY_DOC}",
    responses=_decision_responses(),
    openapi_extra={**_body_doc(ApproveBody), **audit.action(APPROVE_ACTION)},
)
async def approve(
    request: Request,
    approval_id: ApprovalId,
    approvals: ApprovalsDep,
    caller: CallerDep,
    settings: SettingsDep,
) -> DecisionResult:
    audit.note(request, APPROVE_ACTION, approval=approval_id, decision="approve")
    body = await read_json(request, ApproveBody) or ApproveBody()
    ttl = body.ttl_s if body.ttl_s is not None else settings.api_approval_ttl
    decision = Decision(
        id=approval_id, decision="approve", by=caller.key_id, status=None, body=None
    )
    result, held = await _decide(request, approvals, APPROVE_ACTION, decision)
    try:
        entry = await approvals.cache(held, caller.key_id, ttl)
    except Exception as exc:  # released already: say so rather than fail the call
        log.warning("approval %s: the cached approval was not written: %r", approval_id, exc)
        request.state.audit["cache_error"] = type(exc).__name__
        return result
    result.cached = CachedEntry.of(entry, time.time())
    request.state.audit["cached_until"] = entry.expires_at
    return result


@router.post(
    "/pending/{approval_id}/allow-once",
    summary="Let the exchange pass this once (nothing cached)",
    responses=_decision_responses(),
    openapi_extra={**_body_doc(AllowOnceBody), **audit.action(ALLOW_ONCE_ACTION)},
)
async def allow_once(
    request: Request, approval_id: ApprovalId, approvals: ApprovalsDep, caller: CallerDep
) -> DecisionResult:
    audit.note(request, ALLOW_ONCE_ACTION, approval=approval_id, decision="allow_once")
    await read_json(request, AllowOnceBody)
    decision = Decision(
        id=approval_id, decision="allow_once", by=caller.key_id, status=None, body=None
    )
    result, _ = await _decide(request, approvals, ALLOW_ONCE_ACTION, decision)
    return result


@router.post(
    "/pending/{approval_id}/deny",
    summary="Refuse the exchange: the client gets an error answer (status and body optional)",
    responses=_decision_responses(),
    openapi_extra={**_body_doc(DenyBody), **audit.action(DENY_ACTION)},
)
async def deny(
    request: Request, approval_id: ApprovalId, approvals: ApprovalsDep, caller: CallerDep
) -> DecisionResult:
    audit.note(request, DENY_ACTION, approval=approval_id, decision="deny")
    body = await read_json(request, DenyBody) or DenyBody()
    decision = Decision(
        id=approval_id, decision="deny", by=caller.key_id, status=body.status, body=body.body
    )
    result, _ = await _decide(request, approvals, DENY_ACTION, decision)
    return result


@router.post(
    "/pending/{approval_id}/modify",
    summary="Let the exchange pass with changes: {request: ...} or {response: ...}",
    description="`request` edits a held request (method, absolute http(s) URL, headers, "
    "body), `response` a held response (status, headers, body); the edit must fit the "
    "phase the exchange is held at (422 `APPROVAL_PHASE_MISMATCH`). Headers replace the "
    "held ones as a whole (names must be tokens, values latin-1 without CR, LF or NUL); "
    "the headers the proxy owns (framing, hop-by-hop) keep their values.",
    responses=_decision_responses(
        _422="Invalid edit (VALIDATION_ERROR, naming the field), an edit of the other phase "
        "(APPROVAL_PHASE_MISMATCH), or one the replica refused (DECISION_REFUSED)"
    ),
    openapi_extra={**_body_doc(ModifyBody, required=True), **audit.action(MODIFY_ACTION)},
)
async def modify(
    request: Request, approval_id: ApprovalId, approvals: ApprovalsDep, caller: CallerDep
) -> DecisionResult:
    audit.note(request, MODIFY_ACTION, approval=approval_id, decision="modify")
    body = await read_json(request, ModifyBody, required=True)
    assert body is not None
    given = "request" if body.request is not None else "response"
    phase = _phase_of(approval_id)
    if phase is not None and phase != given:
        raise ApiError(
            422,
            "APPROVAL_PHASE_MISMATCH",
            f"approval {approval_id} holds a {phase}: edit it with {phase}, not {given}",
            errors=[
                FieldError(
                    field=f"body.{given}",
                    message=f"the exchange is held at the {phase} phase",
                    type="phase_mismatch",
                )
            ],
        )
    decision = Decision(
        id=approval_id,
        decision="modify",
        by=caller.key_id,
        status=None,
        body=None,
        request=None
        if body.request is None
        else RequestEdit(**body.request.model_dump(exclude_none=True)),
        response=None
        if body.response is None
        else ResponseEdit(**body.response.model_dump(exclude_none=True)),
    )
    result, _ = await _decide(request, approvals, MODIFY_ACTION, decision)
    return result


# -- cached approvals -------------------------------------------------------------------------
@router.get(
    "/cached",
    summary="The cached approvals still in force, oldest first",
    description=f"Expired entries are not listed. {_KEY_DOC}",
    responses=problem_responses(401, 403, 422, 503),
)
async def cached_list(approvals: ApprovalsDep) -> CachedList:
    now = time.time()
    return CachedList(
        cached=[CachedEntry.of(entry, now, key) for key, entry in await approvals.cached(now)]
    )


@router.delete(
    "/cached",
    status_code=204,
    summary="Forget every cached approval (exchanges are held again)",
    responses=problem_responses(401, 403, 422, 503),
    openapi_extra=audit.action(PURGE_ACTION),
)
async def cached_purge(request: Request, approvals: ApprovalsDep) -> Response:
    audit.note(request, PURGE_ACTION)
    count = await approvals.forget_all()
    audit.note(request, PURGE_ACTION, purged=count)
    return Response(status_code=204)


@router.delete(
    "/cached/entry",
    status_code=204,
    summary="Forget one cached approval, named by rule, method and URL",
    description=_KEY_DOC,
    responses=problem_responses(
        401, 403, 404, 422, 503, _404="No such cached approval (CACHED_APPROVAL_NOT_FOUND)"
    ),
    openapi_extra=audit.action(FORGET_ACTION),
)
async def cached_forget(
    request: Request,
    approvals: ApprovalsDep,
    rule: Annotated[str, Query(min_length=1, max_length=64, description="the rule id")],
    method: Annotated[
        str,
        Query(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}$", description="e.g. GET"),
    ],
    url: Annotated[
        str,
        Query(
            min_length=1,
            max_length=8192,
            description="the URL; its query string and fragment are ignored",
        ),
    ],
) -> Response:
    where = strip_query(url)  # what identifies the entry (and no query string in the log)
    audit.note(request, FORGET_ACTION, rule=rule, method=method.upper(), url=where)
    key = await approvals.forget(rule, method, url)
    if key is None:
        raise ApiError(
            404,
            "CACHED_APPROVAL_NOT_FOUND",
            f"no cached approval for rule {rule!r}, {method.upper()} {where}",
        )
    audit.note(request, FORGET_ACTION, rule=rule, method=method.upper(), url=where, key=key)
    return Response(status_code=204)
