"""The query parameters of ``GET /api/flows``, validated into a ``FlowQuery``.

The API checks everything a user can get wrong before the store sees it, so a
bad parameter is a 422 that names it (``query.since``) rather than a store
round trip. Times are accepted as ISO-8601 (``2025-01-31T12:00:00Z``; no zone
means UTC) or as epoch seconds, and travel to the store as epoch seconds.

The listing is the API's hot path, so the parameters are validated with one
``model_validate`` of the query string (``flow_list_params``) rather than
FastAPI's query-model machinery, which costs several times more per request;
``openapi_parameters`` documents them for OpenAPI instead.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from libs.common.flowfilter import FilterError
from libs.common.flowfilter import parse as parse_filter
from libs.common.models import FlowQuery
from services.api.errors import ApiError, FieldError

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def parse_time(value: Any) -> Any:
    """ISO-8601 or epoch seconds -> epoch seconds (other types are left to pydantic)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if _NUMBER.match(text):
        seconds = float(text)
    else:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError("expected ISO-8601 (2025-01-31T12:00:00Z) or epoch seconds") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        seconds = moment.timestamp()
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("must be a time after 1970-01-01")
    return seconds


Timestamp = Annotated[
    float,
    BeforeValidator(parse_time),
    WithJsonSchema(
        {
            "anyOf": [{"type": "string", "format": "date-time"}, {"type": "number"}],
            "description": "ISO-8601 (no zone = UTC) or epoch seconds",
        }
    ),
]


class FlowListParams(FlowQuery):
    """``FlowQuery`` as query parameters; unknown parameters are rejected, not ignored."""

    since: Timestamp | None = Field(default=None, description="flows started at or after this time")
    until: Timestamp | None = Field(default=None, description="flows started before this time")
    host: str | None = Field(
        None, max_length=253, description="exact host, or a leading glob: *.example.com"
    )

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip().lower()
        if not v:
            raise ValueError("must not be empty")
        if "*" in v:
            suffix = v[2:]
            if not v.startswith("*.") or not suffix or "*" in suffix or suffix.startswith("."):
                raise ValueError("only an exact host or a leading '*.' glob (*.example.com)")
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip().upper()
        if not v or not v.isascii() or not v.replace("-", "").replace("_", "").isalnum():
            raise ValueError("must be an HTTP method token such as GET")
        return v

    # Range checks sit on the second field of each pair so the error names it.
    @field_validator("max_status")
    @classmethod
    def _status_range(cls, v: int | None, info: ValidationInfo) -> int | None:
        lo = info.data.get("min_status")
        if v is not None and lo is not None and lo > v:
            raise ValueError(f"must not be below min_status ({v} < {lo})")
        return v

    @field_validator("until")
    @classmethod
    def _time_range(cls, v: float | None, info: ValidationInfo) -> float | None:
        since = info.data.get("since")
        if v is not None and since is not None and since > v:
            raise ValueError("must not be before since")
        return v

    def to_query(self) -> FlowQuery:
        return FlowQuery.model_validate(self.model_dump())


M = TypeVar("M", bound=BaseModel)


def validate_query(model: type[M], query: dict[str, Any]) -> M:
    """``query`` validated as ``model``; errors are 422s naming ``query.<param>``."""
    try:
        return model.model_validate(query)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("query", *err["loc"])} for err in exc.errors()]
        ) from None


def check_filter(q: str | None) -> None:
    """A ``q`` that does not parse is a 422 ``BAD_FILTER`` naming its position and what
    would fit there (checked here so the store is not asked; it checks again)."""
    if q is None:
        return
    try:
        parse_filter(q)
    except FilterError as exc:
        raise ApiError(
            422,
            "BAD_FILTER",
            exc.message,
            errors=[
                FieldError(
                    field="query.q",
                    message=exc.message,
                    type="bad_filter",
                    position=exc.position,
                    expected=exc.expected,
                )
            ],
        ) from None


async def flow_list_params(request: Request) -> FlowListParams:
    """The listing's query string, validated; errors are 422s naming ``query.<param>``."""
    params = validate_query(FlowListParams, dict(request.query_params))
    check_filter(params.q)
    return params


# Listing-only parameters: a live stream has no page, and its time is "from now on".
STREAM_EXCLUDED = ("since", "until", "limit", "cursor")


async def flow_stream_params(request: Request) -> FlowListParams:
    """The filters of ``GET /api/flows/stream``: the listing's, less paging and time range."""
    query = dict(request.query_params)
    query.pop("last_event_id", None)  # read by the route (Last-Event-ID as a parameter)
    bad = [name for name in STREAM_EXCLUDED if name in query]
    if bad:
        raise RequestValidationError(
            [
                {
                    "loc": ("query", name),
                    "msg": "not supported on the live stream (use Last-Event-ID to resume)",
                    "type": "extra_forbidden",
                }
                for name in bad
            ]
        )
    params = validate_query(FlowListParams, query)
    check_filter(params.q)
    return params


def openapi_parameters(
    model: type[BaseModel] = FlowListParams, exclude: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """OpenAPI parameter objects for ``model``'s fields (all optional, in the query)."""
    out = []
    for name, prop in model.model_json_schema()["properties"].items():
        if name in exclude:
            continue
        schema = dict(prop)
        description = schema.pop("description", None)
        variants = [v for v in schema.pop("anyOf", []) if v != {"type": "null"}]
        if len(variants) == 1:
            schema.update(variants[0])
            description = description or schema.pop("description", None)
        elif variants:
            schema["anyOf"] = variants
        if schema.get("default", 0) is None:
            del schema["default"]
        param: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": schema}
        if description:
            param["description"] = description
        out.append(param)
    return out
