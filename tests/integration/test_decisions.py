"""The rules policy's account of flows, end to end: hand-made flow events published into
FLOWS, stored by a real store, read through the API in process (API -> NATS -> store).

``rule=``, ``tag=``, ``decision=`` and ``~rule``/``~tag`` on ``GET /api/flows``, the
decision fields of ``GET /api/flows/{id}``, the decision log ``GET /api/logs/decisions``
(time range, paging, filters, bad values) and the HAR export's custom fields. No proxy:
the events are built here in the shape ``services.proxy.capture.flow_event`` gives them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from libs.common.bus import Bus
from services.api.streams import FlowFilter
from tests.integration.test_api import nats_url  # noqa: F401  (fixture: a NATS of its own)
from tests.integration.test_store import event, publish, rpc
from tests.unit.test_api_support import ADMIN, READ, eventually
from tests.unit.test_har import validate_har

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("store")]

_seq = itertools.count(1)
REPLICA = "policy-test"


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:  # noqa: F811
    b = await Bus.connect(nats_url, "decisions-test", timeout=5.0)
    await b.ensure_streams()
    try:
        yield b
    finally:
        await b.close()


def flow_id(ago_s: float) -> str:
    """An id in the proxy's layout for a flow that started ``ago_s`` seconds ago."""
    ms = int((time.time() - ago_s) * 1000)
    return f"{ms:012x}{0xDEC:06x}{next(_seq):06x}"


def decided(
    ago_s: float,
    matched: list[dict[str, Any]] | None,
    tags: list[str] | None = None,
    status: int = 200,
    **over: Any,
) -> dict[str, Any]:
    fid = flow_id(ago_s)
    ev = event(fid, "completed", replica=REPLICA)
    ev["timings"] = {"start": int(fid[:12], 16) / 1000, "end": int(fid[:12], 16) / 1000 + 0.01}
    ev["response"]["status"] = status
    ev["policy"] = None if matched is None else {"revision": 5, "matched": matched}
    ev["tags"] = tags or []
    ev["intercept"] = None
    ev["replay_of"] = None
    ev["is_replay"] = None
    ev.update(over)
    return ev


def block(rule: str = "block-ads") -> dict[str, Any]:
    return {"rule": rule, "phase": "request", "action": "block", "note": "403"}


TAG = {"rule": "tag-all", "phase": "request", "action": "tag"}
HEADERS = {"rule": "set-hdr", "phase": "response", "action": "set_headers"}
HOLD = {"rule": "hold-post", "phase": "request", "action": "intercept"}
INTERCEPT = {
    "phase": "request",
    "rule": "hold-post",
    "outcome": "approved",
    "by": "ops",
    "held_ms": 812.5,
    "modified": [],
}


@pytest.fixture
async def flows(bus: Bus) -> dict[str, dict[str, Any]]:
    """A named set of flows, oldest first, stored."""
    named = {
        "old_block": decided(2 * 86400, [block()], ["ads"]),  # two days ago
        "day_allow": decided(3 * 3600, [TAG, {**block("allow-api"), "action": "allow"}], ["seen"]),
        "hour_none": decided(1800, None),
        "hour_modify": decided(1200, [TAG, HEADERS], ["seen", "Team:Web"]),
        "recent_block": decided(120, [TAG, block()], ["seen", "ads"], status=403),
        "recent_hold": decided(60, [HOLD], intercept=INTERCEPT),
        "recent_replay": decided(30, [block()], replay_of="0" * 24, is_replay="request"),
        "recent_plain": decided(10, None),
    }
    await publish(bus, list(named.values()), replica=REPLICA)

    async def stored() -> bool:
        reply = await rpc(bus, "count", {"replica": REPLICA})
        return bool(reply["count"] == len(named))

    await eventually(stored, 10.0, "flows stored")
    return named


def names(flows: dict[str, dict[str, Any]], ids: list[str]) -> list[str]:
    by_id = {f["id"]: name for name, f in flows.items()}
    return [by_id[i] for i in ids]


async def listed(api: httpx.AsyncClient, **params: Any) -> list[str]:
    resp = await api.get("/api/flows", params=params, headers=READ)
    assert resp.status_code == 200, resp.text
    return [f["id"] for f in resp.json()["flows"]]


