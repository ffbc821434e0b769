"""The filter language's own edges (conformance with mitmproxy is tests/conformance):
hostile expressions, the error positions, explain and help."""

from __future__ import annotations

import base64
import time

import pytest

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
