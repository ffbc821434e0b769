"""The rules policy: one ordered list of rules in KV ``fleet_policy``/``policy``.

A rule matches exchanges with a filter expression (the filter language of
``libs.common.flowfilter``) at one phase and does one thing to them. The API
validates every write with these models; each proxy replica validates again,
compiles the revision once (``services.proxy.addons.rules``) and keeps its last good
revision when a new one cannot be applied.

How a phase is evaluated (the one model a user has to predict; README "Rules"):

1. The enabled rules of the phase (``request``: the request head is in, nothing went
   upstream; ``response``: the response head is in, nothing went to the client) are
   ordered by ``priority`` (higher first), ties by their position in the document.
2. Every rule's filter is checked against the exchange as it was when the phase
   began: a rule never matches because of another rule's edit.
3. The matching rules' actions apply in that order. Edits accumulate, each on the
   result of the one before (``set_headers``, ``remove_headers``, ``map_remote``,
   ``replace_body``, ``tag``, ``delay``); the first *final* action (``block``,
   ``respond``, ``allow``, ``intercept``) applies and ends the phase, so later matches
   are not applied. Delays add up and are waited once, before the exchange goes on
   (or is answered).

Rules match on heads: body operators (``~b ~bq ~bs``) are refused, and so are
response operators (``~c ~s ~hs ~ts ~a``, ``~e``) in a request-phase rule, where they
could never match.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from libs.common import flowfilter

MAX_RULES = 1000
MAX_BODY = 64 * 1024  # bytes of a block/respond body or a replacement kept in the policy
MAX_DELAY_MS = 60_000
MAX_INTERCEPT_TIMEOUT = 3600.0

Phase = Literal["request", "response"]
FINAL_ACTIONS = frozenset({"block", "respond", "allow", "intercept"})

_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}")
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")
_BAD_VALUE = re.compile(r"[\x00\r\n]")
# Headers a rule may not set or remove: the relay frames every message itself, hop-by-hop
# headers belong to one connection, and the target is changed with map_remote, not Host.
PROTECTED_HEADERS = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "host",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
BODY_CODES = frozenset({"b", "bq", "bs"})
RESPONSE_CODES = frozenset({"c", "s", "hs", "ts", "a", "e", "bs"})


def header_syntax(name: str) -> str:
    """``name`` if it is an RFC 9110 field name, else ``ValueError``."""
    if not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"invalid header name {name!r}")
    return name


def _header_name(name: str) -> str:
    header_syntax(name)
    if name.lower() in PROTECTED_HEADERS:
        raise ValueError(f"header {name!r} cannot be changed by a rule (the proxy owns it)")
    return name


def header_value(value: str) -> str:
    if _BAD_VALUE.search(value):
        raise ValueError("a header value cannot hold CR, LF or NUL")
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("a header value must be latin-1 text") from None
    return value


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regex: {exc}") from None
    return pattern


HeaderPair = tuple[Annotated[str, Field(max_length=256)], Annotated[str, Field(max_length=8192)]]


class _Action(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Block(_Action):
    """Answer with ``status`` and ``body`` (nothing goes upstream, or the upstream's
    response is dropped); ``close``: cut the client connection without an answer."""

    type: Literal["block"]
    status: int = Field(403, ge=200, le=599)
    body: str = Field("", max_length=MAX_BODY)
    close: bool = False


class Respond(_Action):
    """Answer with this response (a mock): nothing goes upstream at the request phase;
    at the response phase it replaces the upstream's response."""

    type: Literal["respond"]
    status: int = Field(200, ge=200, le=599)
    headers: list[HeaderPair] = Field(default_factory=list, max_length=100)
    body: str = Field("", max_length=MAX_BODY)

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(_header_name(n), header_value(val)) for n, val in v]


class MapRemote(_Action):
    """Rewrite the request URL: ``re.sub(pattern, replacement, url)`` (request phase).
    The replacement is literal (no backreferences), as in mitmproxy's modify_body."""

    type: Literal["map_remote"]
    pattern: str = Field(min_length=1, max_length=1024)
    replacement: str = Field(max_length=2048)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        return _regex(v)


class SetHeaders(_Action):
    """Replace every header of each name given (several pairs of one name: several
    headers) on the phase's message."""

    type: Literal["set_headers"]
    headers: list[HeaderPair] = Field(min_length=1, max_length=100)

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(_header_name(n), header_value(val)) for n, val in v]


class RemoveHeaders(_Action):
    """Remove every header of these names from the phase's message."""

    type: Literal["remove_headers"]
    names: list[Annotated[str, Field(max_length=256)]] = Field(min_length=1, max_length=100)

    @field_validator("names")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        return [_header_name(n) for n in v]


