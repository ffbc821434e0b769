"""Filters in the store: SQL pushdown plus recheck selects exactly what the evaluator does.

The conformance flows (recorded through mitmproxy, see tests/conformance) go into a real
store of each backend (a SQLite file, a PostgreSQL database); every corpus expression
mitmproxy accepts is asked of the store's listing and count and must select the same
flows as ``libs.common.flowfilter`` on the documents.
Then the parts of a scan: the budget, its cursor, the bounded count, hostile patterns.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from libs.common import flowfilter
from libs.common.flowfilter import compile_filter
from libs.common.models import FlowQuery
from services.store import search
from services.store.repository import FlowRepository, QueryError
from tests.conformance.test_filter_conformance import BY_EXPR, FLOWS
from tests.unit.conftest import MakeRepo

ACCEPTED = [e for e, case in BY_EXPR.items() if not case.get("error")]


@pytest.fixture
async def corpus_store(make_repo: MakeRepo) -> FlowRepository:
    repo = await make_repo(scan_limit=1000)
    await repo.upsert_events(copy.deepcopy(FLOWS))
    return repo


async def _all_ids(repo: FlowRepository, q: str, limit: int = 7) -> list[str]:
    ids: list[str] = []
    cursor = None
    while True:
        page = await repo.listing(FlowQuery(q=q, limit=limit, cursor=cursor))
        ids += [f["id"] for f in page.flows]
        if page.next_cursor is None:
            return ids
        cursor = page.next_cursor


async def test_every_accepted_corpus_expression_selects_what_the_evaluator_does(
    corpus_store: FlowRepository,
) -> None:
    assert len(ACCEPTED) > 250
    wrong = []
    for expr in ACCEPTED:
        flt = compile_filter(expr)
        want = sorted((f["id"] for f in FLOWS if flt.matches(f)), reverse=True)
        got = await _all_ids(corpus_store, expr)
        counted = await corpus_store.count(FlowQuery(q=expr))
        if got != want or counted != len(want):
            wrong.append((expr, got, want, counted))
    assert not wrong, "\n".join(
        f"{e!r}: store {g} count {c}, evaluator {w}" for e, g, w, c in wrong
    )


async def test_exact_filters_are_one_query_and_rechecked_ones_say_what_they_scanned(
    corpus_store: FlowRepository,
) -> None:
    for q in ("~c 200", "~m post & ~c 201", "~d example", "!~s", "~tcp | ~websocket", "~e"):
        page = await corpus_store.listing(FlowQuery(q=q))
        assert page.scanned is None and page.count_exact, q  # no recheck: counted by SQL
        assert page.filtered_count == len(page.flows)
    page = await corpus_store.listing(FlowQuery(q="~b needle"))
    assert page.scanned is not None and not page.partial and page.count_exact
    assert page.filtered_count == len(page.flows) > 0


def _flow(i: int, body: bytes = b"hay", host: str = "h.test") -> dict[str, Any]:
    return {
        "event": "completed",
        "id": f"{1_700_000_000_000 + i:012x}{i:012x}",
        "replica": "r1",
        "kind": "http",
        "state": "completed",
        "client": ["127.0.0.1", 40000],
        "server": ["127.0.0.1", 80],
        "scheme": "http",
        "method": "GET",
        "host": host,
        "port": 80,
        "path": f"/item/{i}",
        "request": {"headers": [["Host", host]], "size": 0, "truncated": False, "body_b64": ""},
        "response": {
            "status": 200,
            "reason": "OK",
            "headers": [["Content-Type", "text/plain"]],
            "size": len(body),
            "truncated": False,
            "body_b64": base64.b64encode(body).decode(),
        },
        "timings": {"start": 1.0, "end": 2.0},
        "error": None,
    }


async def test_a_scan_stops_at_its_budget_and_its_cursor_continues(make_repo: MakeRepo) -> None:
    repo = await make_repo(scan_limit=100)
    flows = [_flow(i, b"needle" if i % 97 == 0 else b"hay") for i in range(1000)]
    await repo.upsert_events(flows)
    want = sorted((f["id"] for i, f in enumerate(flows) if i % 97 == 0), reverse=True)
    page = await repo.listing(FlowQuery(q="~bs needle", limit=50))
    assert page.partial and page.scanned == 100  # the budget, not the whole table
    assert not page.count_exact and page.next_cursor is not None
    found, cursor, calls = [f["id"] for f in page.flows], page.next_cursor, 1
    while cursor is not None:
        page = await repo.listing(FlowQuery(q="~bs needle", limit=50, cursor=cursor))
        assert page.scanned is not None and page.scanned <= 100
        found += [f["id"] for f in page.flows]
        cursor, calls = page.next_cursor, calls + 1
    assert found == want  # every match once, newest first, across partial pages
    assert calls <= 11  # 1000 rows at 100 a call (the last may only find the end)


async def test_filtered_count_is_exact_up_to_its_bound(
    make_repo: MakeRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(search, "COUNT_BOUND", 25)
    repo = await make_repo()
    await repo.upsert_events([_flow(i, host="a.test" if i < 20 else "b.test") for i in range(60)])
    page = await repo.listing(FlowQuery(q="~d ^a\\.test$", limit=5))
    assert (page.filtered_count, page.count_exact) == (20, True)
    page = await repo.listing(FlowQuery(q="~d test", limit=5))
    assert (page.filtered_count, page.count_exact) == (25, False)  # "at least 25"
    plain = await repo.listing(FlowQuery(limit=5))
    assert (plain.filtered_count, plain.count_exact) == (25, False)
    assert await repo.count(FlowQuery(q="~d test")) == 60  # count stays exact


async def test_a_pattern_that_backtracks_badly_is_refused_not_run_for_hours(
    make_repo: MakeRepo,
) -> None:
    repo = await make_repo()
    await repo.upsert_events([_flow(1, b"foo" * 300_000)])
    with pytest.raises(QueryError) as caught:
        await repo.listing(FlowQuery(q="~b 'foo.*bar'"))
    assert caught.value.code == "BAD_FILTER" and "backtracks" in str(caught.value)
    with pytest.raises(QueryError) as caught:
        await repo.listing(FlowQuery(q="~c 200 &"))
    assert caught.value.code == "BAD_FILTER" and caught.value.position == 8


def test_conformance_flows_are_the_committed_ones() -> None:
    data = json.loads((Path(__file__).parents[1] / "conformance" / "flows.json").read_text())
    assert len(data["flows"]) == len(FLOWS) > 50


async def test_a_host_seen_for_the_first_time_is_found_at_once(make_repo: MakeRepo) -> None:
    """The distinct hosts behind ``~d`` are cached between queries: flows stored after a
    query, with a host never seen before, are found by the very next query."""
    repo = await make_repo()
    await repo.upsert_events([_flow(i, host="old.test") for i in range(5)])
    assert len((await repo.listing(FlowQuery(q="~d test"))).flows) == 5
    await repo.upsert_events([_flow(i, host="new.test") for i in range(5, 8)])
    fresh = await repo.listing(FlowQuery(q="~d new & ~c 200"))
    assert [f["host"] for f in fresh.flows] == ["new.test"] * 3 and fresh.scanned is None
    assert len((await repo.listing(FlowQuery(q="~d test"))).flows) == 8
    assert len((await repo.listing(FlowQuery(q="~m get & ~replica r1"))).flows) == 8


async def test_missing_fields_and_foreign_kinds_select_as_the_evaluator_does(
    make_repo: MakeRepo,
) -> None:
    """A field a publisher left out reads as "" to the evaluator, so a pattern matching ""
    selects it; SQL must not lose those rows to NULL. A kind no proxy records is stored as
    none, in the column and the document alike."""
    repo = await make_repo()
    bare = _flow(1)
    for name in ("replica", "host", "method"):
        bare[name] = None
    foreign = {**_flow(2), "kind": "grpc"}
    await repo.upsert_events([bare, foreign, _flow(3), {**_flow(4), "kind": "tunnel"}])
    stored = [(await repo.get(f["id"])) for f in (bare, foreign)]
    assert stored[1] is not None and stored[1].doc["kind"] is None
    docs = [r.doc for r in stored if r is not None] + [_flow(3), {**_flow(4), "kind": "tunnel"}]
    for q in ("~replica ^$", "~d ^$", "~m ^$", "~kind ^$", "~kind http", "~kind .",
              "~http", "~tcp", "!~replica r1", "~d ''", "~m 'g?'"):  # fmt: skip
        flt = compile_filter(q)
        want = sorted((d["id"] for d in docs if flt.matches(d)), reverse=True)
        got = [f["id"] for f in (await repo.listing(FlowQuery(q=q))).flows]
        assert got == want, q


# -- ~rule and ~tag: the policy's columns ---------------------------------------------------
_MATCHED = [
    [{"rule": "block-ads", "phase": "request", "action": "block"}],
    [
        {"rule": "Tag.All", "phase": "request", "action": "tag"},
        {"rule": "hdr_set", "phase": "response", "action": "set_headers"},
    ],
    [{"rule": "allow-%-50", "phase": "request", "action": "allow"}],
    [
        1,
        {"rule": 5},
        {"rule": "has space"},
        {"rule": "x" * 200},
        {"rule": "ok-1", "action": "allow"},
    ],
    [{"rule": "tagxall", "action": "intercept"}, {"rule": "block-ads-2", "action": "block"}],
]
_TAGS = [["ads"], ["seen", "Team:A"], [], ["ok", 7, "a b", "é", "ok"], ["ads-2", "Seen"]]


def decided_flows() -> list[dict[str, Any]]:
    """The conformance flows, each with a policy decision (or none, or a hostile one)."""
    flows = copy.deepcopy(FLOWS)
    for i, f in enumerate(flows):
        k = i % 7
        if k == 5:
            continue  # no policy fields at all (a flow from before the policy)
        if k == 6:
            f.update(policy=None, tags=[])
            continue
        f["policy"] = {"revision": i, "matched": copy.deepcopy(_MATCHED[k])}
        f["tags"] = list(_TAGS[k])
    flows[0]["tags"] = [f"t{n}" for n in range(10_000)]
    flows[1]["policy"] = {"revision": 1, "matched": [{"rule": f"r{n}"} for n in range(300)]}
    flows[2]["policy"] = {"matched": "not a list"}
    flows[3]["tags"] = "not a list"
    return flows


RULE_TAG_EXPRESSIONS = [
    # exact in SQL: a plain anchored literal, or "any id"
    ("~rule ^block-ads$", True),
    ("~rule ^BLOCK-ADS$", True),
    ("~rule \\Ablock-ads\\Z", True),  # unquoted: the backslashes stay
    ("~rule ^block\\-ads$", True),
    ("~rule ^hdr_set$", True),  # "_" is no LIKE wildcard here
    ("~rule ^hdrxset$", True),
    ("~rule '^allow-%-50$'", True),
    ("~rule ^tag\\.all$", True),
    ("~rule ^ok-1$", True),
    ("~rule ^r0$", True),
    ("~rule ^r255$", True),
    ("~rule ^r256$", True),  # past the ids kept: nothing
    ("~rule .", True),
    ("~rule ''", True),
    ("!~rule .", True),
    ("!~rule ^block-ads$", True),
    ("~tag ^ads$", True),
    ("~tag ^team:a$", True),
    ("~tag ^seen$", True),
    ("~tag ^t0$", True),
    ("~tag ^t9999$", True),
    ("~tag .", True),
    ("~rule ^block-ads$ & ~tag ^ads$", True),
    ("~rule ^block-ads$ | ~tag ^seen$", True),
    ("~rule ^block-ads$ & ~c 200", True),
    # rechecked: a regex the column cannot decide
    ("~rule block-ads", False),
    ("~rule ^tag.all$", False),  # "." is any character: tagxall too
    ("~rule ads$", False),
    ("~rule '^(block-ads|hdr_set)$'", False),
    ("~rule 'has space'", False),
    ("~rule ^$", False),
    ("~rule ^é$", False),
    ("~tag ads", False),
    ("~tag ^a.b$", False),
    ("~tag ^é$", False),
    ("!~tag seen & ~rule .", False),
    ("~rule ads | ~h content-type", False),
    ("~tag seen & ~d 127.0.0.1", False),
    ("~replay | ~tag ^ok$", False),
]


@pytest.fixture
async def decided_store(make_repo: MakeRepo) -> FlowRepository:
    repo = await make_repo(scan_limit=1000)
    assert await repo.upsert_events(decided_flows()) == 0  # hostile values: stored all the same
    return repo


async def test_rule_and_tag_select_through_sql_what_the_evaluator_does(
    decided_store: FlowRepository,
) -> None:
    flows = decided_flows()
    wrong = []
    for expr, exact in RULE_TAG_EXPRESSIONS:
        flt = compile_filter(expr)
        want = sorted((f["id"] for f in flows if flt.matches(f)), reverse=True)
        got = await _all_ids(decided_store, expr)
        counted = await decided_store.count(FlowQuery(q=expr))
        page = await decided_store.listing(FlowQuery(q=expr, limit=1000))
        if got != want or counted != len(want) or (page.scanned is None) != exact:
            wrong.append((expr, got, want, counted, page.scanned))
    assert not wrong, "\n".join(
        f"{e!r}: store {g} count {c} scanned {s}, evaluator {w}" for e, g, w, c, s in wrong
    )
    # the corpus is not vacuous: each kind of expression selects some flows and not all
    some = [e for e, _ in RULE_TAG_EXPRESSIONS if 0 < len(await _all_ids(decided_store, e)) < 50]
    assert len(some) > 25


async def test_every_corpus_expression_still_agrees_on_decided_flows(
    decided_store: FlowRepository,
) -> None:
    """The policy fields change nothing for the other operators."""
    flows = decided_flows()
    for expr in ACCEPTED[::5]:
        flt = compile_filter(expr)
        want = sorted((f["id"] for f in flows if flt.matches(f)), reverse=True)
        assert await _all_ids(decided_store, expr) == want, expr


@pytest.mark.parametrize(
    "value", ["block-ads", "BLOCK-ADS", "hdr_set", "allow-%-50", "r255", "r256"]
)
async def test_rule_parameter_is_the_anchored_filter(
    decided_store: FlowRepository, value: str
) -> None:
    flt = compile_filter(f"~rule '^{re.escape(value)}$'")
    want = sorted((f["id"] for f in decided_flows() if flt.matches(f)), reverse=True)
    rows, _ = await decided_store.list(FlowQuery(rule=value, limit=1000))
    assert [r["id"] for r in rows] == want
    assert await decided_store.count(FlowQuery(rule=value)) == len(want)


@pytest.mark.parametrize("value", ["ads", "team:a", "Seen", "t0", "t300", "ok"])
async def test_tag_parameter_is_the_anchored_filter(
    decided_store: FlowRepository, value: str
) -> None:
    flt = compile_filter(f"~tag '^{re.escape(value)}$'")
    want = sorted((f["id"] for f in decided_flows() if flt.matches(f)), reverse=True)
    rows, _ = await decided_store.list(FlowQuery(tag=value, limit=1000))
    assert [r["id"] for r in rows] == want


@pytest.mark.parametrize("value", ["block", "allow", "intercept", "modify", "respond", "any"])
async def test_decision_parameter(decided_store: FlowRepository, value: str) -> None:
    def keep(f: dict[str, Any]) -> bool:
        found = flowfilter.decision(f)
        return found is not None and value in ("any", found)

    want = sorted((f["id"] for f in decided_flows() if keep(f)), reverse=True)
    page = await decided_store.listing(FlowQuery.model_validate({"decision": value, "limit": 1000}))
    assert [r["id"] for r in page.flows] == want and page.filtered_count == len(want)
    assert all(r["decision"] == (value if value != "any" else r["decision"]) for r in page.flows)
    both = await decided_store.listing(
        FlowQuery.model_validate(
            {"decision": value, "rule": "block-ads", "q": "~c 200", "limit": 1000}
        )
    )
    flt = compile_filter("~rule ^block-ads$ & ~c 200")
    assert [r["id"] for r in both.flows] == [
        i for i in want if flt.matches(next(f for f in decided_flows() if f["id"] == i))
    ]


async def test_a_scan_reads_windows_newest_first_and_misses_nothing_between_them(
    make_repo: MakeRepo,
) -> None:
    """Candidates on both sides of every window bound (an hour, a day, a week ago, older),
    matching or not: the pages walk every match once, newest first, whatever the chunk."""
    import time

    repo = await make_repo(scan_limit=1000)
    now_ms = int(time.time() * 1000)
    flows = []
    for k, age_s in enumerate((10, 3590, 3610, 86_390, 86_410, 604_790, 604_810, 30 * 86_400)):
        for j in range(7):
            f = _flow(k * 10 + j, b"needle" if j % 2 == 0 else b"hay")
            f["id"] = f"{now_ms - age_s * 1000 - j:012x}{k * 10 + j:012x}"
            flows.append(f)
    await repo.upsert_events(flows)
    want = sorted((f["id"] for f in flows if (int(f["id"][12:], 16) % 10) % 2 == 0), reverse=True)
    for limit in (1, 3, 100):
        got, cursor = [], None
        while True:
            page = await repo.listing(FlowQuery(q="~bs needle", limit=limit, cursor=cursor))
            got += [f["id"] for f in page.flows]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert got == want, limit
    page = await repo.listing(FlowQuery(q="~bs needle", limit=100))
    assert page.scanned == len(flows) and page.count_exact and page.filtered_count == len(want)


def test_scan_windows_skip_what_the_plan_bounds_already() -> None:
    from services.store.query import plan, time_bound

    now = 2_000_000_000.0
    bounds = [time_bound(now - s) for s in search.SCAN_WINDOWS_S]
    assert search.scan_windows(plan(FlowQuery()), now) == [*bounds, None]
    two_hours_ago = plan(FlowQuery(until=now - 7200))  # the last hour is empty
    assert search.scan_windows(two_hours_ago, now) == [*bounds[1:], None]
    last_day = plan(FlowQuery(since=now - 86_400))  # the week window adds nothing
    assert search.scan_windows(last_day, now) == [bounds[0], None]
