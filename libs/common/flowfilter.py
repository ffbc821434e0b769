"""mitmproxy's flow filter language (``~d example.com & ~c 500``), one implementation.

The API checks expressions with it, the live stream and the store's recheck match
flows with it, and ``services.store.filtersql`` compiles the same tree to SQL. The
syntax and semantics follow mitmproxy 12's ``flowfilter`` (its pyparsing grammar,
re-derived here by hand; no code copied), including the quirks users meet:

- juxtaposition (``~q ~b x``) is an AND that binds looser than ``|``, and is not
  allowed inside parentheses; ``&``, ``|`` after a term and ``!`` before one must be
  followed by a term (``~q &`` is an error), while a leading ``&`` or ``|`` is a value;
- an operator must be followed by whitespace or the end (``~q)`` is an error);
- unquoted values may hold ``& | !`` but not ``( ) ~ ' "`` or whitespace; a bare
  value is ``~u``; quoting consumes backslashes (``"\\d"`` is the regex ``d``);
- every regex is a case-insensitive ``re.search``; ``~h`` searches ``Name: value``
  lines (multi-line), ``~b`` the decoded body (dot matches newline).

Beyond mitmproxy: ``~replica``, ``~state`` and ``~kind`` (regexes on the stored
flow's fields), ``~rule`` and ``~tag`` (regexes on the ids of the policy rules that
matched the flow, and on its tags: true when any one matches; see ``rule_ids`` and
``tag_list`` for what counts). Flows are our flow events
(``services.proxy.capture.flow_event``); a ``tunnel`` flow is what mitmproxy calls a
TCP flow, and ``~replay`` is a flow whose ``is_replay`` is set (``request``: a replay).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import regex

from libs.common import codings
from libs.common.regexlits import cannot_backtrack

MAX_EXPRESSION = 4096  # characters: filters travel in query strings and NATS requests
MAX_NESTING = 64  # parentheses and "!" inside one another

_WHITESPACE = " \t\n\r"  # what the reference grammar skips between tokens
_NOT_IN_WORD = "()~'\"" + _WHITESPACE
_OPERATORS = "&|!"


class FilterError(ValueError):
    """A bad expression: ``position`` (0-based) and what was ``expected`` there."""

    def __init__(self, message: str, position: int, expected: str) -> None:
        super().__init__(message)
        self.message = message
        self.position = position
        self.expected = expected


# -- operators -------------------------------------------------------------------------
@dataclass(frozen=True)
class Operator:
    code: str
    kind: str  # "unary", "regex" or "int"
    help: str
    describe: str  # for explain(): "{}" is the value


OPERATORS: dict[str, Operator] = {
    op.code: op
    for op in (
        Operator("a", "unary", "Match asset in response: CSS, JavaScript, images, fonts.", "asset"),
        Operator("all", "unary", "Match all flows", "all flows"),
        Operator("b", "regex", "Body", "body matches {}"),
        Operator("bq", "regex", "Request body", "request body matches {}"),
        Operator("bs", "regex", "Response body", "response body matches {}"),
        Operator("c", "int", "HTTP response code", "response code is {}"),
        Operator("comment", "regex", "Flow comment", "comment matches {}"),
        Operator("d", "regex", "Domain", "domain matches {}"),
        Operator("dns", "unary", "Match DNS flows", "DNS flow"),
        Operator("dst", "regex", "Match destination address", "destination matches {}"),
        Operator("e", "unary", "Match error", "has error"),
        Operator("h", "regex", "Header", "header matches {}"),
        Operator("hq", "regex", "Request header", "request header matches {}"),
        Operator("hs", "regex", "Response header", "response header matches {}"),
        Operator("http", "unary", "Match HTTP flows", "HTTP flow"),
        Operator("kind", "regex", "Flow kind (http, websocket, tunnel)", "kind matches {}"),
        Operator("m", "regex", "Method", "method matches {}"),
        Operator("marked", "unary", "Match marked flows", "marked"),
        Operator("marker", "regex", "Match marked flows with specified marker", "marker {}"),
        Operator("meta", "regex", "Flow metadata", "metadata matches {}"),
        Operator("q", "unary", "Match request with no response", "no response"),
        Operator("replay", "unary", "Match replayed flows", "replayed"),
        Operator("replayq", "unary", "Match replayed client request", "replayed request"),
        Operator("replays", "unary", "Match replayed server response", "replayed response"),
        Operator("replica", "regex", "Proxy replica that recorded the flow", "replica {}"),
        Operator(
            "rule", "regex", "Id of a policy rule that matched the flow", "matched rule matches {}"
        ),
        Operator("s", "unary", "Match response", "has response"),
        Operator("src", "regex", "Match source address", "source matches {}"),
        Operator(
            "state", "regex", "Flow state (active, completed, error, killed)", "state matches {}"
        ),
        Operator("t", "regex", "Content-type header", "content type matches {}"),
        Operator("tag", "regex", "Tag of the flow (added by policy tag rules)", "tag matches {}"),
        Operator("tcp", "unary", "Match TCP flows (proxyfleet: tunnels)", "tunnel"),
        Operator("tq", "regex", "Request Content-Type header", "request content type {}"),
        Operator("ts", "regex", "Response Content-Type header", "response content type {}"),
        Operator("u", "regex", "URL", "url matches {}"),
        Operator("udp", "unary", "Match UDP flows", "UDP flow"),
        Operator("websocket", "unary", "Match WebSocket flows", "WebSocket flow"),
    )
}

_SUFFIX = {"unary": "", "regex": " regex", "int": " int"}
HELP: list[tuple[str, str]] = [
    *sorted((f"~{op.code}{_SUFFIX[op.kind]}", op.help) for op in OPERATORS.values()),
    ("!", "unary not"),
    ("&", "and"),
    ("|", "or"),
    ("(...)", "grouping"),
]


# -- the tree ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Leaf:
    """One operator with its value: ``pattern`` (regex source) or ``number``."""

    code: str
    pattern: str | None = None
    number: int | None = None

    def regex(self, binary: bool = False) -> Any:
        return _compile(self.code, self.pattern or "", binary)

    def searcher(self) -> Callable[[Any], bool]:
        """``pattern`` as a bounded search (``FilterTimeout`` past ``SEARCH_TIMEOUT``);
        a pattern that cannot backtrack runs without the time budget, which costs more
        than such a search (rules match every request with these)."""
        rx = self.regex(binary=self.code in BINARY)
        if cannot_backtrack(self.pattern or ""):
            return lambda text: rx.search(text) is not None
        return _searcher(rx, self.code)


@dataclass(frozen=True)
class Not:
    child: Node


@dataclass(frozen=True)
class And:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    children: tuple[Node, ...]


Node = Leaf | Not | And | Or

_FLAGS = {
    "h": regex.MULTILINE,
    "hq": regex.MULTILINE,
    "hs": regex.MULTILINE,
    "b": regex.DOTALL,
    "bq": regex.DOTALL,
    "bs": regex.DOTALL,
    "meta": regex.MULTILINE,
    "comment": regex.MULTILINE,
}
BINARY = frozenset({"b", "bq", "bs", "h", "hq", "hs", "m", "t", "tq", "ts"})  # bytes regexes


def _compile(code: str, pattern: str, binary: bool) -> Any:
    """The pattern, compiled by the ``regex`` engine in its ``re``-compatible mode: it
    takes a timeout per search (``re`` cannot be stopped, and one catastrophic pattern
    on a large body would hold a store reader, or the API's event loop, for hours)."""
    flags = regex.IGNORECASE | regex.V0 | _FLAGS.get(code, 0)
    source: str | bytes = pattern.encode("utf-8", "surrogateescape") if binary else pattern
    return regex.compile(source, flags)


class FilterTimeout(Exception):
    """One regex search ran past ``SEARCH_TIMEOUT`` (a pattern that backtracks badly)."""


SEARCH_TIMEOUT = 0.05  # seconds per search: a 1 MiB body takes about a millisecond


def _searcher(rx: Any, code: str) -> Callable[[Any], bool]:
    def search(text: Any) -> bool:
        try:
            return rx.search(text, timeout=SEARCH_TIMEOUT) is not None
        except TimeoutError:
            raise FilterTimeout(
                f"the ~{code} pattern took over {SEARCH_TIMEOUT * 1000:g} ms on one flow "
                "(it backtracks badly): simplify it"
            ) from None

    return search


# -- parsing -----------------------------------------------------------------------------
class _Fail(Exception):
    """A branch did not match at ``pos`` (the parser backtracks, like pyparsing)."""

    def __init__(self, pos: int, expected: str) -> None:
        self.pos = pos
        self.expected = expected


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.depth = 0  # parentheses and "!" open at this point
        self.furthest = 0
        self.expected: list[str] = []  # what would have continued the parse at ``furthest``

    def fail(self, pos: int, expected: str) -> _Fail:
        if pos > self.furthest:
            self.furthest, self.expected = pos, []
        if pos == self.furthest and expected not in self.expected:
            self.expected.append(expected)
        return _Fail(pos, expected)

    def error(self, end: int) -> FilterError:
        if end > self.furthest or not self.expected:
            pos, wanted = end, ["end of expression"]
        else:
            pos, wanted = self.furthest, self.expected
            specific = [w for w in wanted if w.startswith("a known operator")]
            wanted = specific or wanted
        expected = wanted[0] if len(wanted) == 1 else ", ".join(wanted[:-1]) + " or " + wanted[-1]
        found = repr(self.text[pos]) if pos < len(self.text) else "the end"
        return FilterError(
            f"invalid filter at column {pos + 1} (found {found}): expected {expected}",
            pos,
            expected,
        )

    def skip(self, pos: int) -> int:
        text = self.text
        while pos < len(text) and text[pos] in _WHITESPACE:
            pos += 1
        return pos

    # filter := infix+  (two or more: one And)
    def parse(self) -> Node:
        nodes: list[Node] = []
        pos = 0
        while True:
            try:
                node, pos = self.infix(pos)
            except _Fail:
                break
            nodes.append(node)
        end = self.skip(pos)
        if not nodes or end != len(self.text):
            raise self.error(end)
        return nodes[0] if len(nodes) == 1 else And(tuple(nodes))

    # infix := and ("|" and)*,  and := not ("&" not)*  (each repeat backtracks on failure)
    def infix(self, pos: int) -> tuple[Node, int]:
        return self._binary(pos, "|", self.conj, Or)

    def conj(self, pos: int) -> tuple[Node, int]:
        return self._binary(pos, "&", self.neg, And)

    def _binary(
        self,
        pos: int,
        op: str,
        operand: Callable[[int], tuple[Node, int]],
        make: Callable[[tuple[Node, ...]], Node],
    ) -> tuple[Node, int]:
        first, pos = operand(pos)
        items = [first]
        while True:
            at = self.skip(pos)
            if at >= len(self.text) or self.text[at] != op:
                self.fail(at, f"'{op}'")
                break
            node, pos = operand(at + 1)  # an operator commits: a term must follow
            items.append(node)
        return (items[0] if len(items) == 1 else make(tuple(items))), pos

    # not := "!" not | primary   (a "!" where a term is expected commits, like & and |)
    def neg(self, pos: int) -> tuple[Node, int]:
        at = self.skip(pos)
        if at < len(self.text) and self.text[at] == "!":
            with self.nested(at):
                child, after = self.neg(at + 1)
            return Not(child), after
        return self.primary(pos)

    @contextlib.contextmanager
    def nested(self, at: int) -> Iterator[None]:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise FilterError(
                f"filter nested more than {MAX_NESTING} deep at column {at + 1}", at, "less nesting"
            )
        try:
            yield
        finally:
            self.depth -= 1

    # primary := atom | "(" infix ")"
    def primary(self, pos: int) -> tuple[Node, int]:
        try:
            return self.atom(pos)
        except _Fail:
            pass
        at = self.skip(pos)
        if at >= len(self.text) or self.text[at] != "(":
            raise self.fail(at, "an operator, a value or '('")
        with self.nested(at):
            node, after = self.infix(at + 1)
        close = self.skip(after)
        if close >= len(self.text) or self.text[close] != ")":
            raise self.fail(close, "')'")
        return node, close + 1

    def atom(self, pos: int) -> tuple[Node, int]:
        at = self.skip(pos)
        text = self.text
        if at < len(text) and text[at] == "~":
            end = at + 1
            while end < len(text) and "!" <= text[end] <= "~":  # ASCII printable
                end += 1
            code = text[at + 1 : end]
            op = OPERATORS.get(code)
            if op is None:
                raise self.fail(
                    at,
                    f"a known operator followed by a space, not {text[at:end]!r} (see "
                    "/api/filter-help)",
                )
            if op.kind == "unary":
                return Leaf(code), end
            if op.kind == "int":
                digits_at = self.skip(end)
                digits_end = digits_at
                while digits_end < len(text) and "0" <= text[digits_end] <= "9":
                    digits_end += 1
                if digits_end == digits_at:
                    raise self.fail(digits_at, f"a number after ~{code}")
                return Leaf(code, number=int(text[digits_at:digits_end])), digits_end
            value, after = self.value(end, f"a value after ~{code}")
            return self._leaf(code, value, at), after
        value, after = self.value(pos, "an operator, a value or '('")
        return self._leaf("u", value, at), after

    def _leaf(self, code: str, pattern: str, at: int) -> Leaf:
        leaf = Leaf(code, pattern=pattern)
        try:
            leaf.regex(binary=code in BINARY)
        except (regex.error, OverflowError, RecursionError, ValueError) as exc:
            raise FilterError(
                f"invalid regex for ~{code} at column {at + 1}: {exc}", at, "a valid regex"
            ) from None
        return leaf

    def value(self, pos: int, expected: str) -> tuple[str, int]:
        """An unquoted word, or a '…' / "…" string with backslash escapes."""
        at = self.skip(pos)
        text = self.text
        if at >= len(text):
            raise self.fail(at, expected)
        quote = text[at]
        if quote in "'\"":
            return self._quoted(at, quote)
        end = at
        while end < len(text) and text[end] not in _NOT_IN_WORD:
            end += 1
        if end == at:
            raise self.fail(at, expected)
        return text[at:end], end

    def _quoted(self, at: int, quote: str) -> tuple[str, int]:
        text = self.text
        out: list[str] = []
        i = at + 1
        while i < len(text):
            c = text[i]
            if c == quote:
                return "".join(out), i + 1
            if c in "\n\r":
                break
            if c == "\\" and i + 1 < len(text) and text[i + 1] not in "\n\r":
                nxt = text[i + 1]
                out.append(_WS_ESCAPES.get(nxt, nxt))
                i += 2
                continue
            out.append(c)
            i += 1
        raise self.fail(at, f"a closing {quote}")


_WS_ESCAPES = {"t": "\t", "n": "\n", "f": "\f", "r": "\r"}


def parse(text: str) -> Node:
    """The tree of ``text``, or ``FilterError`` with the position and what was expected."""
    if not text:
        raise FilterError("empty filter expression", 0, "a filter expression")
    if len(text) > MAX_EXPRESSION:
        raise FilterError(
            f"filter longer than {MAX_EXPRESSION} characters", MAX_EXPRESSION, "a shorter filter"
        )
    try:
        return _Parser(text).parse()
    except RecursionError:
        raise FilterError("filter nested too deeply", 0, "less nesting") from None


def explain(node: Node) -> str:
    """A human reading of the tree (``domain matches example.com and response code is 200``)."""
    if isinstance(node, Leaf):
        op = OPERATORS[node.code]
        value = str(node.number) if node.number is not None else repr(node.pattern)
        return op.describe.format(value)
    if isinstance(node, Not):
        return f"not ({explain(node.child)})"
    joiner = " and " if isinstance(node, And) else " or "
    return "(" + joiner.join(explain(c) for c in node.children) + ")"


def leaves(node: Node) -> Iterable[Leaf]:
    if isinstance(node, Leaf):
        yield node
    elif isinstance(node, Not):
        yield from leaves(node.child)
    else:
        for child in node.children:
            yield from leaves(child)


# -- a flow, as the operators read it -----------------------------------------------------
HTTP_KINDS = frozenset({"http", "websocket", None})
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
ASSET_TYPES = tuple(
    re.compile(p)
    for p in (
        rb"text/javascript",
        rb"application/x-javascript",
        rb"application/javascript",
        rb"text/css",
        rb"image/.*",
        rb"font/.*",
        rb"application/font.*",
    )
)


def _bytes(value: Any) -> bytes:
    text = value if isinstance(value, str) else str(value)
    try:
        return text.encode("latin-1")  # the proxy records header bytes as latin-1
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


def _b64(data: Any) -> bytes | None:
    if not isinstance(data, str):
        return None
    try:
        return base64.b64decode(data)
    except (binascii.Error, ValueError):
        return None


# The policy decision of a flow event (``policy``: ``{revision, matched: [{rule, phase,
# action, note}]}``, ``tags``), as ``~rule``/``~tag`` read it and the store indexes it. An
# event may come from any publisher, so only well-formed values count: ids and tags that
# are printable ASCII without spaces (what a policy allows, and what the store can keep
# space-delimited and match exactly), up to MAX_TOKEN characters, the first MAX_LISTED
# distinct ones of the first MAX_MATCHED entries.
MAX_MATCHED = 1024  # entries of ``matched`` (or ``tags``) looked at; a policy has <= 1000 rules
MAX_LISTED = 256  # distinct rule ids (tags) of one flow kept
MAX_TOKEN = 128  # characters of one rule id or tag (a policy allows 64)
_TOKEN = re.compile(rf"[!-~]{{1,{MAX_TOKEN}}}")  # printable ASCII, no space
FINAL_ACTIONS = frozenset({"block", "respond", "allow", "intercept"})
EDIT_ACTIONS = frozenset(
    {"map_remote", "set_headers", "remove_headers", "replace_body", "delay", "tag"}
)


def matched_entries(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The entries of ``policy.matched`` that are objects (the first MAX_MATCHED)."""
    policy = doc.get("policy")
    entries = policy.get("matched") if type(policy) is dict else None
    if type(entries) is not list:
        return []
    return [e for e in entries[:MAX_MATCHED] if type(e) is dict]


def tokens(values: Iterable[Any]) -> list[str]:
    """The well-formed, distinct strings of ``values`` in order (at most MAX_LISTED)."""
    out: dict[str, None] = {}
    for value in values:
        if type(value) is str and _TOKEN.fullmatch(value):
            out[value] = None
            if len(out) >= MAX_LISTED:
                break
    return list(out)


def rule_ids(doc: dict[str, Any]) -> list[str]:
    """The ids of the rules that matched the flow, in the order they applied."""
    return tokens(e.get("rule") for e in matched_entries(doc))


def tag_list(doc: dict[str, Any]) -> list[str]:
    """The flow's tags."""
    value = doc.get("tags")
    return tokens(value[:MAX_MATCHED]) if type(value) is list else []


def decision(doc: dict[str, Any]) -> str | None:
    """What the policy decided for the flow: the last final action that applied
    (``block``, ``respond``, ``allow``, ``intercept``), else ``modify`` when only edits
    applied, else None (no rule matched)."""
    final = None
    edited = False
    for entry in matched_entries(doc):
        action = entry.get("action")
        if type(action) is not str:
            continue
        if action in FINAL_ACTIONS:
            final = action
        elif action in EDIT_ACTIONS:
            edited = True
    return final if final is not None else ("modify" if edited else None)


# What a listing, the decision log and a HAR entry show of the decision: the known
# fields, strings cut to a bound, whatever a publisher put there.
MAX_NOTE = 1024
MAX_FIELD = 128
MAX_MODIFIED = 16
_ENTRY_FIELDS = (("rule", MAX_FIELD), ("phase", 16), ("action", 32), ("note", MAX_NOTE))
_INTERCEPT_FIELDS = ("phase", "rule", "outcome", "by")
_INT_LIMIT = 1 << 63


def policy_summary(doc: dict[str, Any]) -> dict[str, Any] | None:
    """``{revision, matched: [{rule, phase, action, note}]}`` (the first MAX_LISTED
    entries), None when no policy was in force."""
    policy = doc.get("policy")
    if type(policy) is not dict:
        return None
    matched = []
    for entry in matched_entries(doc)[:MAX_LISTED]:
        kept = {}
        for name, limit in _ENTRY_FIELDS:
            value = entry.get(name)
            if type(value) is str:
                kept[name] = value[:limit]
        matched.append(kept)
    revision = policy.get("revision")
    if type(revision) is not int or not -_INT_LIMIT <= revision < _INT_LIMIT:
        revision = None
    return {"revision": revision, "matched": matched}


def intercept_summary(doc: dict[str, Any]) -> dict[str, Any] | None:
    """``{phase, rule, outcome, by, held_ms, modified}`` of a held exchange, else None."""
    value = doc.get("intercept")
    if type(value) is not dict:
        return None
    kept: dict[str, Any] = {}
    for name in _INTERCEPT_FIELDS:
        field = value.get(name)
        kept[name] = field[:MAX_FIELD] if type(field) is str else None
    held = value.get("held_ms")
    if type(held) is int and -_INT_LIMIT <= held < _INT_LIMIT:
        held = float(held)
    kept["held_ms"] = held if type(held) is float and math.isfinite(held) else None
    modified = value.get("modified")
    kept["modified"] = (
        [m[:MAX_FIELD] for m in modified[:MAX_MODIFIED] if type(m) is str]
        if type(modified) is list
        else []
    )
    return kept


def replay_of(doc: dict[str, Any]) -> str | None:
    """The id of the flow this one replays (a short string), else None."""
    value = doc.get("replay_of")
    return value if type(value) is str and 0 < len(value) <= 64 else None


class FlowView:
    """Read-only accessors over one flow event, each computed once (lazily)."""

    __slots__ = ("_bodies", "_cache", "doc")

    def __init__(
        self,
        doc: dict[str, Any],
        bodies: Callable[[str], bytes | None] | None = None,
    ) -> None:
        """``bodies(which)``: the recorded bytes of the request or response body (None:
        not known), for a caller that holds them as bytes (the store); otherwise they
        are read from ``body_b64`` in the document."""
        self.doc = doc
        self._bodies = bodies
        self._cache: dict[str, Any] = {}

    def _part(self, name: str) -> dict[str, Any] | None:
        part = self.doc.get(name)
        return part if isinstance(part, dict) else None

    @property
    def is_http(self) -> bool:
        return self.doc.get("kind") in HTTP_KINDS

    @property
    def response(self) -> dict[str, Any] | None:
        part = self._part("response")
        status = part.get("status") if part is not None else None
        return part if type(status) is int and status > 0 else None

    def status(self) -> int | None:
        part = self.response
        return part["status"] if part is not None else None

    def text(self, name: str) -> str:
        value = self.doc.get(name)
        return value if isinstance(value, str) else ""

    def headers(self, which: str) -> list[Any]:
        part = self._part(which)
        headers = part.get("headers") if part is not None else None
        return headers if isinstance(headers, list) else []

    def header_block(self, which: str) -> bytes:
        key = "hb" + which
        block = self._cache.get(key)
        if block is None:
            lines = []
            for pair in self.headers(which):
                if isinstance(pair, list | tuple) and len(pair) == 2:
                    lines.append(_bytes(pair[0]) + b": " + _bytes(pair[1]) + b"\r\n")
            block = self._cache[key] = b"".join(lines)
        return block

    def content_types(self, which: str) -> list[bytes]:
        return [
            _bytes(pair[1])
            for pair in self.headers(which)
            if isinstance(pair, list | tuple)
            and len(pair) == 2
            and str(pair[0]).lower() == "content-type"
        ]

    def body(self, which: str) -> bytes | None:
        """The body as ``~b`` sees it (``codings.as_filters_see_it``); None while unknown."""
        key = "body" + which
        if key in self._cache:
            cached: bytes | None = self._cache[key]
            return cached
        part = self._part(which) if which == "request" else self.response
        if part is None:
            raw = None
        elif self._bodies is not None:
            raw = self._bodies(which)
        else:
            raw = _b64(part.get("body_b64"))
        if raw is not None:
            encodings = [
                str(pair[1])
                for pair in self.headers(which)
                if isinstance(pair, list | tuple)
                and len(pair) == 2
                and str(pair[0]).lower() == "content-encoding"
            ]
            if encodings:  # several headers count as one list, as mitmproxy reads them
                raw = codings.as_filters_see_it(raw, ", ".join(encodings))
        self._cache[key] = raw
        return raw

    def host_header(self) -> str | None:
        for pair in self.headers("request"):
            if isinstance(pair, list | tuple) and len(pair) == 2 and str(pair[0]).lower() == "host":
                return str(pair[1])
        return None

    def pretty_host(self) -> str:
        """The Host header's host (port dropped), else the request's host."""
        host = self._cache.get("ph")
        if host is None:
            header = self.host_header()
            host = (authority_parts(header)[0] if header else "") or self.text("host")
            self._cache["ph"] = host
        return str(host)

    def url(self) -> str:
        url = self._cache.get("url")
        if url is None:
            url = self._cache["url"] = pretty_url(
                self.text("scheme") or "http",
                self.text("host"),
                self.doc.get("port"),
                self.text("path"),
                self.text("method"),
                self.host_header(),
            )
        return str(url)

    def rule_ids(self) -> list[str]:
        ids: list[str] | None = self._cache.get("rules")
        if ids is None:
            ids = self._cache["rules"] = rule_ids(self.doc)
        return ids

    def tags(self) -> list[str]:
        found: list[str] | None = self._cache.get("tags")
        if found is None:
            found = self._cache["tags"] = tag_list(self.doc)
        return found

    def address(self, name: str) -> str | None:
        value = self.doc.get(name)
        if isinstance(value, list | tuple) and len(value) >= 2 and value[0]:
            return f"{value[0]}:{value[1]}"
        return None

    def destination(self) -> str | None:
        """mitmproxy's server address: the host and port the client asked for, once the
        proxy had a server for it (a refused connection has none)."""
        host = self.doc.get("host")
        if self.doc.get("server") and isinstance(host, str) and host:
            return f"{host}:{self.doc.get('port')}"
        return None


def authority_parts(authority: str) -> tuple[str, int | None]:
    """A Host header value's host and port (``[::1]:8080`` -> ``("::1", 8080)``)."""
    value = authority.strip()
    host, port_text = value, ""
    if value.startswith("["):
        end = value.find("]")
        if end > 0:
            host, rest = value[1:end], value[end + 1 :]
            port_text = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, port_text = value.split(":", 1)
    port = int(port_text) if port_text.isascii() and port_text.isdigit() else None
    return host, port


def authority_host(authority: str) -> str:
    return authority_parts(authority)[0]


def url_authority(scheme: str, host: str, port: Any) -> str:
    """``host[:port]`` as a URL shows it: IPv6 bracketed, the scheme's default port left out."""
    shown = f"[{host}]" if ":" in host else host
    if port is not None and DEFAULT_PORTS.get(scheme) != port:
        shown = f"{shown}:{port}"
    return shown


def pretty_url(
    scheme: str, host: str, port: Any, path: str, method: str = "", host_header: str | None = None
) -> str:
    """The URL mitmproxy's ``~u`` searches: built from the Host header when there is one
    (its host and port; no port there means the scheme's default), else from the request."""
    if method.upper() == "CONNECT":
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if host_header:
        h, p = authority_parts(host_header)
        if h:
            host, port = h, p if p is not None else DEFAULT_PORTS.get(scheme)
    return f"{scheme}://{url_authority(scheme, host, port)}{path}"


# -- evaluation --------------------------------------------------------------------------
Predicate = Callable[[FlowView], bool]


def _regex_leaf(leaf: Leaf) -> Predicate:
    code = leaf.code
    search = leaf.searcher()
    if code == "u":
        return lambda f: f.is_http and search(f.url())
    if code == "d":  # the Host header's host is searched too when it differs

        def domain(f: FlowView) -> bool:
            if not f.is_http:
                return False
            host = f.text("host")
            if search(host):
                return True
            pretty = f.pretty_host()
            return pretty != host and search(pretty)

        return domain
    if code == "m":
        return lambda f: f.is_http and search(_bytes(f.text("method")))
    if code in ("h", "hq", "hs"):
        parts = {"h": ("request", "response"), "hq": ("request",), "hs": ("response",)}[code]

        def headers(f: FlowView) -> bool:
            if not f.is_http:
                return False
            for which in parts:
                if which == "response" and f.response is None:
                    continue
                if search(f.header_block(which)):
                    return True
            return False

        return headers
    if code in ("t", "tq", "ts"):
        parts = {"t": ("request", "response"), "tq": ("request",), "ts": ("response",)}[code]

        def ctype(f: FlowView) -> bool:
            if not f.is_http:
                return False
            for which in parts:
                if which == "response" and f.response is None:
                    continue
                if any(search(v) for v in f.content_types(which)):
                    return True
            return False

        return ctype
    if code in ("b", "bq", "bs"):
        parts = {"b": ("request", "response"), "bq": ("request",), "bs": ("response",)}[code]

        def body(f: FlowView) -> bool:
            if not f.is_http:
                return False
            for which in parts:
                content = f.body(which)
                if content is not None and search(content):
                    return True
            return False

        return body
    if code == "src":
        return lambda f: (a := f.address("client")) is not None and search(a)
    if code == "dst":
        return lambda f: (a := f.destination()) is not None and search(a)
    if code in ("replica", "state", "kind"):
        return lambda f: search(f.text(code))
    if code == "rule":
        return lambda f: any(search(r) for r in f.rule_ids())
    if code == "tag":
        return lambda f: any(search(t) for t in f.tags())
    if code == "meta":

        def meta(f: FlowView) -> bool:
            data = f.doc.get("metadata")
            items = data.items() if isinstance(data, dict) else ()
            return search("\n".join(f"{k}: {v}" for k, v in items))

        return meta
    if code in ("marker", "comment"):
        field = "marked" if code == "marker" else "comment"
        return lambda f: search(f.text(field))
    raise AssertionError(code)


def _unary_leaf(code: str) -> Predicate:
    if code == "all":
        return lambda f: True
    if code == "http":
        return lambda f: f.is_http
    if code == "websocket":
        return lambda f: f.doc.get("kind") == "websocket"
    if code == "tcp":
        return lambda f: f.doc.get("kind") == "tunnel"
    if code in ("udp", "dns"):
        return lambda f: False
    if code == "q":
        return lambda f: f.is_http and f.response is None
    if code == "s":
        return lambda f: f.is_http and f.response is not None
    if code == "e":
        return lambda f: bool(f.doc.get("error"))
    if code == "marked":
        return lambda f: bool(f.doc.get("marked"))
    if code == "replay":
        return lambda f: f.doc.get("is_replay") is not None
    if code == "replayq":
        return lambda f: f.doc.get("is_replay") == "request"
    if code == "replays":
        return lambda f: f.doc.get("is_replay") == "response"
    if code == "a":

        def asset(f: FlowView) -> bool:
            if not f.is_http or f.response is None:
                return False
            types = f.content_types("response")
            return any(p.search(v) is not None for p in ASSET_TYPES for v in types)

        return asset
    raise AssertionError(code)


def predicate(node: Node) -> Predicate:
    """The tree as one function over a ``FlowView``."""
    if isinstance(node, Leaf):
        if node.code == "c":
            number = node.number
            return lambda f: f.is_http and f.status() == number
        if OPERATORS[node.code].kind == "unary":
            return _unary_leaf(node.code)
        return _regex_leaf(node)
    if isinstance(node, Not):
        inner = predicate(node.child)
        return lambda f: not inner(f)
    preds = tuple(predicate(c) for c in node.children)
    if isinstance(node, And):
        return lambda f: all(p(f) for p in preds)
    return lambda f: any(p(f) for p in preds)


class Filter:
    """A parsed expression, ready to match flow events."""

    __slots__ = ("_pred", "text", "tree")

    def __init__(self, text: str) -> None:
        self.text = text
        self.tree = parse(text)
        self._pred = predicate(self.tree)

    def matches(self, flow: dict[str, Any] | FlowView) -> bool:
        view = flow if isinstance(flow, FlowView) else FlowView(flow)
        return bool(self._pred(view))

    def explain(self) -> str:
        return explain(self.tree)


def compile_filter(text: str) -> Filter:
    """``text`` parsed and compiled (``FilterError`` if it is not a filter)."""
    return Filter(text)
