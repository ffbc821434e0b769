"""Intercepts held for a person's decision: the wire models between the API and replicas.

An ``intercept`` rule holds an exchange on the replica that relays it (see
``libs.common.policy``). Nothing about a held exchange lives in the API:

- ``fleet.cmd.<replica|all>.intercepts`` lists what a replica holds: the reply's
  ``data["pending"]`` is a list of ``PendingApproval`` (the API scatter-gathers it
  from ``all``, so pending approvals survive an API restart).
- ``fleet.cmd.all.decide`` carries one ``Decision``. The replica holding ``id`` answers
  ``ok`` with ``data["approval"]`` (the ``PendingApproval`` it resolved); the others
  answer ``APPROVAL_NOT_FOUND``; a replica that already resolved ``id`` (a decision,
  its timeout, a kill, the client leaving) answers ``APPROVAL_DECIDED``.
- System events (stream EVENTS, source = the replica): ``intercept_created``
  (``data["approval"]``), ``intercept_resolved`` (``id``, ``flow_id``, ``decision``,
  ``by``) and ``intercept_timeout`` (``id``, ``flow_id``, ``on_timeout``).
- Cached approvals (``approve``): KV ``fleet_approvals``, one entry per
  ``cache_key(rule, method, url)``, value ``CachedApproval``. The API writes them;
  every replica watches the bucket, and an intercept rule whose exchange has a live
  entry lets it through without holding it.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from libs.common.policy import MAX_BODY, Phase, header_syntax, header_value

INTERCEPTS_VERB = "intercepts"  # fleet.cmd.<replica|all>.intercepts: what a replica holds
DECIDE_VERB = "decide"  # fleet.cmd.all.decide: one Decision

DecisionKind = Literal["approve", "allow_once", "deny", "modify"]
# how a held exchange ended, as the flow records it (``intercept.outcome``)
Outcome = Literal[
    "approved", "allowed_once", "denied", "modified", "timeout_allowed", "timeout_denied",
    "killed", "client_gone", "cached",
]  # fmt: skip


def approval_id(flow_id: str, phase: Phase) -> str:
    """A flow can be held twice (request, then response): one approval id each."""
    return f"{flow_id}-{phase}"


def strip_query(url: str) -> str:
    return url.split("?", 1)[0].split("#", 1)[0]


def cache_key(rule: str, method: str, url: str) -> str:
    """The KV key of a cached approval: what an entry is identified by is the rule, the
    method and the URL without its query string."""
    text = f"{rule}\n{method.upper()}\n{strip_query(url)}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


class HeldRequest(BaseModel):
    method: str
    url: str
    headers: list[tuple[str, str]]
    body_size: int | None = Field(None, description="Content-Length when known")


class HeldResponse(BaseModel):
    status: int
    reason: str = ""
    headers: list[tuple[str, str]]


class PendingApproval(BaseModel):
    """One exchange held on a replica, waiting for a decision."""

    id: str
    flow_id: str
    replica: str
    phase: Phase
    rule: str
    created_at: float
    expires_at: float
    timeout_s: float
    on_timeout: Literal["allow", "deny"]
    request: HeldRequest
    response: HeldResponse | None = None


class RequestEdit(BaseModel):
    """``modify`` at the request phase: what replaces the held request's parts.

    ``headers`` replaces the whole list (send back the listed one, edited); the headers
    the proxy owns (framing, hop-by-hop, Host, Proxy-Authorization) keep their original
    values whatever the list says, and a value left as ``<redacted>`` keeps the original
    value of that header."""

    model_config = ConfigDict(extra="forbid")

    method: str | None = Field(None, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}$")
    url: str | None = Field(None, max_length=8192, description="absolute http(s) URL")
    headers: list[tuple[str, str]] | None = Field(None, max_length=200)
    body: str | None = Field(None, max_length=MAX_BODY)

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: list[tuple[str, str]] | None) -> list[tuple[str, str]] | None:
        return None if v is None else [(header_syntax(n), header_value(x)) for n, x in v]


class ResponseEdit(BaseModel):
    """``modify`` at the response phase."""

    model_config = ConfigDict(extra="forbid")

    status: int | None = Field(None, ge=200, le=599)
    headers: list[tuple[str, str]] | None = Field(None, max_length=200)
    body: str | None = Field(None, max_length=MAX_BODY)

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: list[tuple[str, str]] | None) -> list[tuple[str, str]] | None:
        return None if v is None else [(header_syntax(n), header_value(x)) for n, x in v]


class Decision(BaseModel):
    """What the API sends to ``fleet.cmd.all.decide``."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(max_length=128)
    decision: DecisionKind
    by: str | None = Field(None, description="the deciding API key's id")
    status: int | None = Field(None, ge=200, le=599, description="deny: the answer's status")
    body: str | None = Field(None, max_length=MAX_BODY, description="deny: the answer's body")
    request: RequestEdit | None = None
    response: ResponseEdit | None = None


class CachedApproval(BaseModel):
    """A KV ``fleet_approvals`` entry: exchanges matching it pass until ``expires_at``."""

    rule: str
    method: str
    url: str = Field(description="without the query string")
    by: str | None = None
    created_at: float
    expires_at: float

    def key(self) -> str:
        return cache_key(self.rule, self.method, self.url)


def pending_from_reply(data: dict[str, Any]) -> list[PendingApproval]:
    """The ``intercepts`` command reply's approvals (unreadable entries skipped)."""
    out = []
    for item in data.get("pending") or ():
        try:
            out.append(PendingApproval.model_validate(item))
        except ValueError:
            continue
    return out
