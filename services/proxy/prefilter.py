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
    """The literals of one phase's rules in one alternation, searched once over one text
    that holds every text they come from: when none occurs (the usual request), only the
    rules without needs can match, known after a single search instead of a test per
    rule. A literal found in another rule's text only sends the phase on to the per-rule
    tests (the joined text is a superset: it never hides a match)."""

    __slots__ = ("literals", "names", "unconditional")

    def __init__(self, rules: Sequence[R]) -> None:
        literals: set[str] = set()
        names: set[str] = set()
        for rule in rules:
            for name, lit in rule.needs or ():
                names.add(name)
                literals.add(lit.decode("ascii") if isinstance(lit, bytes) else lit)
        self.names = tuple(sorted(names))
        # a loop of substring tests beats one regex alternation here (measured: 0.5 against
        # 0.8 us for 14 literals over a request's texts)
        self.literals = tuple(sorted(literals, key=len, reverse=True))
        self.unconditional: tuple[R, ...] = tuple(r for r in rules if r.needs is None)

    def nothing_needed_present(self, flow: Flow) -> bool:
        """True when no rule's literal occurs (only ``unconditional`` rules may match).

        Runs on every request the policy sees, so it builds nothing but the one text
        (measured: an object per request cost more than the whole screen)."""
        if not self.literals:
            return True
        joined = joined_text(flow, self.names)
        if joined is None:
            return False
        for literal in self.literals:
            if literal in joined:
                return False
        return True


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
        return host_header(self.flow)

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


def host_header(flow: Flow) -> str | None:
    """The request's Host header value (the first one), as ``~d`` and ``~u`` read it."""
    for n, v in flow.req_headers:
        if n == b"Host" or n.lower() == b"host":
            return v.decode("latin-1")
    return None


def joined_text(flow: Flow, names: tuple[str, ...]) -> str | None:
    """The named texts of ``flow`` in one lowercased string (None when it is not ASCII:
    then it cannot rule anything out). Bytes are read as latin-1, which keeps ASCII."""
    method = flow.method.decode("latin-1")
    header = host_header(flow)
    parts: list[str] = []
    for name in names:
        if name == "method":
            parts.append(method)
        elif name == "url":
            parts.append(
                pretty_url_cached(flow.scheme, flow.host, flow.port, flow.path, method, header)
            )
        elif name == "host":
            parts.append(flow.host)
            parts.append(header or "")
        else:
            if name == "req_headers":
                pairs: Sequence[tuple[bytes, bytes]] = flow.req_headers
            elif name == "resp_headers":
                pairs = flow.resp_headers
            else:
                pairs = (*flow.req_headers, *flow.resp_headers)
            parts.append(b"".join([n + b": " + v + b"\r\n" for n, v in pairs]).decode("latin-1"))
    text = "\n".join(parts)
    return text.lower() if text.isascii() else None
