"""Writing the config document: reading and validating bodies, preconditions, and the
compare-and-set loop that PUT, PATCH and rollback share.

Every write goes through ``compare_and_set``: read the current revision, check the
caller's preconditions against it (``If-Match``, or the revision of a body that came
from ``GET``), build the new document from the current one (PUT ignores it, PATCH
merges into it, rollback copies an old revision), validate, and write only if the key
is still at that revision. Without a precondition a lost race is retried with the
newer document, so a PATCH never undoes a write that landed meanwhile; with one, it
is the 412 the caller asked for.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from libs.common.models import RuntimeConfig
from services.api.config_store import ConfigStore, RevisionConflict
from services.api.errors import ApiError, FieldError, field_errors

MAX_DOCUMENT = 256 * 1024
_WRITE_ATTEMPTS = 10  # a write without a precondition retries its compare-and-set this often


class ConfigEnvelope(BaseModel):
    """What ``GET /api/config`` returns, accepted back by ``PUT``: the revision it was
    read at (the precondition, like ``If-Match``) and the whole document."""

    model_config = ConfigDict(extra="forbid")

    revision: StrictInt | None = Field(
        None, ge=0, le=2**63 - 1, description="the revision read; stale -> 412"
    )
    config: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Written:
    """The outcome of a write: the revision it replaced, the new one, the document."""

    before: int
    after: int
    doc: RuntimeConfig


# (current revision, its raw document or None) -> the document to write
Build = Callable[[int, bytes | None], RuntimeConfig]


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


def conflict(detail: str, current: int) -> ApiError:
    return ApiError(412, "CONFIG_CONFLICT", detail, headers={"ETag": etag(current)})


def invalid(errors: list[FieldError]) -> ApiError:
    names = ", ".join(dict.fromkeys(e.field for e in errors))
    return ApiError(422, "CONFIG_INVALID", f"invalid config: {names}", errors=errors)


async def read_body(request: Request) -> bytes:
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


def json_object(raw: bytes, what: str = "must be a JSON object") -> dict[str, Any]:
    """The body as a JSON object, or 422 ``CONFIG_INVALID`` on ``body``."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(
            [FieldError(field="body", message=f"not JSON: {exc}", type="json_invalid")]
        ) from None
    if not isinstance(data, dict):
        raise invalid([FieldError(field="body", message=what, type="model_type")])
    return data


def validate(data: dict[str, Any], prefix: str = "body") -> RuntimeConfig:
    """``data`` as a ``RuntimeConfig``, or 422 ``CONFIG_INVALID`` naming each bad field."""
    try:
        return RuntimeConfig.model_validate(data)
    except ValidationError as exc:
        raise invalid(field_errors(exc.errors(), prefix=prefix)) from None


def put_document(data: dict[str, Any]) -> tuple[RuntimeConfig, int | None]:
    """A PUT body: the document itself, or GET's ``{revision, config}`` (then the
    revision is a precondition). ``config`` and ``revision`` are no config fields, so
    the two shapes cannot be confused."""
    if "config" not in data and "revision" not in data:
        return validate(data), None
    try:
        envelope = ConfigEnvelope.model_validate(data)
    except ValidationError as exc:
        raise invalid(field_errors(exc.errors(), prefix="body")) from None
    return validate(envelope.config, prefix="body.config"), envelope.revision


def stored_object(raw: bytes | None) -> dict[str, Any]:
    """The saved document as JSON (``{}``: nothing saved, or not an object)."""
    if raw is None:
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def check_preconditions_agree(if_match: str | None, revision: int | None) -> None:
    """422 when If-Match and the body's revision can never both hold (a client bug:
    retrying after a fresh GET would not help, so it is not a 412)."""
    if if_match is None or revision is None or if_match_allows(if_match, revision):
        return
    message = f"If-Match {if_match} and the body's revision {revision} disagree; send one"
    raise ApiError(
        422,
        "VALIDATION_ERROR",
        message,
        errors=[
            FieldError(field="header.If-Match", message=message, type="precondition_mismatch"),
            FieldError(field="body.revision", message=message, type="precondition_mismatch"),
        ],
    )


async def compare_and_set(
    config: ConfigStore, build: Build, *, if_match: str | None, revision: int | None = None
) -> Written:
    """Write what ``build`` makes of the current document, compare-and-set.

    ``if_match`` (the header) and ``revision`` (from a body) must both hold against
    the current revision, else 412 ``CONFIG_CONFLICT``; ``build``'s own errors (422)
    pass through before anything is written.
    """
    check_preconditions_agree(if_match, revision)
    guarded = if_match is not None or revision is not None
    current = 0
    for attempt in range(_WRITE_ATTEMPTS):
        current, raw = await config.current_revision()
        if if_match is not None and not if_match_allows(if_match, current):
            raise conflict(
                f"If-Match {if_match} does not match the current revision {current}", current
            )
        if revision is not None and revision != current:
            raise conflict(
                f"revision {revision} in the body is not the current revision {current}", current
            )
        doc = build(current, raw)
        try:
            return Written(before=current, after=await config.write(doc, last=current), doc=doc)
        except RevisionConflict:
            if guarded:
                latest, _raw = await config.current_revision()
                raise conflict("the config changed while this write was made", latest) from None
            await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))  # let the winner finish
    raise conflict("the config kept changing; read it again and retry", current)
