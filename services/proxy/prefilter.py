"""What a rule's filter needs present before it can match: a test cheaper than matching.

Most rules name something literal (``~d ads.example``, ``~u /private/``,
``~hq x-debug``), and most requests contain none of it. ``needs(tree)`` derives, from a
filter tree, alternatives of (text, literal) of which at least one must be present for
the filter to match; ``Texts`` gives the lowercased texts of one exchange, each computed
once per phase. A rule whose needs are all absent is skipped without a regex search, so
twenty rules that do not match cost a few string searches, not twenty regex searches.

Sound by construction: ``needs`` only returns literals every match requires (see
``libs.common.regexlits``), an AND needs what any one of its parts needs, an OR what all
of its parts need, a NOT nothing; and a text that case folding could read differently
from ``lower()`` (non-ASCII) is never used to rule anything out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

from libs.common.flowfilter import And, Leaf, Node, Not, Or
from libs.common.regexlits import required_literals
from services.proxy.flow import Flow
from services.proxy.flowview import pretty_url_cached

Need = tuple[str, str | bytes]  # (text name, lowercased literal)

# operator -> the text its regex searches (a superset is fine: it only prefilters)
_TEXT_OF = {
    "d": "host",
    "u": "url",
    "m": "method",
    "h": "headers",
    "hq": "req_headers",
    "hs": "resp_headers",
    "t": "headers",
    "tq": "req_headers",
    "ts": "resp_headers",
}
_BYTES = frozenset({"method", "headers", "req_headers", "resp_headers"})


def needs(node: Node) -> tuple[Need, ...] | None:
    """Alternatives, one of which must be present for ``node`` to match (None: unknown)."""
    if isinstance(node, Leaf):
        text = _TEXT_OF.get(node.code)
        if text is None or node.pattern is None:
            return None
        literals = required_literals(node.pattern)
        if not literals:
            return None
        lit = max(literals, key=len).lower()
        return ((text, lit.encode("ascii") if text in _BYTES else lit),)
    if isinstance(node, Not):
        return None
    parts = [needs(child) for child in node.children]
    if isinstance(node, And):
        known = [p for p in parts if p is not None]
        return min(known, key=len) if known else None  # any one part's needs will do
    assert isinstance(node, Or)
    if any(p is None for p in parts):
        return None
    return tuple(need for p in parts if p is not None for need in p)


class Prefiltered(Protocol):
    @property
    def needs(self) -> tuple[Need, ...] | None: ...


R = TypeVar("R", bound=Prefiltered)


class Screen(Generic[R]):
    """The literals of one phase's rules, one alternation per text: when none occurs in
    any of its texts (the usual request), only the rules without needs can match, and
    that is known after one search per text instead of one test per rule."""

    __slots__ = ("alternations", "unconditional")

    def __init__(self, rules: Sequence[R]) -> None:
        literals: dict[str, list[str | bytes]] = {}
        for rule in rules:
            for name, lit in rule.needs or ():
                literals.setdefault(name, []).append(lit)
        # cheapest texts first: the first hit ends the screening
        order = ("method", "host", "req_headers", "resp_headers", "headers", "url")
        self.alternations: tuple[tuple[str, re.Pattern[str] | re.Pattern[bytes]], ...] = tuple(
            (name, _alternation(literals[name])) for name in order if name in literals
        )
        self.unconditional: tuple[R, ...] = tuple(r for r in rules if r.needs is None)

    def nothing_needed_present(self, texts: Texts) -> bool:
        """True when no rule's literal occurs (only ``unconditional`` rules may match)."""
        for name, rx in self.alternations:
            text = texts.get(name)
            if text is None or rx.search(text) is not None:  # type: ignore[arg-type]
                return False
        return True


def _alternation(literals: list[str | bytes]) -> re.Pattern[str] | re.Pattern[bytes]:
    """One search for any of ``literals`` (all of one type: a text is str or bytes)."""
    distinct = sorted(set(literals), key=len, reverse=True)
    raw = [x for x in distinct if isinstance(x, bytes)]
    if raw:
        return re.compile(b"|".join(re.escape(x) for x in raw))
    return re.compile("|".join(re.escape(x) for x in distinct if isinstance(x, str)))


class Texts:
    """The lowercased texts of one exchange at one phase, computed on first use straight
    from the relay's ``Flow`` (no ``LiveView`` needed unless a rule gets past them)."""

    __slots__ = ("_got", "flow")

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self._got: dict[str, str | bytes | None] = {}

    def present(self, alternatives: tuple[Need, ...]) -> bool:
        """Whether any alternative's literal is in its text (True when a text cannot
        rule anything out)."""
        for name, lit in alternatives:
            text = self.get(name)
            if text is None or lit in text:  # type: ignore[operator]
                return True
        return False

    def get(self, name: str) -> str | bytes | None:
        """The lowercased text (None: it cannot rule anything out)."""
        got = self._got
        if name in got:
            return got[name]
        text = got[name] = self._text(name)
        return text

    def _host_header(self) -> str | None:
        for n, v in self.flow.req_headers:
            if n.lower() == b"host":
                return v.decode("latin-1")
        return None

    def _text(self, name: str) -> str | bytes | None:
        f = self.flow
        if name == "method":
            return f.method.lower()
        if name == "req_headers":
            return b"".join([n + b": " + v + b"\r\n" for n, v in f.req_headers]).lower()
        if name == "resp_headers":
            return b"".join([n + b": " + v + b"\r\n" for n, v in f.resp_headers]).lower()
        if name == "headers":
            both = (*f.req_headers, *f.resp_headers)
            return b"".join([n + b": " + v + b"\r\n" for n, v in both]).lower()
        header = self._host_header()
        if name == "host":  # ~d searches the host and the Host header's host: a superset
            value = f.host if header is None else f.host + "\n" + header
        else:  # the URL exactly as ~u sees it
            method = f.method.decode("latin-1")
            value = pretty_url_cached(f.scheme, f.host, f.port, f.path, method, header)
        return value.lower() if value.isascii() else None
