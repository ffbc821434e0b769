"""``fleet.store.export``: one page of full flows for a HAR (or other) export.

The page is the one the listing selects for the same query (``FlowRepository.list``:
same filters, same cursor, same order), so whatever filter the listing learns applies
here too; its flows are then read in full in one query and serialised once. A reply
must fit one NATS message, so a page ends early at ``max_bytes`` and its cursor points
after the last flow it holds.
"""

from __future__ import annotations

from typing import Any

import orjson

from libs.common.models import FlowQuery
from services.store.query import encode_cursor
from services.store.repository import FlowRepository

REPLY_MARGIN = 8192  # bytes of a reply kept for the envelope and NATS headers


def budget(max_payload: int) -> int:
    """Bytes of flow documents one export reply may carry."""
    return max(max_payload - REPLY_MARGIN, max_payload // 2)


async def export_page(repo: FlowRepository, query: FlowQuery, max_bytes: int) -> dict[str, Any]:
    """``{"next_cursor": str | None, "flows": [wire documents]}`` for one page."""
    summaries, cursor = await repo.list(query)
    ids = [s["id"] for s in summaries]
    exported = await repo.export_records(ids, max_bytes)
    if not exported.complete and exported.flows:
        cursor = encode_cursor(exported.flows[-1][0])
    # the cursor first, so a reader can ask for the next page before decoding this one;
    # the documents are already serialised: orjson embeds each as it is
    return {"next_cursor": cursor, "flows": [orjson.Fragment(data) for _, data in exported.flows]}
