"""Our filter language against mitmproxy's, on flows that mitmproxy itself recorded.

``flows.json`` and ``expected.json`` are written by ``oracle.py`` (run by hand, see its
docstring): real traffic through a real mitmdump, and every expression of
``expressions.py`` evaluated by ``mitmproxy.flowfilter``. Here each expression must
compile exactly when mitmproxy accepted it, and then match exactly the same flows.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from libs.common.flowfilter import FilterError, compile_filter
from tests.conformance.expressions import CASES, OPERATORS

HERE = Path(__file__).resolve().parent
FLOWS: list[dict[str, Any]] = json.loads((HERE / "flows.json").read_text())["flows"]
EXPECTED: dict[str, Any] = json.loads((HERE / "expected.json").read_text())
BY_EXPR: dict[str, dict[str, Any]] = {c["expr"]: c for c in EXPECTED["cases"]}

# Flows where we differ from mitmproxy on purpose, left out of the comparison and
# pinned by their own test below.
DELIBERATE = {
    # Content-Encoding: base64. mitmproxy hands any unknown coding name to Python's
    # codecs, so "base64" decodes by accident (and "bz2_codec" or "zlib_codec" would
    # decompress without a bound); we search the recorded bytes.
    "f25": "a coding name that only Python's codecs know",
}


@pytest.mark.parametrize("expr", CASES, ids=[f"{i:03d}:{e!r}" for i, e in enumerate(CASES)])
def test_conformance(expr: str) -> None:
    case = BY_EXPR.get(expr)
    if case is None:
        pytest.fail(f"{expr!r} is not in expected.json: rerun make conformance-oracle")
    if case.get("error"):
        with pytest.raises(FilterError):
            compile_filter(expr)
        return
    try:
        flt = compile_filter(expr)
    except FilterError as exc:
        pytest.fail(f"{expr!r} refused ({exc}), but mitmproxy accepts it as {case['describe']}")
    ours = {f["id"] for f in FLOWS if flt.matches(f) and f["id"] not in DELIBERATE}
    theirs = set(case["matches"]) - set(DELIBERATE)
    if ours != theirs:
        pytest.fail(
            f"{expr!r} (mitmproxy: {case['describe']})\n"
            f"  only ours:      {sorted(ours - theirs)}\n"
            f"  only mitmproxy: {sorted(theirs - ours)}",
            pytrace=False,
        )


def test_expected_is_current() -> None:
    """expected.json covers the corpus as it is (and nothing else), on these flows."""
    assert len(CASES) == len(set(CASES)), "duplicate expressions in the corpus"
    assert list(BY_EXPR) == CASES, "corpus and expected.json differ: rerun the oracle"
    assert EXPECTED["flows"] == len(FLOWS)
    assert EXPECTED["mitmproxy_version"]
    ids = {f["id"] for f in FLOWS}
    for case in EXPECTED["cases"]:
        assert set(case.get("matches", [])) <= ids


def test_corpus_covers_the_grammar() -> None:
    used = {m for expr in CASES for m in re.findall(r"~[a-z]+", expr)}
    assert set(OPERATORS) <= used, f"operators without a case: {set(OPERATORS) - used}"
    assert len(CASES) >= 170
    accepted = [c["expr"] for c in EXPECTED["cases"] if not c.get("error")]
    for needle in ("!", "&", "|", "(", "'", '"', "\\"):
        assert any(needle in e for e in accepted), f"no accepted case uses {needle!r}"
    assert any(c.get("error") for c in EXPECTED["cases"])
    juxtaposed = [c for c in EXPECTED["cases"] if c.get("describe", "").count(" and ") > 0]
    assert juxtaposed


def test_a_coding_only_python_codecs_know_is_searched_as_recorded() -> None:
    flow = next(f for f in FLOWS if f["id"] == "f25")
    assert ["Content-Encoding", "base64"] in flow["response"]["headers"]
    assert not compile_filter("~bs needle-b64codec").matches(flow)
    recorded = base64.b64decode(flow["response"]["body_b64"])[:12].decode("ascii")
    assert compile_filter(f"~bs '{recorded}'").matches(flow)
    assert "f25" in BY_EXPR["~b needle-b64codec"]["matches"]  # mitmproxy: decoded
