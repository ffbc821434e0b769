"""Wire models shared by the services (control plane only: the proxy's hot path
builds flow events as plain dicts, see ``services.proxy.capture.flow_event``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ReplicaState = Literal["running", "stopped", "starting", "stopping"]


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
    events_queued: int = 0
    config_revision: int = 0
    config_error: str | None = None
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
    since: float | None = Field(None, description="epoch seconds, flows started at or after")
    until: float | None = Field(None, description="epoch seconds, flows started before")
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
