"""``fleet.store.export`` and ``fleet.store.har``: one page of full flows, or of HAR entries.

The page is the one the listing selects for the same query (``FlowRepository.list``:
same filters, same cursor, same order), so whatever filter the listing learns applies
here too; its flows are then read in full in one query and serialised once. A reply
must fit one NATS message, so a page ends early at ``max_bytes`` and its cursor points
after the last flow it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import orjson

from libs.common.models import FlowQuery
from libs.common.tasks import spawn
from services.store.query import encode_cursor
from services.store.repository import FlowRepository

REPLY_MARGIN = 8192  # bytes of a reply kept for the envelope and NATS headers


def budget(max_payload: int) -> int:
    """Bytes of flow documents one export reply may carry."""
    return max(max_payload - REPLY_MARGIN, max_payload // 2)


async def export_page(
    repo: FlowRepository,
    query: FlowQuery,
    max_bytes: int,
    render: str = "wire",
    key: str = "flows",
) -> dict[str, Any]:
    """``{"next_cursor": str | None, key: [documents]}`` for one page: the wire documents,
    or what the renderer named makes of each record (``"har"``: ``key="entries"``)."""
    summaries, cursor = await repo.list(query)
    ids = [s["id"] for s in summaries]
    exported = await repo.export_records(ids, max_bytes, render)
    if not exported.complete and exported.flows:
        cursor = encode_cursor(exported.flows[-1][0])
    # the cursor first, so a reader can ask for the next page before decoding this one;
    # the documents are already serialised: orjson embeds each as it is
    return {"next_cursor": cursor, key: [orjson.Fragment(data) for _, data in exported.flows]}


class ReadAhead:
    """HAR pages rendered one page ahead of the reader (``fleet.store.har``).

    An export reads page after page, and the API can only ask for the next one once it
    has this one; rendering a page is most of the work. So when a page goes out, the one
    its cursor points at is started at once, and the request for it, arriving while the
    API streams the first, finds it (nearly) done. A page read ahead is the page a
    request would get a moment later: the same query and cursor, ids below the cursor.
    At most ``KEEP`` pages wait, none longer than ``TTL`` seconds (an export given up).
    """

    KEEP = 4
    TTL = 30.0

    def __init__(self, repo: FlowRepository, max_bytes: Callable[[], int]) -> None:
        self.repo = repo
        self.max_bytes = max_bytes  # asked per page: the connection's max_payload
        self._ahead: dict[str, tuple[float, asyncio.Task[dict[str, Any]]]] = {}

    async def page(self, query: FlowQuery) -> dict[str, Any]:
        self._expire()
        found = self._ahead.pop(query.model_dump_json(), None)
        page = None
        if found is not None:
            with contextlib.suppress(Exception):  # a failed read-ahead: read it now
                page = await found[1]
        if page is None:
            page = await self._render(query)
        cursor = page.get("next_cursor")
        if isinstance(cursor, str):
            following = query.model_copy(update={"cursor": cursor})
            task = spawn(self._render(following), name="store-har-ahead")
            self._ahead[following.model_dump_json()] = (time.monotonic(), task)
        return page

    async def _render(self, query: FlowQuery) -> dict[str, Any]:
        return await export_page(self.repo, query, self.max_bytes(), "har", "entries")

    def _expire(self) -> None:
        now = time.monotonic()
        for key, (at, task) in list(self._ahead.items()):
            if now - at > self.TTL or len(self._ahead) > self.KEEP:
                task.cancel()
                del self._ahead[key]

    def close(self) -> None:
        for _, task in self._ahead.values():
            task.cancel()
        self._ahead.clear()
