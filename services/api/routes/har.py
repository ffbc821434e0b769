"""``GET /api/flows/har`` and ``/api/flows/{id}/har``: recorded flows as a HAR 1.2 file.

The export takes the listing's filters (whatever ``GET /api/flows`` accepts, passed
to the store as the listing passes them) and streams every matching flow, newest
first, page by page from the store's ``har`` verb, which builds the entries itself
(``libs.common.har``) from the stored bytes: the API copies them into the file as they
came, one page in memory while the next is fetched, so an export of any size costs the
API two pages and almost no CPU. The first page
is fetched before the response starts, so a bad filter or a missing store is a
problem+json error and not a broken file; a failure later ends the download early
(an incomplete file, which no HAR reader mistakes for a whole one).

Included before ``routes.flows`` so that ``/flows/har`` is not taken for a flow id.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse

from libs.common import har
from services.api.deps import StoreDep
from services.api.errors import problem_responses
from services.api.params import flow_list_params, openapi_parameters
from services.api.routes.flows import FlowId
from services.api.store import StoreClient

router = APIRouter(prefix="/flows", tags=["flows"])

PAGE_FLOWS = 500  # flows asked per store page (the store also ends a page at max_payload)
EXCLUDED = ("limit", "cursor")  # the export holds every match: no paging parameters
_HAR_CONTENT = {
    "description": "A HAR 1.2 document (UTF-8 JSON)",
    "content": {"application/json": {"schema": {"type": "object"}}},
}


def _refuse(names: list[str], why: str) -> RequestValidationError:
    return RequestValidationError(
        [{"loc": ("query", name), "msg": why, "type": "extra_forbidden"} for name in names]
    )


async def export_query(request: Request) -> dict[str, Any]:
    """The store query of an export: the listing's filters, validated by the listing's
    own dependency (422 naming ``query.<param>``), without the listing's paging."""
    bad = [name for name in EXCLUDED if name in request.query_params]
    if bad:
        raise _refuse(bad, "not supported on the HAR export (it holds every matching flow)")
    params = await flow_list_params(request)
    filters = params.to_query().model_dump(exclude_none=True)
    for name in EXCLUDED:
        filters.pop(name, None)
    return filters


_PAGE = re.compile(rb'\{"next_cursor":(?:null|"([A-Za-z0-9_-]{1,128})"),"entries":\[')


def page_parts(raw: bytes) -> tuple[bytes, str | None]:
    """A ``fleet.store.har`` page (the store's reply bytes) as the JSON text of its entries
    and its next cursor, without decoding it: the store writes exactly
    ``{"next_cursor":…,"entries":[…]}`` and the entries go into the file as they are.
    Anything else is decoded and re-serialised (slower, same result)."""
    found = _PAGE.match(raw, 0, 200)
    if found is not None and raw.endswith(b"]}"):
        cursor = found.group(1)
        return raw[found.end() : -2], cursor.decode("ascii") if cursor is not None else None
    page = orjson.loads(raw)
    items = page.get("entries") if isinstance(page, dict) else None
    cursor = page.get("next_cursor") if isinstance(page, dict) else None
    body = b",".join(orjson.dumps(e) for e in items) if isinstance(items, list) else b""
    return body, cursor if isinstance(cursor, str) else None


async def entries(store: StoreClient, query: dict[str, Any], raw: bytes) -> AsyncIterator[bytes]:
    """The HAR document, one chunk per store page: the store builds the entries (from the
    stored bytes, one serialisation), the API asks for page N+1 as soon as page N's
    cursor is read and streams page N's entries as they came."""

    def fetch(cursor: str | None) -> asyncio.Task[bytes] | None:
        if cursor is None:
            return None
        return asyncio.ensure_future(
            store.call_raw("har", {**query, "cursor": cursor, "limit": PAGE_FLOWS})
        )

    yield har.log_open()
    first = True
    pending: asyncio.Task[bytes] | None = None
    try:
        while True:
            body, cursor = page_parts(raw)
            pending = fetch(cursor)
            if body:
                yield body if first else b"," + body
                first = False
            if pending is None:
                break
            raw = await pending
            pending = None
    finally:
        if pending is not None:  # the client went away mid-export
            pending.cancel()
    yield har.LOG_CLOSE


@router.get(
    "/har",
    summary="Export flows as a HAR 1.2 file (the listing's filters, streamed)",
    description="Every flow matching the filters of `GET /api/flows` (not `limit` or "
    "`cursor`), newest first, as one HAR 1.2 document streamed as it is read from the "
    'store (`Content-Disposition: attachment; filename="flows.har"`). Response bodies '
    "are decoded (`content.text`, `encoding: base64` when binary or when the recorded "
    "body does not decode, `_decode_error` saying why); a binary request body is in "
    "`request._postData` (base64). Flows without a response (errors, killed, active) "
    "are entries with status 0, `_error` and `_state`.",
    response_class=StreamingResponse,
    responses={200: _HAR_CONTENT, **problem_responses(401, 403, 422, 502, 503)},
    openapi_extra={"parameters": openapi_parameters(exclude=EXCLUDED)},
)
async def export_har(request: Request, store: StoreDep) -> StreamingResponse:
    query = await export_query(request)
    raw = await store.call_raw("har", {**query, "limit": PAGE_FLOWS})
    return StreamingResponse(
        entries(store, query, raw),
        media_type="application/json",
        headers={"Content-Disposition": 'attachment; filename="flows.har"'},
    )


@router.get(
    "/{flow_id}/har",
    summary="One flow as a HAR 1.2 file",
    description="The entry `GET /api/flows/har` would write for this flow, in a HAR 1.2 "
    'document (`Content-Disposition: attachment; filename="<id>.har"`).',
    response_class=Response,
    responses={
        200: _HAR_CONTENT,
        **problem_responses(401, 403, 404, 422, 502, 503, _404="Unknown flow (FLOW_NOT_FOUND)"),
    },
)
async def flow_har(request: Request, flow_id: FlowId, store: StoreDep) -> Response:
    if request.query_params:
        raise _refuse(list(request.query_params), "this route takes no query parameters")
    flow = await store.get_flow(flow_id)
    body = await asyncio.to_thread(lambda: orjson.dumps(har.document([flow])))
    return Response(
        body,
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{flow_id}.har"'},
    )