async def test_listing_by_rule_tag_and_decision(
    api: httpx.AsyncClient, flows: dict[str, dict[str, Any]]
) -> None:
    async def got(**params: Any) -> list[str]:
        return names(flows, await listed(api, **params))

    assert await got(rule="block-ads") == ["recent_replay", "recent_block", "old_block"]
    assert await got(rule="BLOCK-ADS", status=403) == ["recent_block"]
    assert await got(tag="seen") == ["recent_block", "hour_modify", "day_allow"]
    assert await got(tag="team:web") == ["hour_modify"]
    assert await got(decision="block") == ["recent_replay", "recent_block", "old_block"]
    assert await got(decision="modify") == ["hour_modify"]
    assert await got(decision="intercept") == ["recent_hold"]
    assert await got(decision="allow", tag="seen") == ["day_allow"]
    assert len(await got(decision="any")) == 6
    assert await got(q="~rule ^tag-all$ & !~tag ads") == ["hour_modify", "day_allow"]
    assert await got(q="~tag ^ads$ | ~rule hold") == ["recent_hold", "recent_block", "old_block"]
    assert await got(q="!~rule . & ~replica policy-test") == ["recent_plain", "hour_none"]
    assert await got(q="~replay") == ["recent_replay"]
    resp = await api.get("/api/flows", params={"decision": "any", "limit": 2}, headers=READ)
    page = resp.json()
    assert page["filtered_count"] == 6 and page["next_cursor"] is not None
    first = page["flows"][0]
    assert names(flows, [first["id"]]) == ["recent_replay"] and first["decision"] == "block"
    assert first["policy"] == {"revision": 5, "matched": [block()]}
    assert first["replay_of"] == "0" * 24 and first["tags"] == []


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"rule": "has space"}, "query.rule"),
        ({"rule": "x" * 129}, "query.rule"),
        ({"tag": ""}, "query.tag"),
        ({"decision": "deny"}, "query.decision"),
        ({"decision": "BLOCK"}, "query.decision"),
    ],
)
async def test_bad_rule_tag_decision_are_422_naming_the_field(
    api: httpx.AsyncClient, params: dict[str, str], field: str
) -> None:
    for route in ("/api/flows", "/api/flows/har"):
        resp = await api.get(route, params=params, headers=READ)
        assert resp.status_code == 422, resp.text
        assert [e["field"] for e in resp.json()["errors"]] == [field]


async def test_flow_detail_and_har_show_the_decision(
    api: httpx.AsyncClient, flows: dict[str, dict[str, Any]]
) -> None:
    held = flows["recent_hold"]
    detail = (await api.get(f"/api/flows/{held['id']}", headers=READ)).json()
    assert detail["policy"] == {"revision": 5, "matched": [HOLD]}
    assert detail["intercept"] == INTERCEPT and detail["replay_of"] is None
    replay = (await api.get(f"/api/flows/{flows['recent_replay']['id']}", headers=READ)).json()
    assert replay["replay_of"] == "0" * 24 and replay["is_replay"] == "request"

    resp = await api.get("/api/flows/har", params={"decision": "any"}, headers=READ)
    assert resp.status_code == 200, resp.text
    entries = validate_har(resp.content)["log"]["entries"]
    by_name = dict(zip(names(flows, [e["_flow_id"] for e in entries]), entries, strict=True))
    assert len(by_name) == 6
    assert by_name["recent_hold"]["_intercept"] == INTERCEPT
    assert by_name["recent_hold"]["_policy"] == {"revision": 5, "matched": [HOLD]}
    assert by_name["recent_block"]["_tags"] == ["seen", "ads"]
    assert by_name["recent_replay"]["_replayOf"] == "0" * 24
    assert "_intercept" not in by_name["recent_block"] and "_tags" not in by_name["recent_hold"]
    one = await api.get(f"/api/flows/{held['id']}/har", headers=READ)
    assert validate_har(one.content)["log"]["entries"][0]["_intercept"] == INTERCEPT
    plain = await api.get(f"/api/flows/{flows['recent_plain']['id']}/har", headers=READ)
    entry = validate_har(plain.content)["log"]["entries"][0]
    assert "_policy" not in entry and "_tags" not in entry


