"""``/api/config``: the hot-reloadable proxy config, versioned by its KV revision.

``GET`` returns ``{revision, config}`` with ``ETag: "<revision>"``. Three writes, all
validated first (422 ``CONFIG_INVALID`` naming each field, nothing written) and
compare-and-set on the revision (``If-Match`` stale -> 412 ``CONFIG_CONFLICT``):
``PUT`` replaces the whole document (fields left out return to their defaults; the
body ``GET`` returned is accepted as is, its revision acting as ``If-Match``),
``PATCH`` merges an RFC 7396 merge patch into the saved document, and
``POST /rollback`` writes an old revision's document as a new revision. Each then
waits briefly for the replicas to report which revision they run, so the caller
learns which applied, rejected (kept their last good config) or are still pending.
``GET /compare`` shows the saved document against what each replica runs.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, Query, Request, Response
from pydantic import BaseModel

from libs.common.models import RuntimeConfig
from services.api import audit, merge_patch
from services.api.config_compare import ConfigComparison, compare
from services.api.deps import ConfigDep, FleetDep, SettingsDep
from services.api.document_write import (
    RollbackRequest,
    Rollout,
    Written,
    compare_and_set,
    etag,
    if_match_allows,
    json_object,
    put_document,
    read_body,
    roll_out,
    stored_object,
    stored_revision,
    validate,
)
from services.api.documents import CONFIG
from services.api.errors import ApiError, problem_responses
from services.api.fleet import Fleet

router = APIRouter(prefix="/config", tags=["config"])

__all__ = ["MAX_DOCUMENT", "etag", "if_match_allows", "router"]

MAX_DOCUMENT = CONFIG.max_body

MERGE_PATCH = "application/merge-patch+json"
_PATCH_TYPES = frozenset({MERGE_PATCH, "application/json"})

PUT_ACTION = "config.put"
PATCH_ACTION = "config.patch"
ROLLBACK_ACTION = "config.rollback"


class ConfigView(BaseModel):
    """The document in force; revision 0 (and the defaults) when none was ever written."""

    revision: int
    config: RuntimeConfig


class ConfigWriteResult(Rollout, ConfigView):
    """The new revision and how the roll-out went within the API's wait."""


class HistoryEntry(BaseModel):
    revision: int
    time: datetime | None
    operation: Literal["put", "delete"]
    config: dict[str, Any] | None


class ConfigHistory(BaseModel):
    """Past revisions of the config, newest first (the bucket keeps the last 64)."""

    revisions: list[HistoryEntry]


_ETAG_HEADER: dict[int | str, dict[str, Any]] = {
    200: {
        "headers": {
            "ETag": {
                "description": 'the revision, quoted ("12"); send it back as If-Match',
                "schema": {"type": "string"},
            }
        }
    }
}

IfMatch = Annotated[
    str | None, Header(description='"<revision>" from GET (the ETag); stale -> 412')
]

_DOCUMENT_SCHEMA = RuntimeConfig.model_json_schema()
_PATCH_SCHEMA = {"type": "object", "description": "fields to change; null = back to the default"}
_ENVELOPE_SCHEMA = {
    "title": "ConfigView",
    "type": "object",
    "description": "the body GET returned; revision is then a precondition like If-Match",
    "properties": {
        "revision": {"type": "integer", "minimum": 0},
        "config": _DOCUMENT_SCHEMA,
    },
    "required": ["config"],
    "additionalProperties": False,
}


@router.get(
    "",
    summary="The runtime config document and its revision (ETag)",
    responses=_ETAG_HEADER | problem_responses(401, 403, 502, 503),
)
async def get_config(config: ConfigDep, response: Response) -> ConfigView:
    doc, revision = await config.current()
    response.headers["ETag"] = etag(revision)
    return ConfigView(revision=revision, config=doc)


@router.put(
    "",
    summary="Replace the whole runtime config (hot reload on every replica)",
    description="PUT replaces the whole document: a field left out returns to its "
    "default. The body is the document, or exactly what GET returned "
    "(`{revision, config}`); that revision is then checked like `If-Match` (stale: "
    "412), and an `If-Match` that names another revision is a 422. To change some "
    "fields only, use PATCH.",
    responses=_ETAG_HEADER
    | problem_responses(
        401,
        403,
        412,
        413,
        422,
        503,
        _413="Document too large",
        _422="Invalid document (CONFIG_INVALID); nothing was written",
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"oneOf": [_DOCUMENT_SCHEMA, _ENVELOPE_SCHEMA]}}
            },
        },
        **audit.action(PUT_ACTION),
    },
)
async def put_config(
    request: Request,
    response: Response,
    config: ConfigDep,
    fleet: FleetDep,
    settings: SettingsDep,
    if_match: IfMatch = None,
) -> ConfigWriteResult:
    audit.note(request, PUT_ACTION)
    doc, revision = put_document(CONFIG, json_object(await read_body(request, CONFIG), CONFIG))
    written = await compare_and_set(
        config, lambda _rev, _raw: doc, if_match=if_match, revision=revision
    )
    return await _rolled_out(
        request, response, fleet, settings.api_config_apply_wait, PUT_ACTION, written
    )


