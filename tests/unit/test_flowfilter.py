"""The filter language's own edges (conformance with mitmproxy is tests/conformance):
hostile expressions, the error positions, explain and help."""

from __future__ import annotations

import base64
import time

import pytest

from libs.common import flowfilter
from libs.common.flowfilter import (
    HELP,
    MAX_EXPRESSION,
    MAX_NESTING,
    OPERATORS,
    FilterError,
    FilterTimeout,
    compile_filter,
    parse,
)


def _flow(body: bytes) -> dict[str, object]:
    return {
        "kind": "http",
        "method": "POST",
        "scheme": "http",
        "host": "a.test",
        "port": 80,
        "path": "/",
        "request": {"headers": [], "body_b64": base64.b64encode(body).decode()},
        "response": None,
    }


@pytest.mark.parametrize(
    ("text", "position", "expected"),
    [
        ("~c 404 &", 8, "an operator, a value or '('"),
        ("~q|~s", 0, "a known operator followed by a space, not '~q|~s' (see /api/filter-help)"),
        ("(~d a", 5, "'&', '|' or ')'"),
        ("~u 'abc", 3, "a closing '"),
        ("~c x", 3, "a number after ~c"),
        ("~d [", 0, "a valid regex"),
        ("", 0, "a filter expression"),
    ],
)
def test_errors_name_the_position_and_what_would_fit(
    text: str, position: int, expected: str
) -> None:
    with pytest.raises(FilterError) as caught:
        parse(text)
    assert (caught.value.position, caught.value.expected) == (position, expected)
    assert f"column {position + 1}" in caught.value.message or not text


@pytest.mark.parametrize(
    "text",
    [
        "(" * (MAX_NESTING + 1) + "a" + ")" * (MAX_NESTING + 1),
        "!" * (MAX_NESTING + 1) + "a",
        "a " * (MAX_EXPRESSION // 2 + 1),
        "(" * 2000,
        "!" * 4000,
    ],
    ids=["parentheses", "negations", "too-long", "unclosed", "bangs"],
)
def test_hostile_shapes_are_refused_quickly(text: str) -> None:
    start = time.monotonic()
    with pytest.raises(FilterError):
        parse(text)
    assert time.monotonic() - start < 1.0


def test_deep_but_allowed_nesting_compiles_and_matches() -> None:
    text = "(" * MAX_NESTING + "~m post" + ")" * MAX_NESTING
    assert compile_filter(text).matches(_flow(b""))
    assert not compile_filter("!" * (MAX_NESTING - 1) + "~m post").matches(_flow(b""))  # odd


def test_a_search_that_backtracks_badly_stops_with_filter_timeout() -> None:
    flt = compile_filter("~bq 'foo.*bar'")
    start = time.monotonic()
    with pytest.raises(FilterTimeout):
        flt.matches(_flow(b"foo" * 300_000))
    assert time.monotonic() - start < 2.0
    assert flt.matches(_flow(b"foo then bar"))  # the same filter on a normal body


def test_explain_and_help_cover_every_operator() -> None:
    assert compile_filter("~d example.com & !~c 500").explain() == (
        "(domain matches 'example.com' and not (response code is 500))"
    )
    documented = {name.split()[0] for name, _ in HELP}
    assert documented >= {f"~{code}" for code in OPERATORS} | {"!", "&", "|", "(...)"}
    assert all(description for _, description in HELP)


# -- the policy's account of a flow: ~rule, ~tag, ~replay ----------------------------------
def _decided(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "kind": "http",
        "method": "GET",
        "scheme": "http",
        "host": "a.test",
        "port": 80,
        "path": "/",
        "request": {"headers": []},
        "response": None,
        "policy": {
            "revision": 7,
            "matched": [
                {"rule": "Block-Ads", "phase": "request", "action": "block"},
                {"rule": "tag_all", "phase": "request", "action": "tag", "note": "x"},
            ],
        },
        "tags": ["ads", "team:web"],
        "intercept": None,
        "replay_of": None,
        "is_replay": None,
    }
    doc.update(over)
    return doc


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("~rule block-ads", True),  # case-insensitive search, like every operator
        ("~rule ^block-ads$", True),
        ("~rule ^block$", False),
        ("~rule '^tag_all$'", True),
        ("~rule ^tag.all$", True),
        ("~rule .", True),
        ("!~rule .", False),
        ("~rule nothing", False),
        ("~tag ^ads$", True),
        ("~tag team:", True),
        ("~tag ^team$", False),
        ("~tag ads & ~rule ads", True),
        ("~tag web | ~c 200", True),
        ("~replay", False),
    ],
)
def test_rule_and_tag_search_the_ids_and_tags(text: str, want: bool) -> None:
    assert compile_filter(text).matches(_decided()) is want


