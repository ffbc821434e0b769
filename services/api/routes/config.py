"""``/api/config``: the hot-reloadable proxy config, versioned by its KV revision.

``GET`` returns the document with ``ETag: "<revision>"``; ``PUT`` replaces
the whole document, validated first (422 ``CONFIG_INVALID`` and nothing
written), compare-and-set on the revision (``If-Match`` stale -> 412
``CONFIG_CONFLICT``), then waits briefly for the replicas to report which
revision they run, so the caller learns which applied, rejected (kept their
last good config) or are still pending.
"""

from __future__ import annotations

import asyncio
import random
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import BaseModel, Field, ValidationError

from libs.common.models import RuntimeConfig
from services.api import audit
from services.api.config_store import RevisionConflict
from services.api.deps import ConfigDep, FleetDep, SettingsDep
from services.api.errors import ApiError, FieldError, field_errors, problem_responses

router = APIRouter(prefix="/config", tags=["config"])

MAX_DOCUMENT = 256 * 1024
_WRITE_ATTEMPTS = 10  # a write without If-Match retries its compare-and-set this often


class ConfigView(BaseModel):
    """The document in force; revision 0 (and the defaults) when none was ever written."""

    revision: int
    config: RuntimeConfig


class Rejection(BaseModel):
    id: str
    error: str


class ConfigWriteResult(ConfigView):
    """The new revision and how the roll-out went within the API's wait."""

    applied: list[str] = Field(description="replicas that run this revision (or a later one)")
    pending: list[str] = Field(description="replicas that had not reported it yet")
    rejected: list[Rejection] = Field(description="replicas that refused it (kept the last good)")


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


def etag(revision: int) -> str:
    return f'"{revision}"'


def if_match_allows(header: str, revision: int) -> bool:
    """RFC 9110 If-Match against the current revision (0 = no document yet)."""
    value = header.strip()
    if value == "*":
        return revision > 0
    for tag in value.split(","):
        tag = tag.strip().removeprefix("W/").strip('"')
        if tag.isdigit() and int(tag) == revision:
            return True
    return False


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
    summary="Replace the runtime config (hot reload on every replica)",
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
            "content": {"application/json": {"schema": RuntimeConfig.model_json_schema()}},
        }
    },
)
async def put_config(
    request: Request,
    response: Response,
    config: ConfigDep,
    fleet: FleetDep,
    settings: SettingsDep,
    if_match: Annotated[
        str | None, Header(description='"<revision>" from GET; stale -> 412')
    ] = None,
) -> ConfigWriteResult:
    audit.note(request, "config.put")
    doc = _validate(await _read_body(request))
    revision = 0
    for attempt in range(_WRITE_ATTEMPTS):
        current, _raw = await config.current_revision()
        if if_match is not None and not if_match_allows(if_match, current):
            raise _conflict(
                f"If-Match {if_match} does not match the current revision {current}", current
            )
        try:
            revision = await config.write(doc, last=current)
            break
        except RevisionConflict:
            if if_match is not None:
                latest, _raw = await config.current_revision()
                raise _conflict("the config changed while this write was made", latest) from None
            await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))  # let the winner finish
    else:
        raise _conflict("the config kept changing; read it again and retry", current)
    report = await fleet.wait_applied(revision, settings.api_config_apply_wait)
    audit.note(
        request,
        "config.put",
        before=current,
        after=revision,
        applied=report.applied,
        pending=report.pending,
        rejected=[r["id"] for r in report.rejected],
    )
    response.headers["ETag"] = etag(revision)
    return ConfigWriteResult(
        revision=revision,
        config=doc,
        applied=report.applied,
        pending=report.pending,
        rejected=[Rejection(**r) for r in report.rejected],
    )


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


def _conflict(detail: str, current: int) -> ApiError:
    return ApiError(412, "CONFIG_CONFLICT", detail, headers={"ETag": etag(current)})


async def _read_body(request: Request) -> bytes:
    """The request body, refusing more than ``MAX_DOCUMENT`` bytes without buffering them."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_DOCUMENT:
            raise ApiError(
                413, "PAYLOAD_TOO_LARGE", f"a config document is at most {MAX_DOCUMENT} bytes"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _invalid(errors: list[FieldError]) -> ApiError:
    names = ", ".join(dict.fromkeys(e.field for e in errors))
    return ApiError(422, "CONFIG_INVALID", f"invalid config: {names}", errors=errors)


def _validate(raw: bytes) -> RuntimeConfig:
    """The body as a ``RuntimeConfig``, or 422 ``CONFIG_INVALID`` naming each bad field."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _invalid(
            [FieldError(field="body", message=f"not JSON: {exc}", type="json_invalid")]
        ) from None
    if not isinstance(data, dict):
        raise _invalid(
            [FieldError(field="body", message="must be a JSON object", type="model_type")]
        )
    try:
        return RuntimeConfig.model_validate(data)
    except ValidationError as exc:
        raise _invalid(field_errors(exc.errors(), prefix="body")) from None