class ReplaceBody(_Action):
    """``re.sub(pattern, replacement, body)`` on the phase's body (bytes, DOTALL; the
    replacement is literal). The body is buffered up to the proxy's rule body limit;
    a larger one passes unchanged and the decision says so."""

    type: Literal["replace_body"]
    pattern: str = Field(min_length=1, max_length=1024)
    replacement: str = Field(max_length=MAX_BODY)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        return _regex(v)


class Delay(_Action):
    type: Literal["delay"]
    ms: int = Field(ge=1, le=MAX_DELAY_MS)


class Tag(_Action):
    type: Literal["tag"]
    tags: list[str] = Field(min_length=1, max_length=16)

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        for tag in v:
            if not _TAG.fullmatch(tag):
                raise ValueError(f"invalid tag {tag!r} (letters, digits, _ . : / -; 1-64)")
        return list(dict.fromkeys(v))


class Allow(_Action):
    """Let the exchange through; later rules of the phase are not applied."""

    type: Literal["allow"]


class Intercept(_Action):
    """Hold the exchange until a person decides (``/api/approvals``), ``timeout_s``
    passes (then ``on_timeout``), the flow is killed, or the client goes away."""

    type: Literal["intercept"]
    timeout_s: float = Field(60.0, gt=0, le=MAX_INTERCEPT_TIMEOUT)
    on_timeout: Literal["allow", "deny"] = "deny"


Action = Annotated[
    Block
    | Respond
    | MapRemote
    | SetHeaders
    | RemoveHeaders
    | ReplaceBody
    | Delay
    | Tag
    | Allow
    | Intercept,
    Field(discriminator="type"),
]


class Match(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filter: str = Field(min_length=1, max_length=flowfilter.MAX_EXPRESSION)
    phase: Phase = "request"

    @field_validator("filter")
    @classmethod
    def _filter(cls, v: str) -> str:
        check_filter(v, None)
        return v

    @model_validator(mode="after")
    def _phase(self) -> Match:
        check_filter(self.filter, self.phase)
        return self


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="unique in the policy: letters, digits, _ . -; 1-64")
    enabled: bool = True
    priority: int = Field(0, ge=-1_000_000, le=1_000_000, description="higher runs first")
    description: str = Field("", max_length=1024)
    match: Match
    action: Action

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _RULE_ID.fullmatch(v):
            raise ValueError("a rule id is 1-64 letters, digits, _ . - (starting alnum)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        if self.action.type == "map_remote" and self.match.phase != "request":
            raise ValueError("map_remote rewrites the request: it needs phase 'request'")
        return self


class FilterInvalid(ValueError):
    """A rule's filter is refused: ``position`` in the expression and what was expected."""

    def __init__(self, message: str, position: int, expected: str) -> None:
        super().__init__(message)
        self.position = position
        self.expected = expected


def check_filter(text: str, phase: Phase | None) -> flowfilter.Node:
    """The parsed filter of a rule, or ``FilterInvalid`` (a ``ValueError``, so pydantic
    reports it on the field) naming the position. ``phase`` None: checks that do not
    depend on the phase only."""
    try:
        tree = flowfilter.parse(text)
    except flowfilter.FilterError as exc:
        raise FilterInvalid(
            f"{exc.message} (at position {exc.position}, expected {exc.expected})",
            exc.position,
            exc.expected,
        ) from None
    for leaf in flowfilter.leaves(tree):
        if leaf.code in BODY_CODES:
            why, expected = "rules match on heads, before bodies are read", "a head operator"
        elif phase == "request" and leaf.code in RESPONSE_CODES:
            why, expected = "a request-phase rule never has a response", "a request operator"
        else:
            continue
        at = re.search(rf"~{leaf.code}(?=\s|$)", text)
        position = at.start() if at else 0
        raise FilterInvalid(
            f"~{leaf.code} cannot be used here: {why} (at position {position})",
            position,
            expected,
        )
    return tree


class Policy(BaseModel):
    """The whole document (KV ``fleet_policy``/``policy``); revision = KV revision."""

    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = Field(default_factory=list, max_length=MAX_RULES)

    @field_validator("rules")
    @classmethod
    def _unique(cls, v: list[Rule]) -> list[Rule]:
        seen: set[str] = set()
        for rule in v:
            if rule.id in seen:
                raise ValueError(f"rule id {rule.id!r} appears twice")
            seen.add(rule.id)
        return v


def ordered(rules: list[Rule], phase: Phase) -> list[Rule]:
    """The enabled rules of ``phase`` in evaluation order (priority, then position)."""
    chosen = [r for r in rules if r.enabled and r.match.phase == phase]
    return sorted(chosen, key=lambda r: -r.priority)  # sort is stable: position breaks ties
