"""``/api/filter-help``: the filter language's operators, and what one expression means.

The same table mitmweb shows next to its filter box, from the one implementation the
store and the live stream run (``libs.common.flowfilter``), so a UI never keeps a
second parser that could disagree with the server.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from libs.common import flowfilter
from services.api.errors import problem_responses
from services.api.params import check_filter

router = APIRouter(tags=["flows"])

EXAMPLES = (
    ("~d example.com & ~c 500", "server errors from example.com (or a Host header naming it)"),
    ("~m POST & ~bq password", "POST requests whose decoded body holds 'password'"),
    ("~u /api/v[0-9]+/users & !~s", "user API calls still waiting for a response"),
    ("~h 'X-Trace: abc' | ~replica proxy-2", "a header line, or anything one replica recorded"),
    ("~t json & ~state error", "JSON exchanges that ended in an error"),
    ("~rule ^block-ads$ | ~tag api", "flows the rule block-ads matched, or tagged api"),
)
NOTES = (
    "Every regex is a case-insensitive search (a substring matches); a bare value means ~u.",
    "An operator is followed by a space or the end: (~q) is an error, ( ~q ) is fine.",
    "Juxtaposition is AND and binds looser than |: '~q ~b x | ~s' is '~q & (~b x | ~s)'.",
    "Quote values with spaces or parentheses; quoting consumes backslashes ('\\\\d' is \\d).",
    "~b searches decoded bodies (gzip, deflate, br, zstd); ~h searches 'Name: value' lines.",
    "Filters that SQL cannot decide (headers, bodies) scan FLEET_STORE_SCAN_LIMIT rows per "
    "page: a page may be partial, and its next_cursor continues the scan.",
)


class Operator(BaseModel):
    operator: str = Field(description="e.g. '~d regex', '~c int', '!'")
    description: str


class Example(BaseModel):
    filter: str
    description: str


class FilterHelp(BaseModel):
    operators: list[Operator]
    examples: list[Example]
    notes: list[str]
    explain: str | None = Field(
        None, description="what the q given means, in words (only when q is given)"
    )


@router.get(
    "/filter-help",
    summary="The filter language's operators (and, with q, what an expression means)",
    response_model=FilterHelp,
    responses=problem_responses(401, 403, 422, _422="q is not a filter (BAD_FILTER)"),
)
async def filter_help(
    q: Annotated[
        str | None,
        Query(max_length=flowfilter.MAX_EXPRESSION, description="an expression to explain"),
    ] = None,
) -> FilterHelp:
    explain = None
    if q is not None:
        check_filter(q)
        explain = flowfilter.compile_filter(q).explain()
    return FilterHelp(
        operators=[Operator(operator=o, description=d) for o, d in flowfilter.HELP],
        examples=[Example(filter=f, description=d) for f, d in EXAMPLES],
        notes=list(NOTES),
        explain=explain,
    )
