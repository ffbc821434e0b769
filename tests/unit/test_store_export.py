"""The store's ``export`` verb against real databases (SQLite, PostgreSQL): the listing's
page of ids read in full, bounded in bytes, with the bodies of active flows unknown rather
than empty."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from libs.common.models import FlowQuery
from services.api.routes.har import page_parts
from services.store.export import export_page
from services.store.repository import FlowRepository, wire_bytes
from tests.unit.conftest import MakeRepo
from tests.unit.test_store_repository import ev, fid


@pytest.fixture
async def repo(make_repo: MakeRepo) -> FlowRepository:
    return await make_repo()


async def wire(repo: FlowRepository, flow_id: str) -> dict[str, Any]:
    record = await repo.get(flow_id)
    assert record is not None
    return record.to_wire()


async def test_bodies_are_empty_when_final_and_unknown_while_active(
    repo: FlowRepository,
) -> None:
    done, active, gone = fid(), fid(), fid()
    await repo.upsert_events(
        [ev(done), ev(active, "active"), ev(gone, "active", replica="gone", status=None)]
    )
    assert await repo.end_active_flows("gone", "replica gone: gone") == 1
    final = await wire(repo, done)
    assert final["request"]["body_b64"] == "" and final["response"]["body_b64"] == ""
    live = await wire(repo, active)
    assert "body_b64" not in live["request"] and "body_b64" not in live["response"]
    ended = await wire(repo, gone)  # final, but its bodies never arrived
    assert ended["state"] == "error" and ended["ended_by_store"] is True
    assert "body_b64" not in ended["request"]
    # the replica's own final event, arriving late, brings the bodies after all
    await repo.upsert_events([ev(gone, "completed", replica="gone", resp_body=b"late")])
    late = await wire(repo, gone)
    assert "ended_by_store" not in late
    assert base64.b64decode(late["response"]["body_b64"]) == b"late"


async def test_sqlite_export_records_match_the_generic_ones(repo: FlowRepository) -> None:
    ids = [fid(), fid(), fid()]
    await repo.upsert_events(
        [ev(ids[0], resp_body=b"zero"), ev(ids[1], "active"), ev(ids[2], req_body=b"\xff\x00")]
    )
    wanted = [*reversed(ids), fid()]  # newest first, and one that is not stored
    fast = await repo.export_records(wanted, 1 << 20)
    generic = await FlowRepository.export_records(repo, wanted, 1 << 20)
    assert fast == generic and fast.complete
    assert [i for i, _ in fast.flows] == list(reversed(ids))
    for flow_id, data in fast.flows:
        assert orjson.loads(data) == await wire(repo, flow_id)
    assert (await repo.export_records([], 100)).flows == []


async def test_export_pages_stop_at_the_byte_budget_and_resume(repo: FlowRepository) -> None:
    ids = [fid() for _ in range(12)]
    await repo.upsert_events([ev(i, resp_body=b"b" * 3000) for i in ids])
    one = len(wire_bytes(await _record(repo, ids[0]), 1 << 20))
    budget = one * 3 + 10  # three flows a page
    seen: list[str] = []
    pages = 0
    cursor = None
    while True:
        query = FlowQuery(limit=5, cursor=cursor)
        page = await export_page(repo, query, budget)
        raw = orjson.dumps(page)
        reply = orjson.loads(raw)
        assert len(raw) <= budget + 100
        assert raw.startswith(b'{"next_cursor":')  # readable before decoding the page
        seen += [f["id"] for f in reply["flows"]]
        pages += 1
        cursor = reply["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids)) and pages == 4
    generic = await FlowRepository.export_records(repo, list(reversed(ids)), budget)
    assert len(generic.flows) == 3 and not generic.complete


async def test_export_takes_the_listings_filters(repo: FlowRepository) -> None:
    get, post = fid(), fid()
    await repo.upsert_events([ev(get), ev(post, method="POST")])
    page = orjson.loads(orjson.dumps(await export_page(repo, FlowQuery(method="POST"), 1 << 20)))
    assert [f["id"] for f in page["flows"]] == [post] and page["next_cursor"] is None


async def test_a_flow_bigger_than_a_reply_comes_without_its_bodies(
    repo: FlowRepository,
) -> None:
    big = fid()
    await repo.upsert_events([ev(big, req_body=b"q" * 5000, resp_body=b"r" * 5000)])
    page = await repo.export_records([big], 2000)
    ((flow_id, data),) = page.flows
    doc = orjson.loads(data)
    assert flow_id == big and len(data) <= 2000
    for part in ("request", "response"):
        assert doc[part]["body_omitted"] is True and "body_b64" not in doc[part]
        assert doc[part]["size"] == 5000


async def _record(repo: FlowRepository, flow_id: str) -> Any:
    record = await repo.get(flow_id)
    assert record is not None
    return record


async def test_a_har_page_holds_entries_the_api_streams_without_decoding(
    repo: FlowRepository,
) -> None:
    ids = [fid() for _ in range(7)]
    await repo.upsert_events([ev(i, resp_body=b"x" * 500) for i in ids])
    pages, cursor, entries = 0, None, []
    while True:
        page = await export_page(repo, FlowQuery(limit=3, cursor=cursor), 1 << 20, "har", "entries")
        raw = orjson.dumps(page)
        body, cursor = page_parts(raw)
        assert cursor == page["next_cursor"]
        entries += orjson.loads(b"[" + body + b"]")
        pages += 1
        if cursor is None:
            break
    assert pages == 3 and [e["_flow_id"] for e in entries] == list(reversed(ids))
    assert all(e["response"]["content"]["text"] == "x" * 500 for e in entries)
    # a page in another shape (say a foreign store) is decoded instead, same entries
    body, cursor = page_parts(orjson.dumps({"entries": entries[:2], "next_cursor": None}))
    assert orjson.loads(b"[" + body + b"]") == entries[:2] and cursor is None
