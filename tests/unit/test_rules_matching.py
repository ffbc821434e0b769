"""Rules match live exchanges as the filter language matches recorded flows, and the
prefilter that lets most rules skip their regex never skips a rule that would match.

The conformance corpus (flows mitmproxy recorded, expressions mitmproxy evaluated) is
the reference: every accepted expression without body operators is evaluated over a
``LiveView`` of each flow rebuilt as the relay holds it, and must agree with the
evaluator over the recorded event; wherever it matches, the prefilter must let it
through. Random patterns and texts check the literal extraction itself.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.common import flowfilter
from libs.common.regexlits import cannot_backtrack, required_literals
from services.proxy import prefilter
from services.proxy.flow import Flow
from services.proxy.flowview import LiveView
from tests.conformance.expressions import CASES

HERE = Path(__file__).resolve().parent.parent / "conformance"
FLOWS: list[dict[str, Any]] = json.loads((HERE / "flows.json").read_text())["flows"]
BODY = ("~b", "~bq", "~bs")


def live(event: dict[str, Any]) -> Flow:
    """The relay's ``Flow`` for a recorded event (what a rule sees at the response head)."""
    f = Flow(tuple(event["client"]) if event.get("client") else None, event.get("kind") or "http")
    f.method = str(event.get("method") or "").encode("latin-1")
    f.scheme = event.get("scheme") or "http"
    f.host = event.get("host") or ""
    f.port = event.get("port") or 0
    f.path = str(event.get("path") or "").encode("latin-1")
    f.state = event.get("state") or "completed"
    f.error = event.get("error")
    f.server_addr = tuple(event["server"]) if event.get("server") else None
    f.req_headers = [
        (n.encode("latin-1"), v.encode("latin-1")) for n, v in event["request"]["headers"]
    ]
    response = event.get("response")
    if response and response.get("status"):
        f.status = response["status"]
        f.resp_headers = [
            (n.encode("latin-1"), v.encode("latin-1")) for n, v in response["headers"]
        ]
    return f


def head_expressions() -> list[str]:
    out = []
    for expr in CASES:
        if any(op in expr.split() for op in BODY) or "~b" in expr:
            continue
        try:
            flowfilter.parse(expr)
        except flowfilter.FilterError:
            continue
        out.append(expr)
    return out


EXPRESSIONS = head_expressions()


def test_the_corpus_has_enough_head_expressions() -> None:
    assert len(EXPRESSIONS) > 150


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_live_view_agrees_with_the_recorded_flow_and_the_prefilter_is_sound(expr: str) -> None:
    tree = flowfilter.parse(expr)
    pred = flowfilter.predicate(tree)
    needs = prefilter.needs(tree)
    for event in FLOWS:
        doc = dict(event)
        for part in ("request", "response"):  # bodies are never seen by rules
            if isinstance(doc.get(part), dict):
                doc[part] = {**doc[part], "body_b64": ""}
        view = LiveView(live(event), str(event.get("replica")))
        expected = pred(flowfilter.FlowView(doc))
        assert pred(view) == expected, (expr, event["id"])
        url = prefilter.Texts(view._flow).get("url")
        assert url is None or url == view.url().lower()
        if expected and needs is not None:
            assert prefilter.Texts(view._flow).present(needs), (expr, event["id"], needs)


class _Rule:
    def __init__(self, expr: str) -> None:
        self.needs = prefilter.needs(flowfilter.parse(expr))


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_the_screen_never_hides_a_match(expr: str) -> None:
    tree = flowfilter.parse(expr)
    pred = flowfilter.predicate(tree)
    rule = _Rule(expr)
    screen = prefilter.Screen([rule, _Rule("~d other.example")])
    for event in FLOWS:
        view = LiveView(live(event), "oracle")
        if pred(view) and screen.nothing_needed_present(view._flow):
            assert screen.unconditional == (rule,), (expr, event["id"])


@pytest.mark.parametrize(
    ("pattern", "literals"),
    [
        ("ads.example", ["ads", "example"]),
        ("/api/v[0-9]+/users", ["/api/v", "/users"]),
        ("(?:abc)def", ["abcdef"]),
        ("abc|def", []),
        ("(?:secret){e<=1}", []),  # fuzzy in the regex engine: no literal is required
        ("x[[:alpha:]]yz", []),
        ("\u017fecret", []),  # non-ASCII (long s): folding is wider than lower()
        ("a(?=bc)", []),
        ("(", []),
    ],
)
def test_required_literals(pattern: str, literals: list[str]) -> None:
    assert required_literals(pattern) == literals


PIECES = st.sampled_from(["a", "b", "ab", ".", "*", "+", "?", "|", "(", ")", "(?:", "[ab]", "\\."])


@settings(max_examples=400, deadline=None)
@given(pattern=st.lists(PIECES, max_size=8).map("".join), text=st.text("abAB.c", max_size=12))
def test_a_text_without_a_required_literal_never_matches(pattern: str, text: str) -> None:
    try:
        rx = regex.compile(pattern, regex.IGNORECASE | regex.V0)
    except regex.error:
        return
    if rx.search(text) is not None:
        low = text.lower()
        for lit in required_literals(pattern):
            assert lit.lower() in low, (pattern, text, lit)


def test_needs_of_and_or_not() -> None:
    def needs(expr: str) -> Any:
        return prefilter.needs(flowfilter.parse(expr))

    assert needs("~d tracker") == (("host", "tracker"),)
    assert needs("~m POST & ~u /login") == (("method", b"post"),)
    assert needs("~u /a/ | ~hq x-debug") == (("url", "/a/"), ("req_headers", b"x-debug"))
    assert needs("~u /a/ | ~c 200") is None
    assert needs("!~d tracker") is None
    assert needs("~c 200") is None


def test_a_body_is_base64_in_the_corpus() -> None:  # the corpus shape this module assumes
    bodies = [e["request"].get("body_b64") for e in FLOWS if e["request"].get("body_b64")]
    assert bodies and base64.b64decode(bodies[0])


@pytest.mark.parametrize(
    ("pattern", "bounded"),
    [
        ("ads.example", True),
        ("/api/v[0-9]/users", True),
        ("(?:ab|cd)e", True),
        ("^foo$", True),
        ("a+", False),
        ("(a|aa)+$", False),
        ("[^/]*", False),
        ("(?=a*)b", False),  # a repeat inside a lookahead
        ("(?:x|(?:y|z+))", False),  # inside a nested alternative
        ("(a)\\1", False),
        ("a{2}", False),
        ("(?:abc){e<=1}", False),  # fuzzy matching in the regex engine
        ("(", False),
    ],
)
def test_which_patterns_search_without_a_time_budget(pattern: str, bounded: bool) -> None:
    assert cannot_backtrack(pattern) is bounded


def test_a_bounded_search_still_finds_what_the_budgeted_one_does() -> None:
    fast = flowfilter.compile_filter("~u example.com/api")
    slow = flowfilter.compile_filter("~u example.com/ap+i")
    for path, hit in (("/api/x", True), ("/other", False)):
        doc = {"kind": "http", "scheme": "http", "host": "example.com", "port": 80}
        doc |= {"path": path, "method": "GET", "request": {"headers": []}}
        assert fast.matches(doc) is hit
        assert slow.matches(doc) is hit