@router.patch(
    "",
    summary="Change some fields of the runtime config (RFC 7396 JSON merge patch)",
    description="The body is a JSON merge patch (`application/merge-patch+json`; "
    "`application/json` is accepted too) applied to the saved document: a member "
    "replaces that field, `null` returns it to its default, fields not named keep their "
    "saved value. The result is validated exactly like PUT (422 names the field; the "
    "saved document stays). Without `If-Match`, a write that lands meanwhile is merged "
    "into, not overwritten.",
    responses=_ETAG_HEADER
    | problem_responses(
        401,
        403,
        412,
        413,
        415,
        422,
        503,
        _413="Patch too large",
        _415="Not application/merge-patch+json or application/json",
        _422="Not a JSON object, or the patched document is invalid (CONFIG_INVALID)",
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                media: {"schema": _PATCH_SCHEMA} for media in (MERGE_PATCH, "application/json")
            },
        },
        **audit.action(PATCH_ACTION),
    },
)
async def patch_config(
    request: Request,
    response: Response,
    config: ConfigDep,
    fleet: FleetDep,
    settings: SettingsDep,
    if_match: IfMatch = None,
) -> ConfigWriteResult:
    audit.note(request, PATCH_ACTION)
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media not in _PATCH_TYPES:
        raise ApiError(
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            f"a config patch is {MERGE_PATCH} (or application/json), not {media or 'untyped'}",
            headers={"Accept-Patch": MERGE_PATCH},
        )
    patch = json_object(
        await read_body(request, CONFIG), CONFIG, "a merge patch must be a JSON object"
    )

    def build(_revision: int, raw: bytes | None) -> RuntimeConfig:
        return validate(CONFIG, merge_patch.apply(stored_object(raw), patch))

    written = await compare_and_set(config, build, if_match=if_match)
    return await _rolled_out(
        request,
        response,
        fleet,
        settings.api_config_apply_wait,
        PATCH_ACTION,
        written,
        fields=sorted(patch),
    )


@router.post(
    "/rollback",
    summary="Make an earlier revision's document current again (as a new revision)",
    description="Writes the document of `revision` (see GET /history) as a new "
    "revision; the history is never rewritten. Honours `If-Match`.",
    responses=_ETAG_HEADER
    | problem_responses(
        401,
        403,
        404,
        412,
        422,
        503,
        _404="No such revision in the history (CONFIG_REVISION_NOT_FOUND)",
        _422="Invalid body, or that revision is not a valid config (CONFIG_INVALID)",
    ),
    openapi_extra=audit.action(ROLLBACK_ACTION),
)
async def rollback_config(
    request: Request,
    response: Response,
    body: Annotated[RollbackRequest, Body()],
    config: ConfigDep,
    fleet: FleetDep,
    settings: SettingsDep,
    if_match: IfMatch = None,
) -> ConfigWriteResult:
    audit.note(request, ROLLBACK_ACTION, to=body.revision)
    doc = await stored_revision(config, body.revision)
    written = await compare_and_set(config, lambda _rev, _raw: doc, if_match=if_match)
    return await _rolled_out(
        request,
        response,
        fleet,
        settings.api_config_apply_wait,
        ROLLBACK_ACTION,
        written,
        to=body.revision,
    )


@router.get(
    "/compare",
    summary="The saved config against what each replica runs, field by field",
    responses=problem_responses(401, 403, 422, 502, 503),
)
async def compare_config(config: ConfigDep, fleet: FleetDep) -> ConfigComparison:
    doc, revision = await config.current()
    return await compare(config, doc, revision, await fleet.replicas())


@router.get(
    "/history",
    summary="Past revisions of the config, newest first",
    responses=problem_responses(401, 403, 422, 503),
)
async def config_history(
    config: ConfigDep, limit: Annotated[int, Query(ge=1, le=64)] = 64
) -> ConfigHistory:
    revisions = await config.history(limit)
    return ConfigHistory(
        revisions=[
            HistoryEntry(revision=r.revision, time=r.time, operation=r.operation, config=r.document)
            for r in revisions
        ]
    )


async def _rolled_out(
    request: Request,
    response: Response,
    fleet: Fleet,
    wait: float,
    action: str,
    written: Written[RuntimeConfig],
    **details: Any,
) -> ConfigWriteResult:
    """Wait for the replicas' reports, audit the write, answer with the roll-out."""
    rollout = await roll_out(request, response, fleet, wait, action, written, CONFIG, **details)
    return ConfigWriteResult(revision=written.after, config=written.doc, **dict(rollout))
