"""RFC 9457 problem details: the one shape every error of the API has.

A client (or the SaaS control plane) branches on the stable ``code`` and shows
``detail`` to a person; ``errors`` lists field-level problems of a rejected
request. Every way a request can fail ends here: ``ApiError`` raised by a
route, FastAPI's request validation, Starlette's 404/405, a NATS failure that
escaped a route, and any bug (a 500 without a traceback on the wire).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

import nats.errors
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from libs.common.policy import FilterInvalid

log = logging.getLogger("proxyfleet.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"
_PROBLEM_REF = "#/components/schemas/Problem"

# Titles are per code and never change, so a client can show them as is.
_TITLES = {
    "AUTH_REQUIRED": "Authentication required",
    "AUTH_FORBIDDEN": "Not allowed for this key",
    "CSRF_FAILED": "Missing or wrong CSRF token",
    "VALIDATION_ERROR": "Invalid request",
    "BAD_QUERY": "Invalid flow query",
    "BAD_FILTER": "Invalid filter expression",
    "CONFIG_INVALID": "Invalid configuration",
    "CONFIG_CONFLICT": "Configuration changed meanwhile",
    "CONFIG_REVISION_NOT_FOUND": "Config revision not in the history",
    "CONFIG_CORRUPT": "Stored configuration is invalid",
    "POLICY_INVALID": "Invalid rules policy",
    "POLICY_CONFLICT": "Rules policy changed meanwhile",
    "POLICY_REVISION_NOT_FOUND": "Policy revision not in the history",
    "POLICY_RULE_NOT_FOUND": "Rule not found",
    "POLICY_RULE_DUPLICATE": "Rule id already in use",
    "POLICY_CORRUPT": "Stored rules policy is invalid",
    "PAYLOAD_TOO_LARGE": "Request body too large",
    "UNSUPPORTED_MEDIA_TYPE": "Unsupported media type",
    "FLOW_NOT_FOUND": "Flow not found",
    "FLOW_NOT_ACTIVE": "Flow is not active",
    "BODY_NOT_AVAILABLE": "Body not recorded",
    "REPLICA_NOT_FOUND": "Replica not found",
    "NO_REPLICAS": "No replica answered",
    "APPROVAL_NOT_FOUND": "Pending approval not found",
    "APPROVAL_ALREADY_DECIDED": "Approval already resolved",
    "APPROVAL_PHASE_MISMATCH": "Edit does not fit the held phase",
    "DECISION_REFUSED": "The replica refused the decision",
    "CACHED_APPROVAL_NOT_FOUND": "Cached approval not found",
    "REPLICA_ERROR": "Unreadable replica answer",
    "KEY_NOT_FOUND": "API key not found",
    "KEY_STATIC": "API key is configured, not revocable here",
    "KEY_LIMIT": "Too many runtime API keys",
    "STORE_UNAVAILABLE": "Flow store unavailable",
    "STORE_ERROR": "Flow store error",
    "BUS_UNAVAILABLE": "NATS unavailable",
    "CA_NOT_AVAILABLE": "CA certificate not published yet",
    "NOT_READY": "Not ready",
    "NOT_FOUND": "Not found",
    "METHOD_NOT_ALLOWED": "Method not allowed",
    "INTERNAL_ERROR": "Internal error",
}


class FieldError(BaseModel):
    """One problem with one input field."""

    field: str = Field(description="where: query.limit, body.capture_body_limit, path.flow_id")
    message: str
    type: str = Field(description="machine-readable kind, e.g. greater_than_equal, missing")
    position: int | None = Field(
        default=None,
        description="a filter expression's error (BAD_FILTER, a rule's filter in "
        "POLICY_INVALID): 0-based offset in the expression",
    )
    expected: str | None = Field(
        default=None, description="a filter expression's error: what would fit there"
    )


class Problem(BaseModel):
    """An RFC 9457 problem document (``application/problem+json``)."""

    type: str = Field(description="URI identifying the problem type")
    title: str
    status: int
    detail: str
    instance: str = Field(description="the request path")
    code: str = Field(description="stable machine code, e.g. FLOW_NOT_FOUND")
    errors: list[FieldError] | None = Field(default=None, description="field-level details")


class ApiError(Exception):
    """Raised by routes and helpers; becomes one problem response."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        errors: Sequence[FieldError] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})
        self.errors = list(errors) if errors is not None else None


def _status(status: int) -> HTTPStatus | None:
    try:
        return HTTPStatus(status)
    except ValueError:
        return None


def _phrase(status: int) -> str:
    known = _status(status)
    return known.phrase if known is not None else "Error"


def problem_type(code: str) -> str:
    return "urn:proxyfleet:problem:" + code.lower().replace("_", "-")


