"""Writing a revisioned document (the config, the policy): reading and validating
bodies, preconditions, the compare-and-set loop every write shares, rollback's source
revision, and the roll-out report a write answers with.

Every write goes through ``compare_and_set``: read the current revision, check the
caller's preconditions against it (``If-Match``, or the revision of a body that came
from ``GET``), build the new document from the current one (a PUT ignores it, a PATCH
merges into it, a rule write edits one rule of it, a rollback copies an old revision),
validate, and write only if the key is still at that revision. Without a precondition
a lost race is retried with the newer document, so a PATCH or a rule write never undoes
a write that landed meanwhile; with one, it is the 412 the caller asked for.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic

import orjson
from fastapi import Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from services.api import audit
from services.api.documents import MAX_REVISION, DocumentKind, DocumentStore, M, RevisionConflict
from services.api.errors import ApiError, FieldError, field_errors
from services.api.fleet import Fleet

_WRITE_ATTEMPTS = 10  # a write without a precondition retries its compare-and-set this often


@dataclass(frozen=True)
class Written(Generic[M]):
    """The outcome of a write: the revision it replaced, the new one, the document."""

    before: int
    after: int
    doc: M


# (current revision, its raw document or None) -> the document to write
Build = Callable[[int, bytes | None], M]


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


def conflict(kind: DocumentKind[Any], detail: str, current: int) -> ApiError:
    return ApiError(412, kind.error("CONFLICT"), detail, headers={"ETag": etag(current)})


def invalid(kind: DocumentKind[Any], errors: list[FieldError]) -> ApiError:
    names = ", ".join(dict.fromkeys(e.field for e in errors))
    return ApiError(422, kind.error("INVALID"), f"invalid {kind.name}: {names}", errors=errors)


async def read_body(request: Request, kind: DocumentKind[Any]) -> bytes:
    """The request body, refusing more than ``kind.max_body`` bytes without buffering them."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > kind.max_body:
            raise ApiError(
                413,
                "PAYLOAD_TOO_LARGE",
                f"a {kind.name} request body is at most {kind.max_body} bytes",
            )
        chunks.append(chunk)
    return b"".join(chunks)


def json_object(
    raw: bytes, kind: DocumentKind[Any], what: str = "must be a JSON object"
) -> dict[str, Any]:
    """The body as a JSON object, or 422 ``<CODE>_INVALID`` on ``body``."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid(
            kind, [FieldError(field="body", message=f"not JSON: {exc}", type="json_invalid")]
        ) from None
    if not isinstance(data, dict):
        raise invalid(kind, [FieldError(field="body", message=what, type="model_type")])
    return data


def validate_as(kind: DocumentKind[Any], model: type[BaseModel], data: Any, prefix: str) -> Any:
    """``data`` as ``model`` (the document or a part of it), or 422 ``<CODE>_INVALID``
    naming each bad field under ``prefix``."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid(kind, field_errors(exc.errors(), prefix=prefix)) from None


def validate(kind: DocumentKind[M], data: dict[str, Any], prefix: str = "body") -> M:
    """``data`` as the document, or 422 ``<CODE>_INVALID`` naming each bad field."""
    doc: M = validate_as(kind, kind.model, data, prefix)
    return doc


def put_document(kind: DocumentKind[M], data: dict[str, Any]) -> tuple[M, int | None]:
    """A PUT body: the document itself, or GET's ``{revision, <name>}`` (then the
    revision is a precondition). Neither ``revision`` nor the name is a field of a
    document, so the two shapes cannot be confused."""
    if kind.name not in data and "revision" not in data:
        return validate(kind, data), None
    envelope = validate_as(kind, kind.envelope, data, "body")
    revision: int | None = envelope.revision
    return validate(kind, getattr(envelope, kind.name), prefix=f"body.{kind.name}"), revision


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
    store: DocumentStore[M], build: Build[M], *, if_match: str | None, revision: int | None = None
) -> Written[M]:
    """Write what ``build`` makes of the current document, compare-and-set.

    ``if_match`` (the header) and ``revision`` (from a body) must both hold against
    the current revision, else 412 ``<CODE>_CONFLICT``; ``build``'s own errors (404,
    409, 422) pass through before anything is written.
    """
    kind = store.kind
    check_preconditions_agree(if_match, revision)
    guarded = if_match is not None or revision is not None
    current = 0
    for attempt in range(_WRITE_ATTEMPTS):
        current, raw = await store.current_revision()
        if if_match is not None and not if_match_allows(if_match, current):
            raise conflict(
                kind, f"If-Match {if_match} does not match the current revision {current}", current
            )
        if revision is not None and revision != current:
            raise conflict(
                kind,
                f"revision {revision} in the body is not the current revision {current}",
                current,
            )
        doc = build(current, raw)
        try:
            return Written(before=current, after=await store.write(doc, last=current), doc=doc)
        except RevisionConflict:
            if guarded:
                latest, _raw = await store.current_revision()
                raise conflict(
                    kind, f"the {kind.name} changed while this write was made", latest
                ) from None
            await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))  # let the winner finish
    raise conflict(kind, f"the {kind.name} kept changing; read it again and retry", current)


async def stored_revision(store: DocumentStore[M], revision: int) -> M:
    """The document written at ``revision`` (a rollback's source): 404
    ``<CODE>_REVISION_NOT_FOUND`` when it is not a write of the key in the history,
    422 ``<CODE>_INVALID`` on ``body.revision`` when it is not a valid document."""
    kind = store.kind
    raw = await store.raw_at(revision)
    if raw is None:
        raise ApiError(
            404,
            kind.error("REVISION_NOT_FOUND"),
            f"revision {revision} is not a write of the {kind.name} in the history "
            f"(the bucket keeps the last 64 writes; see GET /api/{kind.name}/history)",
        )
    try:
        return kind.model.model_validate_json(raw)
    except ValidationError as exc:
        names = ", ".join(dict.fromkeys(".".join(map(str, e["loc"])) for e in exc.errors()))
        message = f"revision {revision} is not a valid {kind.name} ({names or 'not an object'})"
        raise ApiError(
            422,
            kind.error("INVALID"),
            message,
            errors=[
                FieldError(field="body.revision", message=message, type=f"{kind.name}_invalid")
            ],
        ) from None


class RollbackRequest(BaseModel):
    """Which past revision's document to make current again."""

    model_config = ConfigDict(extra="forbid")

    revision: StrictInt = Field(ge=1, le=MAX_REVISION, description="from GET /history")


class Rejection(BaseModel):
    id: str
    error: str


class Rollout(BaseModel):
    """How the roll-out of a write went within the API's wait."""

    applied: list[str] = Field(description="replicas that run this revision (or a later one)")
    pending: list[str] = Field(description="replicas that had not reported it yet")
    rejected: list[Rejection] = Field(description="replicas that refused it (kept the last good)")


async def roll_out(
    request: Request,
    response: Response,
    fleet: Fleet,
    wait: float,
    action: str,
    written: Written[Any],
    kind: DocumentKind[Any],
    **details: Any,
) -> Rollout:
    """Wait for the replicas' reports, audit the write, set the ETag; the roll-out."""
    report = await fleet.wait_applied(written.after, wait, kind.reported)
    audit.note(
        request,
        action,
        before=written.before,
        after=written.after,
        applied=report.applied,
        pending=report.pending,
        rejected=[r["id"] for r in report.rejected],
        **details,
    )
    response.headers["ETag"] = etag(written.after)
    return Rollout(
        applied=report.applied,
        pending=report.pending,
        rejected=[Rejection(**r) for r in report.rejected],
    )
