"""``/api/policy``: the rules policy (``libs.common.policy``), versioned by its KV revision.

The same revisioned document as ``/api/config`` (``services.api.documents``): ``GET``
returns ``{revision, policy}`` with ``ETag: "<revision>"``; ``PUT`` replaces the whole
document; ``/rules`` reads and edits one rule at a time; ``POST /rollback`` writes an
old revision as a new one. Every write is validated with the ``Policy`` model first
(422 ``POLICY_INVALID`` naming each field; a filter's error also gives its
``position``), then compare-and-set on the revision: ``If-Match`` stale -> 412
``POLICY_CONFLICT``; a rule write without it is retried on the newer document, so two
concurrent edits both land. Each then waits for the replicas to report the revision
(``policy_revision``/``policy_error`` in their heartbeat) and says which applied,
rejected (kept their last good policy) or are still pending.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, Path, Query, Request, Response
from pydantic import BaseModel, ValidationError

from libs.common.policy import MAX_RULES, Policy, Rule
from services.api import audit
from services.api.deps import FleetDep, PolicyDep, SettingsDep
from services.api.document_write import (
    RollbackRequest,
    Rollout,
    compare_and_set,
    etag,
    invalid,
    json_object,
    put_document,
    read_body,
    roll_out,
    stored_revision,
    validate_as,
)
from services.api.documents import POLICY
from services.api.errors import ApiError, FieldError, field_errors, problem_responses

router = APIRouter(prefix="/policy", tags=["policy"])

PUT_ACTION = "policy.put"
RULE_CREATE_ACTION = "policy.rule.create"
RULE_UPDATE_ACTION = "policy.rule.update"
RULE_DELETE_ACTION = "policy.rule.delete"
ROLLBACK_ACTION = "policy.rollback"


class PolicyView(BaseModel):
    """The policy in force; revision 0 (and no rules) when none was ever written."""

    revision: int
    policy: Policy


class PolicyWriteResult(Rollout, PolicyView):
    """The new revision, the whole policy, and how the roll-out went."""


class RuleList(BaseModel):
    """The rules in document order (evaluation: priority, then this order)."""

    revision: int
    rules: list[Rule]


class RuleWriteResult(Rollout):
    """The new revision, the rule as saved, and how the roll-out went."""

    revision: int
    rule: Rule


class PolicyHistoryEntry(BaseModel):
    revision: int
    time: datetime | None
    operation: Literal["put", "delete"]
    policy: dict[str, Any] | None


class PolicyHistory(BaseModel):
    """Past revisions of the policy, newest first (the bucket keeps the last 64)."""

    revisions: list[PolicyHistoryEntry]


_ETAG: dict[str, Any] = {
    "ETag": {
        "description": 'the policy revision, quoted ("12"); send it back as If-Match',
        "schema": {"type": "string"},
    }
}
_ETAG_HEADER: dict[int | str, dict[str, Any]] = {200: {"headers": _ETAG}}
_CREATED: dict[int | str, dict[str, Any]] = {201: {"headers": _ETAG}}
_REMOVED: dict[int | str, dict[str, Any]] = {204: {"description": "Removed", "headers": _ETAG}}

IfMatch = Annotated[
    str | None, Header(description='"<revision>" from GET (the ETag); stale -> 412')
]
RuleId = Annotated[str, Path(description="the rule's id", max_length=64)]

_WRITE_ERRORS: dict[str, str] = {
    "_412": "If-Match (or the body's revision) is not the current revision (POLICY_CONFLICT)",
    "_413": f"Body over {POLICY.max_body} bytes (PAYLOAD_TOO_LARGE)",
    "_422": "Invalid rule or policy (POLICY_INVALID, `errors` name each field; a filter's "
    "error has `position` and `expected`); nothing was written",
}
_POLICY_REF = {"$ref": "#/components/schemas/Policy"}
_RULE_REF = {"$ref": "#/components/schemas/Rule"}
_ENVELOPE_SCHEMA = {
    "title": "PolicyView",
    "type": "object",
    "description": "the body GET returned; revision is then a precondition like If-Match",
    "properties": {"revision": {"type": "integer", "minimum": 0}, "policy": _POLICY_REF},
    "required": ["policy"],
    "additionalProperties": False,
}
_RULE_BODY_SCHEMA = {
    "allOf": [_RULE_REF],
    "description": "a rule; `id` may be left out (POST generates one, PUT takes the path's)",
}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _index(rules: list[Rule], rule_id: str) -> int:
    for i, rule in enumerate(rules):
        if rule.id == rule_id:
            return i
    raise ApiError(404, "POLICY_RULE_NOT_FOUND", f"no rule {rule_id!r} in the policy")


def _with_rules(rules: list[Rule]) -> Policy:
    """The policy holding ``rules`` (already valid each): the document's own checks
    (at most ``MAX_RULES``, unique ids) as 422 ``POLICY_INVALID`` on ``policy.rules``."""
    try:
        return Policy(rules=rules)
    except ValidationError as exc:
        raise invalid(POLICY, field_errors(exc.errors(), prefix="policy")) from None


def _rule_body(data: dict[str, Any]) -> Rule:
    rule: Rule = validate_as(POLICY, Rule, data, "body")
    return rule


def _new_id(taken: set[str]) -> str:
    while True:
        candidate = "rule-" + secrets.token_hex(4)
        if candidate not in taken:
            return candidate


# -- the whole document -----------------------------------------------------------------------
@router.get(
    "",
    summary="The rules policy and its revision (ETag)",
    responses=_ETAG_HEADER | problem_responses(401, 403, 502, 503),
)
async def get_policy(policy: PolicyDep, response: Response) -> PolicyView:
    doc, revision = await policy.current()
    response.headers["ETag"] = etag(revision)
    return PolicyView(revision=revision, policy=doc)


@router.put(
    "",
    summary="Replace the whole rules policy (every replica applies it without a restart)",
    description='The body is the policy (`{"rules": [...]}`) or exactly what GET '
    "returned (`{revision, policy}`); that revision is then checked like `If-Match` "
    "(stale: 412). Rule ids must be unique; at most "
    f"{MAX_RULES} rules.",
    responses=_ETAG_HEADER | problem_responses(401, 403, 412, 413, 422, 503, **_WRITE_ERRORS),
    openapi_extra={
        "requestBody": _body({"oneOf": [_POLICY_REF, _ENVELOPE_SCHEMA]}),
        **audit.action(PUT_ACTION),
    },
)
async def put_policy(
    request: Request,
    response: Response,
    policy: PolicyDep,
    fleet: FleetDep,
    settings: SettingsDep,
    if_match: IfMatch = None,
) -> PolicyWriteResult:
    audit.note(request, PUT_ACTION)
    doc, revision = put_document(POLICY, json_object(await read_body(request, POLICY), POLICY))
    written = await compare_and_set(
        policy, lambda _rev, _raw: doc, if_match=if_match, revision=revision
    )
    rollout = await roll_out(
        request, response, fleet, settings.api_config_apply_wait, PUT_ACTION, written, POLICY
    )
    return PolicyWriteResult(revision=written.after, policy=written.doc, **dict(rollout))


# -- rules --------------------------------------------------------------------------------
@router.get(
    "/rules",
    summary="The rules, in document order",
    responses=_ETAG_HEADER | problem_responses(401, 403, 502, 503),
)
async def list_rules(policy: PolicyDep, response: Response) -> RuleList:
    doc, revision = await policy.current()
    response.headers["ETag"] = etag(revision)
    return RuleList(revision=revision, rules=doc.rules)


@router.get(
    "/rules/{rule_id}",
    summary="One rule (ETag: the policy's revision)",
    responses=_ETAG_HEADER
    | problem_responses(401, 403, 404, 502, 503, _404="No such rule (POLICY_RULE_NOT_FOUND)"),
)
async def get_rule(rule_id: RuleId, policy: PolicyDep, response: Response) -> Rule:
    doc, revision = await policy.current()
    rule = doc.rules[_index(doc.rules, rule_id)]
    response.headers["ETag"] = etag(revision)
    return rule


@router.post(
    "/rules",
    status_code=201,
    summary="Add a rule (at the end, or before another one)",
    description="`id` is generated (`rule-` and 8 hex digits) when left out; an id "
    "already in the policy is a 409. `before=<id>` inserts the rule in front of that "
    "one (evaluation order among equal priorities is document order). Without "
    "`If-Match`, a write that lands meanwhile is kept (the add is retried on it).",
    responses=_CREATED
    | problem_responses(
        401,
        403,
        404,
        409,
        412,
        413,
        422,
        503,
        _404="`before` names no rule (POLICY_RULE_NOT_FOUND)",
        _409="A rule with this id exists (POLICY_RULE_DUPLICATE)",
        **_WRITE_ERRORS,
    ),
    openapi_extra={"requestBody": _body(_RULE_BODY_SCHEMA), **audit.action(RULE_CREATE_ACTION)},
)
async def create_rule(
    request: Request,
    response: Response,
    policy: PolicyDep,
    fleet: FleetDep,
    settings: SettingsDep,
    before: Annotated[
        str | None, Query(max_length=64, description="insert before this rule's id")
    ] = None,
    if_match: IfMatch = None,
) -> RuleWriteResult:
    audit.note(request, RULE_CREATE_ACTION)
    data = json_object(await read_body(request, POLICY), POLICY, "a rule must be a JSON object")
    generated = "id" not in data
    rule = _rule_body({"id": _new_id(set()), **data} if generated else data)
    audit.note(request, RULE_CREATE_ACTION, rule=rule.id)

    def build(revision: int, raw: bytes | None) -> Policy:
        nonlocal rule
        rules = list(policy.parse(raw, revision).rules)
        ids = {r.id for r in rules}
        if rule.id in ids:
            if not generated:
                raise ApiError(
                    409, "POLICY_RULE_DUPLICATE", f"a rule with id {rule.id!r} already exists"
                )
            rule = rule.model_copy(update={"id": _new_id(ids)})
        at = len(rules) if before is None else _index(rules, before)
        rules.insert(at, rule)
        return _with_rules(rules)

    written = await compare_and_set(policy, build, if_match=if_match)
    rollout = await roll_out(
        request,
        response,
        fleet,
        settings.api_config_apply_wait,
        RULE_CREATE_ACTION,
        written,
        POLICY,
        rule=rule.id,
    )
    response.headers["Location"] = f"/api/policy/rules/{rule.id}"
    return RuleWriteResult(revision=written.after, rule=rule, **dict(rollout))


@router.put(
    "/rules/{rule_id}",
    summary="Replace one rule (same place in the document)",
    description="The body is the whole rule; its `id`, if given, must be the path's "
    "(422 otherwise: a rule is renamed by deleting and adding it).",
    responses=_ETAG_HEADER
    | problem_responses(
        401,
        403,
        404,
        412,
        413,
        422,
        503,
        _404="No such rule (POLICY_RULE_NOT_FOUND)",
        **_WRITE_ERRORS,
    ),
    openapi_extra={"requestBody": _body(_RULE_BODY_SCHEMA), **audit.action(RULE_UPDATE_ACTION)},
)
async def update_rule(
    rule_id: RuleId,
    request: Request,
    response: Response,
    policy: PolicyDep,
    fleet: FleetDep,
    settings: SettingsDep,
    if_match: IfMatch = None,
) -> RuleWriteResult:
    audit.note(request, RULE_UPDATE_ACTION, rule=rule_id)
    data = json_object(await read_body(request, POLICY), POLICY, "a rule must be a JSON object")
    if "id" in data and data["id"] != rule_id:
        message = f"the body's id {data['id']!r} is not the path's {rule_id!r}"
        raise invalid(POLICY, [FieldError(field="body.id", message=message, type="id_mismatch")])
    rule = _rule_body({**data, "id": rule_id})

    def build(revision: int, raw: bytes | None) -> Policy:
        rules = list(policy.parse(raw, revision).rules)
        rules[_index(rules, rule_id)] = rule
        return _with_rules(rules)

    written = await compare_and_set(policy, build, if_match=if_match)
    rollout = await roll_out(
        request,
        response,
        fleet,
        settings.api_config_apply_wait,
        RULE_UPDATE_ACTION,
        written,
        POLICY,
        rule=rule_id,
    )
    return RuleWriteResult(revision=written.after, rule=rule, **dict(rollout))


@router.delete(
    "/rules/{rule_id}",
    status_code=204,
    summary="Remove one rule",
    description="204 once written (after the same wait for the replicas as every write; "
    "the audit record says which applied). `ETag`: the new revision.",
    responses=_REMOVED
    | problem_responses(
        401, 403, 404, 412, 503, _404="No such rule (POLICY_RULE_NOT_FOUND)", **_WRITE_ERRORS
    ),
    openapi_extra=audit.action(RULE_DELETE_ACTION),
)
async def delete_rule(
    rule_id: RuleId,
    request: Request,
    policy: PolicyDep,
    fleet: FleetDep,
    settings: SettingsDep,
    if_match: IfMatch = None,
) -> Response:
    audit.note(request, RULE_DELETE_ACTION, rule=rule_id)

    def build(revision: int, raw: bytes | None) -> Policy:
        rules = list(policy.parse(raw, revision).rules)
        del rules[_index(rules, rule_id)]
        return _with_rules(rules)

    written = await compare_and_set(policy, build, if_match=if_match)
    response = Response(status_code=204)
    await roll_out(
        request,
        response,
        fleet,
        settings.api_config_apply_wait,
        RULE_DELETE_ACTION,
        written,
        POLICY,
        rule=rule_id,
    )
    return response


# -- history and rollback ------------------------------------------------------------------
@router.post(
    "/rollback",
    summary="Make an earlier revision's policy current again (as a new revision)",
    description="Writes the policy of `revision` (see GET /history) as a new revision; "
    "the history is never rewritten. Honours `If-Match`.",
    responses=_ETAG_HEADER
    | problem_responses(
        401,
        403,
        404,
        412,
        422,
        503,
        _404="No such revision in the history (POLICY_REVISION_NOT_FOUND)",
        _412=_WRITE_ERRORS["_412"],
        _422="Invalid body, or that revision is not a valid policy (POLICY_INVALID)",
    ),
    openapi_extra=audit.action(ROLLBACK_ACTION),
)
async def rollback_policy(
    request: Request,
    response: Response,
    body: Annotated[RollbackRequest, Body()],
    policy: PolicyDep,
    fleet: FleetDep,
    settings: SettingsDep,
    if_match: IfMatch = None,
) -> PolicyWriteResult:
    audit.note(request, ROLLBACK_ACTION, to=body.revision)
    doc = await stored_revision(policy, body.revision)
    written = await compare_and_set(policy, lambda _rev, _raw: doc, if_match=if_match)
    rollout = await roll_out(
        request,
        response,
        fleet,
        settings.api_config_apply_wait,
        ROLLBACK_ACTION,
        written,
        POLICY,
        to=body.revision,
    )
    return PolicyWriteResult(revision=written.after, policy=written.doc, **dict(rollout))


@router.get(
    "/history",
    summary="Past revisions of the policy, newest first",
    responses=problem_responses(401, 403, 422, 503),
)
async def policy_history(
    policy: PolicyDep, limit: Annotated[int, Query(ge=1, le=64)] = 64
) -> PolicyHistory:
    revisions = await policy.history(limit)
    return PolicyHistory(
        revisions=[
            PolicyHistoryEntry(
                revision=r.revision, time=r.time, operation=r.operation, policy=r.document
            )
            for r in revisions
        ]
    )