async def decision_log(api: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    resp = await api.get("/api/logs/decisions", params=params, headers=READ)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def test_decision_log(api: httpx.AsyncClient, flows: dict[str, dict[str, Any]]) -> None:
    def logged(page: dict[str, Any]) -> list[str]:
        return names(flows, [e["flow_id"] for e in page["entries"]])

    recent = ["recent_replay", "recent_hold", "recent_block"]
    assert logged(await decision_log(api)) == [*recent, "hour_modify"]  # default: 1h
    assert logged(await decision_log(api, time_range="5m")) == recent
    assert logged(await decision_log(api, time_range="24h")) == [
        *recent,
        "hour_modify",
        "day_allow",
    ]
    everything = await decision_log(api, time_range="all")
    assert logged(everything) == [*recent, "hour_modify", "day_allow", "old_block"]
    assert everything["filtered_count"] == 6 and everything["next_cursor"] is None

    entry = everything["entries"][1]  # recent_hold
    held = flows["recent_hold"]
    assert entry == {
        "flow_id": held["id"],
        "time": held["timings"]["start"],
        "replica": REPLICA,
        "method": "GET",
        "url": f"http://hand.test{held['path']}",
        "status": 200,
        "revision": 5,
        "decision": "intercept",
        "rules": [{**HOLD, "note": None}],  # every field of an entry, null when not given
        "tags": [],
        "intercept": INTERCEPT,
    }
    blocked = everything["entries"][2]
    assert blocked["decision"] == "block" and blocked["status"] == 403
    assert [r["rule"] for r in blocked["rules"]] == ["tag-all", "block-ads"]
    assert blocked["tags"] == ["seen", "ads"] and blocked["intercept"] is None

    pages, before = [], None
    while True:
        params: dict[str, Any] = {"time_range": "all", "limit": 2}
        if before is not None:
            params["before"] = before
        page = await decision_log(api, **params)
        pages.append(logged(page))
        before = page["next_cursor"]
        if before is None:
            break
    assert pages == [
        ["recent_replay", "recent_hold"],
        ["recent_block", "hour_modify"],
        ["day_allow", "old_block"],
    ]

    assert logged(await decision_log(api, time_range="all", rule="block-ads")) == [
        "recent_replay",
        "recent_block",
        "old_block",
    ]
    assert logged(await decision_log(api, time_range="all", rule="tag-all", decision="allow")) == [
        "day_allow"
    ]
    assert logged(await decision_log(api, decision="modify")) == ["hour_modify"]
    assert logged(await decision_log(api, time_range="5m", decision="modify")) == []
    assert logged(await decision_log(api, rule="nobody")) == []


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"time_range": "1x"}, "query.time_range"),
        ({"time_range": ""}, "query.time_range"),
        ({"limit": "0"}, "query.limit"),
        ({"limit": "1001"}, "query.limit"),
        ({"limit": "ten"}, "query.limit"),
        ({"before": "@@@"}, "query.before"),
        ({"before": "AAAA"}, "query.before"),  # cursor-shaped, but not one of the store's
        ({"rule": "a b"}, "query.rule"),
        ({"decision": "any"}, "query.decision"),
        ({"decision": "deny"}, "query.decision"),
        ({"cursor": "x"}, "query.cursor"),
        ({"q": "~rule x"}, "query.q"),
    ],
)
async def test_decision_log_bad_values_are_422_naming_the_field(
    api: httpx.AsyncClient, params: dict[str, str], field: str
) -> None:
    resp = await api.get("/api/logs/decisions", params=params, headers=READ)
    assert resp.status_code == 422, resp.text
    assert [e["field"] for e in resp.json()["errors"]] == [field]


async def test_decision_log_needs_a_key_and_read_suffices(api: httpx.AsyncClient) -> None:
    assert (await api.get("/api/logs/decisions")).status_code == 401
    assert (await api.get("/api/logs/decisions", headers=READ)).status_code == 200
    assert (await api.get("/api/logs/decisions", headers=ADMIN)).status_code == 200
    schema = (await api.get("/api/openapi.json", headers=READ)).json()
    params = {p["name"] for p in schema["paths"]["/api/logs/decisions"]["get"]["parameters"]}
    assert params == {"time_range", "limit", "before", "rule", "decision"}
    listed = {p["name"] for p in schema["paths"]["/api/flows"]["get"]["parameters"]}
    assert {"rule", "tag", "decision"} <= listed


def test_the_live_stream_filters_by_rule_tag_and_decision() -> None:
    from libs.common.models import FlowQuery

    ev = decided(1, [TAG, block()], ["Seen"])
    plain = decided(1, None)
    for query, want in (
        (FlowQuery(rule="BLOCK-ADS"), True),
        (FlowQuery(rule="block"), False),
        (FlowQuery(tag="seen"), True),
        (FlowQuery(tag="ads"), False),
        (FlowQuery(decision="block"), True),
        (FlowQuery(decision="any"), True),
        (FlowQuery(decision="modify"), False),
    ):
        flt = FlowFilter.of(query)
        assert flt.matches(ev) is want, query
        assert not flt.matches(plain), query