def problem(
    request: Request,
    status: int,
    code: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    errors: Sequence[FieldError] | None = None,
) -> Response:
    """A problem+json response for ``request``."""
    body: dict[str, Any] = {
        "type": problem_type(code),
        "title": _TITLES.get(code) or _phrase(status),
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        "code": code,
    }
    if errors is not None:
        body["errors"] = [e.model_dump(exclude_none=True) for e in errors]
    return Response(
        orjson.dumps(body), status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE
    )


def field_errors(raw: Iterable[Mapping[str, Any]], prefix: str | None = None) -> list[FieldError]:
    """Pydantic error dicts -> ``FieldError``s named ``query.limit`` / ``body.x``."""
    out = []
    for err in raw:
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] == "body" and err.get("type") == "json_invalid":
            loc = ["body"]  # the second element is a character offset, not a field
        if prefix is not None:
            loc = [prefix, *loc]
        message = str(err.get("msg", "invalid"))
        ctx = err.get("ctx") or {}
        if err.get("type") == "json_invalid" and ctx.get("error"):
            message = f"{message}: {ctx['error']}"
        kind = str(err.get("type", "invalid"))
        position = expected = None
        if isinstance(cause := ctx.get("error"), FilterInvalid):
            # a rule's filter: where in the expression, as BAD_FILTER says it; the phase
            # check is a validator of the rule's match, but it is about the filter
            kind, position, expected = "bad_filter", cause.position, cause.expected
            if not loc or loc[-1] != "filter":
                loc.append("filter")
        out.append(
            FieldError(
                field=".".join(loc) or "request",
                message=message,
                type=kind,
                position=position,
                expected=expected,
            )
        )
    return out


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return problem(
        request, exc.status, exc.code, exc.detail, headers=exc.headers, errors=exc.errors
    )


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = field_errors(exc.errors())
    names = ", ".join(dict.fromkeys(e.field for e in errors))
    return problem(request, 422, "VALIDATION_ERROR", f"invalid {names}", errors=errors)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    if status == 404:
        code, detail = "NOT_FOUND", f"no such resource: {request.url.path}"
    elif status == 405:
        code, detail = "METHOD_NOT_ALLOWED", f"{request.method} is not allowed here"
        allowed = _allowed_methods(request)
        if allowed:
            headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
            return problem(request, status, code, detail, headers=headers)
    else:
        known = _status(status)
        code = known.name if known is not None else "HTTP_ERROR"
        detail = exc.detail if isinstance(exc.detail, str) else _phrase(status)
    return problem(request, status, code, detail, headers=exc.headers)


def _allowed_methods(request: Request) -> list[str]:
    """Every documented method at this path (Starlette's Allow names only one route's)."""
    path = request.url.path
    for template, item in request.app.openapi().get("paths", {}).items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            return sorted(m.upper() for m in item)
    return []


async def _nats_error(request: Request, exc: Exception) -> Response:
    # Routes map the NATS failures they expect; this is the net for the rest.
    log.warning("%s %s: NATS failure %r", request.method, request.url.path, exc)
    return problem(request, 503, "BUS_UNAVAILABLE", f"NATS request failed: {type(exc).__name__}")


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return problem(request, 500, "INTERNAL_ERROR", "unexpected error; see the API's log")


def install_handlers(app: FastAPI) -> None:
    """Route every error through ``problem``."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(nats.errors.Error, _nats_error)
    app.add_exception_handler(Exception, _unexpected)


_DESCRIPTIONS = {
    400: "Bad request",
    401: "Missing or invalid API key (AUTH_REQUIRED)",
    403: "The key's scope does not allow this (AUTH_FORBIDDEN)",
    404: "Not found",
    409: "Conflict with the resource's state",
    412: "If-Match does not match the current revision (CONFIG_CONFLICT)",
    415: "Unsupported Content-Type (UNSUPPORTED_MEDIA_TYPE)",
    422: "Invalid input; `errors` names each field",
    502: "The flow store answered with an error",
    503: "NATS, the flow store or the replicas did not answer",
}


def problem_responses(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status documented as a Problem.

    ``descriptions`` overrides per status (``_404="Unknown flow"``).
    """
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        text = descriptions.get(f"_{status}") or _DESCRIPTIONS.get(status)
        out[status] = {"model": Problem, "description": text or _phrase(status)}
    return out


def openapi_problem_content(schema: dict[str, Any]) -> dict[str, Any]:
    """Rewrite every 4xx/5xx response of an OpenAPI document to problem+json.

    FastAPI files ``responses=`` models under ``application/json`` and adds its
    own 422 schema; what the API really sends is ``application/problem+json``
    with ``Problem``, so the document says exactly that.
    """
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, sub in (
        Problem.model_json_schema(ref_template="#/components/schemas/{model}")
        .get("$defs", {})
        .items()
    ):
        components.setdefault(name, sub)
    problem_schema = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    problem_schema.pop("$defs", None)
    components["Problem"] = problem_schema
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            for status, response in operation.get("responses", {}).items():
                if status.isdigit() and int(status) >= 400:
                    response["content"] = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": _PROBLEM_REF}}}
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema
