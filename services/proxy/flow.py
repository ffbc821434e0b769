"""The flow record: one client request/response (or tunnel) as the proxy saw it.

A ``Flow`` is created when a request's head is in, mutated by the relay as the
exchange progresses, and handed (by reference, never copied) to the capture
queue at start and at end. ``__slots__`` keeps it small; headers and bodies stay
as the bytes the parser produced until the publisher serialises them.
"""

from __future__ import annotations

import itertools
import math
import secrets
import time
from collections.abc import Sequence
from typing import Any

ACTIVE = "active"
COMPLETED = "completed"
ERROR = "error"
KILLED = "killed"

_node = secrets.randbits(24)
_counter = itertools.count()


def new_flow_id(now: float | None = None) -> str:
    """A time-ordered id: 12 hex digits of milliseconds, 6 of process, 6 of sequence.

    Ids sort by creation time across replicas (to the millisecond) and strictly
    within one process, which is what cursor pagination in the store relies on.
    """
    ms = time.time_ns() // 1_000_000 if now is None else math.floor(now * 1000)
    return f"{ms:012x}{_node:06x}{next(_counter) & 0xFFFFFF:06x}"


class Flow:
    """What the proxy records about one exchange (see DESIGN.md, "Flow model")."""

    __slots__ = (
        "client_addr",
        "error",
        "final_sent",
        "host",
        "http_version",
        "id",
        "intercept",
        "kind",
        "method",
        "path",
        "policy",
        "port",
        "reason",
        "replay_of",
        "req_body",
        "req_headers",
        "req_size",
        "req_truncated",
        "resp_body",
        "resp_headers",
        "resp_http_version",
        "resp_size",
        "resp_truncated",
        "scheme",
        "server_addr",
        "state",
        "stats",
        "status",
        "t_connect",
        "t_dns",
        "t_end",
        "t_first_byte",
        "t_request_sent",
        "t_start",
        "t_tls",
        "tags",
        "trace_id",
        "traceparent",
    )

    def __init__(self, client_addr: Any, kind: str = "http") -> None:
        now = time.time()
        self.id = new_flow_id(now)  # the same instant as t_start: since=t_start finds it
        self.kind = kind  # http | tunnel | websocket
        self.state = ACTIVE
        self.client_addr = client_addr
        self.server_addr: Any = None
        self.scheme = "http"
        self.method = b""
        self.host = ""
        self.port = 0
        self.path = b""
        self.http_version = "1.1"
        self.req_headers: list[tuple[bytes, bytes]] = []
        self.req_body: list[bytes] = []
        self.req_size = 0
        self.req_truncated = False
        self.status = 0
        self.reason = b""
        self.resp_http_version = ""
        self.resp_headers: list[tuple[bytes, bytes]] = []
        self.resp_body: list[bytes] = []
        self.resp_size = 0
        self.resp_truncated = False
        self.t_start = now
        # the upstream connection's phases, set by ``upstream.open_connection`` only when
        # this flow opened a new connection (0.0: not measured, e.g. a pooled connection
        # was reused; no ``t_tls`` for plain http or a blind tunnel)
        self.t_dns = self.t_connect = self.t_tls = 0.0
        self.t_request_sent = 0.0
        self.t_first_byte = 0.0
        self.t_end = 0.0
        self.error: str | None = None
        self.stats: dict[str, int] | None = None  # tunnel/websocket byte and message counts
        self.trace_id: str | None = None  # with ``traceparent``: set when tracing is on
        self.traceparent: str | None = None  # W3C value naming the flow's span
        self.final_sent = False  # set by the publisher once the final event went out
        # the rules policy's decision (``services.proxy.addons.rules``): None while no rule
        # is in force, else (revision, [{"rule", "phase", "action"[, "note"]}, ...]) (a
        # shared empty tuple until a rule applies)
        self.policy: tuple[int, Sequence[dict[str, Any]]] | None = None
        self.tags: list[str] | None = None
        self.intercept: dict[str, Any] | None = None  # held for a decision: what happened
        self.replay_of: str | None = None  # the flow this one replays

    def finish(self, state: str = COMPLETED, error: str | None = None) -> bool:
        """Move to a final state once; later calls (a kill racing a completion) are ignored."""
        if self.state != ACTIVE:
            return False
        self.state = state
        if error is not None:
            self.error = error
        self.t_end = time.time()
        return True
