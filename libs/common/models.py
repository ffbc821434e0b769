"""Wire models shared by the services (control plane only: the proxy's hot path
builds flow events as plain dicts, see ``services.proxy.capture.flow_event``).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ReplicaState = Literal["running", "stopped", "starting", "stopping"]

_GLOB_OK = re.compile(r"^[a-z0-9_*?-]+(?:\.[a-z0-9_*?-]+)*$")

# Headers masked in recorded flows unless the config says otherwise (``redact_headers``).
DEFAULT_REDACT_HEADERS = (
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
)
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]{1,256}")  # an RFC 9110 field name, lowercased


def parse_destination(
    entry: str,
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network | str, int | None]:
    """A ``destination_allow``/``destination_deny`` entry -> (network or host glob, port).

    Forms: a CIDR or IP (``10.0.0.0/8``, ``10.1.2.3``, ``::1``, ``fc00::/7``), a host
    glob (``*.internal.example``), each optionally with ``:port`` (``10.0.0.5:8080``,
    ``[fc00::/7]:443``, ``*.corp.example:8443``; an IPv6 entry with a port needs brackets,
    so one colon always means a port). IPv4-mapped IPv6 (``::ffff:10.0.0.0/104``) is
    taken as the IPv4 it names. Numeric host names that ``inet_aton`` reads as an IPv4
    address (``127.1``, ``2130706433``, ``0x7f000001``) are refused as ambiguous: a glob
    would match only that spelling, while the address it means would slip by.
    Raises ``ValueError`` naming the entry.
    """
    text = entry.strip().lower()
    target, port_text = text, None
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"invalid destination {entry!r}: expected [IPv6] or [IPv6]:port")
        target, port_text = inner, rest[1:] if rest else None
    elif text.count(":") == 1:
        target, _, port_text = text.partition(":")
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
            raise ValueError(f"invalid destination {entry!r}: bad port {port_text!r}")
        port = int(port_text)
    if "%" in target:  # a scope names an interface, not a destination
        raise ValueError(f"invalid destination {entry!r}: no %scope in an address")
    try:
        net = ipaddress.ip_network(target)
    except ValueError as exc:
        if "/" in target or ":" in target:
            raise ValueError(f"invalid destination {entry!r}: {exc}") from None
        glob = target.removesuffix(".")
        if not glob or len(glob) > 253 or not _GLOB_OK.match(glob):
            raise ValueError(
                f"invalid destination {entry!r}: not a CIDR, an IP address or a host glob"
            ) from None
        try:
            socket.inet_aton(glob)
        except OSError:
            return glob, port
        raise ValueError(
            f"invalid destination {entry!r}: ambiguous IPv4 form, write it as a.b.c.d"
        ) from None
    mapped = net.network_address.ipv4_mapped if net.version == 6 else None
    if mapped is not None and net.prefixlen >= 96:
        net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
    return net, port


class RuntimeConfig(BaseModel):
    """The hot-reloadable proxy configuration (KV ``fleet_config``/``proxy``).

    Validated wherever it is written or read; a replica that cannot apply a
    document keeps its last good one.
    """

    model_config = ConfigDict(extra="forbid")

    capture_body_limit: int = Field(1 << 20, ge=0, le=64 << 20, description="bytes per body kept")
    ignore_hosts: list[str] = Field(
        default_factory=list, description="host globs (e.g. *.bank.example) tunnelled untouched"
    )
    intercept_tls: bool = Field(True, description="decrypt CONNECT tunnels")
    upstream_verify_tls: bool = Field(True, description="verify upstream certificates")
    upstream_connect_timeout: float = Field(10.0, gt=0, le=300)
    upstream_read_timeout: float = Field(60.0, gt=0, le=3600)
    client_idle_timeout: float = Field(60.0, gt=0, le=3600)
    client_body_timeout: float = Field(
        30.0, gt=0, le=3600, description="seconds of grace before a request body's minimum rate"
    )
    client_body_min_rate: float = Field(
        1024.0, gt=0, description="bytes/s a request body must average after the grace period"
    )
    destination_allow: list[str] = Field(
        default_factory=list,
        description="CIDRs, IPs or host globs (optional :port) exempt from the private-range "
        "refusal; fleet endpoints stay refused",
    )
    destination_deny: list[str] = Field(
        default_factory=list,
        description="CIDRs, IPs or host globs (optional :port) always refused (beats allow)",
    )
    redact_headers: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REDACT_HEADERS),
        max_length=256,
        description="header names (any case) whose values are masked in recorded flows, "
        "requests and responses; Proxy-Authorization is never recorded, and the fleet's own "
        "API keys are masked wherever an X-API-Key or Bearer token carries them",
    )

    @field_validator("redact_headers")
    @classmethod
    def _header_names(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for name in v:
            name = name.strip().lower()
            if not _FIELD_NAME.fullmatch(name):
                raise ValueError(f"invalid header name {name!r}")
            if name not in out:
                out.append(name)
        return out

    @field_validator("destination_allow", "destination_deny")
    @classmethod
    def _destinations(cls, v: list[str]) -> list[str]:
        for entry in v:
            parse_destination(entry)
        return [entry.strip().lower() for entry in v]

    @field_validator("ignore_hosts")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        out = []
        for p in v:
            p = p.strip().lower()
            if not p or any(c.isspace() for c in p) or len(p) > 253:
                raise ValueError(f"invalid host pattern {p!r}")
            out.append(p)
        return out


class ReplicaStatus(BaseModel):
    """A replica's heartbeat in the registry (KV ``fleet_replicas``, key = replica id)."""

    id: str
    state: ReplicaState
    listen: str
    mode: str
    active_connections: int = 0
    active_flows: int = 0
    flows_total: int = 0
    events_published: int = 0
    events_dropped: int = 0
    events_undeliverable: int = 0  # taken for publishing but refused by NATS, or lost at stop
    events_queued: int = 0
    config_revision: int = 0
    config_error: str | None = None
    policy_revision: int = 0  # the rules policy in force (0: none)
    policy_error: str | None = None  # "revision N rejected: why" (the last good one runs)
    intercepts_pending: int = 0  # exchanges held for a decision
    started_at: float
    updated_at: float
    version: str = "0.1.0"