def test_a_flow_without_a_decision_matches_no_rule_or_tag() -> None:
    for over in ({"policy": None, "tags": []}, {"policy": None, "tags": None}, {}):
        doc = _decided(**over) if over else {"kind": "http", "host": "a.test"}
        for text in ("~rule .", "~rule ''", "~tag .", "~tag ''", "~rule ^$"):
            assert not compile_filter(text).matches(doc), (over, text)
        assert compile_filter("!~rule . & !~tag .").matches(doc)


def test_replay_reads_is_replay() -> None:
    replay = _decided(is_replay="request", replay_of="018bcfe5684000000000aaaa")
    assert compile_filter("~replay").matches(replay)
    assert compile_filter("~replayq").matches(replay)
    assert not compile_filter("~replays").matches(replay)
    assert not compile_filter("~replay").matches(_decided())


@pytest.mark.parametrize(
    ("policy", "tags"),
    [
        ("not an object", "not a list"),
        ({"matched": "not a list"}, [1, None, {"a": 1}]),
        ({"matched": [1, None, "x", ["rule"]]}, [["nested"]]),
        ({"matched": [{"rule": 5}, {"rule": None}, {"rule": {"x": 1}}]}, [True]),
        ({"matched": [{"rule": "has space"}, {"rule": ""}, {"rule": "é"}]}, ["a b", "", "\n"]),
        ({"matched": [{"rule": "x" * 129}]}, ["y" * 129]),
    ],
)
def test_hostile_decisions_are_read_as_no_ids(policy: object, tags: object) -> None:
    doc = _decided(policy=policy, tags=tags)
    assert flowfilter.rule_ids(doc) == [] and flowfilter.tag_list(doc) == []
    for text in ("~rule .", "~rule ''", "~tag .", "~tag ''"):
        assert not compile_filter(text).matches(doc), text


def test_ids_and_tags_are_bounded_deduplicated_and_in_order() -> None:
    many = [f"t{i}" for i in range(10_000)]
    doc = _decided(
        policy={"matched": [{"rule": f"r{i % 300}"} for i in range(600)]}, tags=many + many
    )
    ids, tags = flowfilter.rule_ids(doc), flowfilter.tag_list(doc)
    assert ids == [f"r{i}" for i in range(flowfilter.MAX_LISTED)]
    assert tags == many[: flowfilter.MAX_LISTED]
    assert compile_filter("~tag ^t255$").matches(doc)
    assert not compile_filter("~tag ^t256$").matches(doc)  # past what the store keeps


@pytest.mark.parametrize(
    ("matched", "want"),
    [
        ([], None),
        ([{"rule": "a", "action": "set_headers"}], "modify"),
        ([{"rule": "a", "action": "tag"}, {"rule": "b", "action": "delay"}], "modify"),
        ([{"rule": "a", "action": "tag"}, {"rule": "b", "action": "block"}], "block"),
        ([{"rule": "a", "action": "allow"}, {"rule": "b", "action": "respond"}], "respond"),
        ([{"action": "intercept"}, {"action": "set_headers"}], "intercept"),
        ([{"action": "explode"}, {"action": ["block"]}, "block"], None),
    ],
)
def test_decision_is_the_last_final_action_else_modify(
    matched: list[object], want: str | None
) -> None:
    assert flowfilter.decision(_decided(policy={"matched": matched})) == want


def test_rule_and_tag_are_explained_and_in_help() -> None:
    assert compile_filter("~rule ^a$ & !~tag b").explain() == (
        "(matched rule matches '^a$' and not (tag matches 'b'))"
    )
    documented = dict(HELP)
    assert "policy rule" in documented["~rule regex"] and "Tag" in documented["~tag regex"]