class CommandReply(BaseModel):
    """What a replica answers to a command (``fleet.cmd.<replica|all>.<verb>``)."""

    replica: str
    ok: bool
    code: str | None = None
    message: str | None = None
    status: ReplicaStatus | None = None
    data: dict[str, Any] = Field(default_factory=dict)


FlowState = Literal["active", "completed", "error", "killed"]
FlowDecision = Literal["block", "respond", "allow", "intercept", "modify", "any"]


class FlowQuery(BaseModel):
    """Filters and page of a flow listing (``fleet.store.list`` / ``fleet.store.count``).

    ``host`` is exact or a leading-wildcard glob (``*.example.com``). Listing is
    newest first; ``cursor`` is the opaque ``next_cursor`` of the previous page.
    """

    model_config = ConfigDict(extra="forbid")

    host: str | None = Field(None, max_length=253)
    method: str | None = Field(None, max_length=32)
    status: int | None = Field(None, ge=100, le=599)
    min_status: int | None = Field(None, ge=100, le=599)
    max_status: int | None = Field(None, ge=100, le=599)
    state: FlowState | None = None
    replica: str | None = Field(None, max_length=64)
    path: str | None = Field(
        None, min_length=1, max_length=2048, description="path prefix (/api/ matches /api/v1)"
    )
    q: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="a mitmproxy filter expression (~d example.com & ~c 500); "
        "see GET /api/filter-help",
    )
    since: float | None = Field(None, description="epoch seconds, flows started at or after")
    until: float | None = Field(None, description="epoch seconds, flows started before")
    rule: str | None = Field(
        None,
        max_length=128,
        pattern=r"^[!-~]+$",
        description="flows a policy rule with this id matched (ASCII case ignored)",
    )
    tag: str | None = Field(
        None,
        max_length=128,
        pattern=r"^[!-~]+$",
        description="flows with this tag (ASCII case ignored)",
    )
    decision: FlowDecision | None = Field(
        None,
        description="what the policy decided: the last final action that applied (block, "
        "respond, allow, intercept), modify when only edits applied; any: some rule matched",
    )
    limit: int = Field(100, ge=1, le=1000)
    cursor: str | None = Field(None, max_length=128)


class StoreError(BaseModel):
    """Error reply of a store query; ``code`` is stable (e.g. FLOW_NOT_FOUND, BAD_QUERY)."""

    code: str
    message: str


Severity = Literal["info", "warning", "error"]


class SystemEvent(BaseModel):
    """One entry of the system event log (stream EVENTS, ``fleet.events.<source>.<type>``).

    ``source`` is the component the event is about (a proxy replica id, a store id, ``api``),
    ``replica`` the process that emitted it. ``data`` never holds a secret or a body.
    """

    id: str = Field(description="unique, time-ordered")
    type: str = Field(description="e.g. replica_started, config_rejected, audit")
    source: str
    time: float = Field(description="epoch seconds when the event happened")
    severity: Severity = "info"
    replica: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
