"""Exchanges held for a person's decision (``intercept`` rules), on the replica that holds them.

A held exchange is parked (``Exchange.hold``): no task, no CPU, one timer for its
timeout. It is freed by exactly one of: a decision (the ``decide`` command, see
``libs.common.approvals``), the timeout (``on_timeout``), a kill, or the client going
away. Whatever freed it is recorded on the flow (``flow.intercept``) and announced as a
system event; later decisions on the same id are told it was decided already.

Cached approvals (``approve``) are kept fleet-wide in KV ``fleet_approvals``; the
replica mirrors the bucket in ``cache`` (filled by ``Control.watch_approvals``), so a
matching exchange passes without a NATS round trip.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from libs.common import events
from libs.common.approvals import Decision, RequestEdit, ResponseEdit, approval_id, cache_key
from libs.common.flowfilter import pretty_url
from libs.common.policy import PROTECTED_HEADERS, Intercept, Phase
from services.proxy.flow import ACTIVE
from services.proxy.framing import BODY_LENGTH
from services.proxy.redact import MARK

if TYPE_CHECKING:
    from services.proxy.capture import Capture
    from services.proxy.exchange import Exchange

log = logging.getLogger("proxyfleet.intercepts")

DECIDED_KEPT = 10_000  # ids remembered after they were resolved (for 409 answers)
# exchanges one replica holds at most (~9 KiB each): past it, on_timeout applies at once, so
# a client that floods an intercept rule cannot grow a replica without bound
MAX_HELD = 10_000
_DENY_BODY = b"denied by an operator"
_TEXT = (b"Content-Type", b"text/plain; charset=utf-8")
_OWNED = frozenset(n.encode() for n in PROTECTED_HEADERS)

Emit = Callable[[str, dict[str, Any]], object]  # (event type, data): published off the loop


class DecisionRefused(Exception):
    """A decision that cannot be carried out: ``code`` as the contract names it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class Held:
    ex: Exchange
    phase: Phase
    rule: str
    spec: Intercept
    approval: dict[str, Any]
    started: float
    timer: asyncio.TimerHandle | None = None
    entry: dict[str, Any] = field(default_factory=dict)  # the rule's line in flow.policy


def _url(ex: Exchange) -> str:
    f = ex.flow
    host_header = next(
        (v.decode("latin-1") for n, v in f.req_headers if n.lower() == b"host"), None
    )
    return pretty_url(
        f.scheme, f.host, f.port, f.path.decode("latin-1"), f.method.decode("latin-1"), host_header
    )


def _edit_headers(
    old: list[tuple[bytes, bytes]], new: list[tuple[str, str]]
) -> list[tuple[bytes, bytes]]:
    """The edited header list; a value left as the redaction mark keeps the original
    value of that header (the operator saw it masked and sent it back unchanged)."""
    originals: dict[bytes, list[bytes]] = {}
    for n, v in old:
        originals.setdefault(n.lower(), []).append(v)
    out = [h for h in old if h[0].lower() in _OWNED]  # the proxy's own headers stay
    for name, value in new:
        raw = name.encode("latin-1")
        if raw.lower() in _OWNED:
            continue
        if value == MARK and originals.get(raw.lower()):
            out.append((raw, originals[raw.lower()].pop(0)))
        else:
            out.append((raw, value.encode("latin-1")))
    return out


class Intercepts:
    """The exchanges this replica holds, the ids it resolved, the approvals cache."""

    def __init__(self, replica: str, capture: Capture) -> None:
        self.replica = replica
        self.capture = capture  # its redaction masks what a pending approval shows
        self.pending: dict[str, Held] = {}
        self.decided: OrderedDict[str, str] = OrderedDict()
        self.cache: dict[str, float] = {}  # cache_key -> expires_at (epoch seconds)
        self.emit: Emit = lambda _type, _data: None  # set by Control once NATS is up

    # -- holding ------------------------------------------------------------------------------
    def hold(
        self, ex: Exchange, rule: str, phase: Phase, spec: Intercept, entry: dict[str, Any]
    ) -> None:
        """Hold ``ex`` at this phase's hook (or let it pass on a live cached approval)."""
        flow = ex.flow
        url = _url(ex)
        method = flow.method.decode("latin-1")
        expires = self.cache.get(cache_key(rule, method, url))
        now = time.time()
        if expires is not None and expires > now:
            entry["note"] = "cached approval"
            flow.intercept = {"phase": phase, "rule": rule, "outcome": "cached", "by": None}
            return
        if len(self.pending) >= MAX_HELD:
            allow = spec.on_timeout == "allow"
            outcome = "timeout_allowed" if allow else "timeout_denied"
            entry["note"] = f"{MAX_HELD} exchanges held already: {outcome}"
            flow.intercept = {"phase": phase, "rule": rule, "outcome": outcome, "by": None}
            if not allow:
                ex.respond(503, [_TEXT], b"too many exchanges waiting for a decision")
            return
        aid = approval_id(flow.id, phase)
        redact = self.capture.redaction
        request: dict[str, Any] = {
            "method": method,
            "url": url,
            "headers": redact.headers(flow.req_headers),
            "body_size": ex.content_length if ex.req_body == BODY_LENGTH else None,
        }
        approval: dict[str, Any] = {
            "id": aid,
            "flow_id": flow.id,
            "replica": self.replica,
            "phase": phase,
            "rule": rule,
            "created_at": now,
            "expires_at": now + spec.timeout_s,
            "timeout_s": spec.timeout_s,
            "on_timeout": spec.on_timeout,
            "request": request,
            "response": None,
        }
        if phase == "response":
            approval["response"] = {
                "status": flow.status,
                "reason": flow.reason.decode("latin-1"),
                "headers": redact.headers(flow.resp_headers),
            }
        held = Held(ex, phase, rule, spec, approval, time.monotonic(), entry=entry)
        held.timer = asyncio.get_running_loop().call_later(spec.timeout_s, self._timeout, aid)
        self.pending[aid] = held
        ex.on_end = self._ended
        flow.intercept = {"phase": phase, "rule": rule, "outcome": "pending", "by": None}
        entry["note"] = "held"
        ex.hold()
        self.emit(events.INTERCEPT_CREATED, {"approval": approval})

    def listing(self) -> list[dict[str, Any]]:
        return [h.approval for h in self.pending.values()]

    # -- resolving ---------------------------------------------------------------------------
    def _resolve(self, aid: str, outcome: str, by: str | None, modified: list[str]) -> Held:
        held = self.pending.pop(aid)
        if held.timer is not None:
            held.timer.cancel()
        self.decided[aid] = outcome
        while len(self.decided) > DECIDED_KEPT:
            self.decided.popitem(last=False)
        flow = held.ex.flow
        flow.intercept = {
            "phase": held.phase,
            "rule": held.rule,
            "outcome": outcome,
            "by": by,
            "held_ms": round((time.monotonic() - held.started) * 1000, 1),
            "modified": modified,
        }
        held.entry["note"] = outcome
        held.ex.on_end = None
        return held

    def decide(self, decision: Decision) -> dict[str, Any]:
        """Carry out one decision; the resolved approval, or ``DecisionRefused``."""
        aid = decision.id
        held = self.pending.get(aid)
        if held is None:
            if aid in self.decided:
                raise DecisionRefused(
                    "APPROVAL_DECIDED", f"{aid} was already resolved ({self.decided[aid]})"
                )
            raise DecisionRefused("APPROVAL_NOT_FOUND", f"{aid} is not held here")
        ex = held.ex
        kind = decision.decision
        if kind == "modify":
            edit = decision.request if held.phase == "request" else decision.response
            wrong = decision.response if held.phase == "request" else decision.request
            if edit is None or wrong is not None:
                raise DecisionRefused(
                    "APPROVAL_PHASE_MISMATCH",
                    f"{aid} is held at its {held.phase}: modify it with '{held.phase}' edits",
                )
            modified = self._modify(held, edit)
            if isinstance(edit, RequestEdit) and edit.url is not None and "url" not in modified:
                raise DecisionRefused("APPROVAL_INVALID", "the new url is not an http(s) URL")
            self._resolve(aid, "modified", decision.by, modified)
        elif kind == "deny":
            self._resolve(aid, "denied", decision.by, [])
            status = decision.status or 403
            body = decision.body.encode("utf-8") if decision.body is not None else _DENY_BODY
            ex.respond(status, [_TEXT], body)
        else:
            self._resolve(aid, "approved" if kind == "approve" else "allowed_once", decision.by, [])
        approval = held.approval
        self.emit(
            events.INTERCEPT_RESOLVED,
            {"id": aid, "flow_id": ex.flow.id, "decision": kind, "by": decision.by},
        )
        ex.resume()
        return approval

    def _modify(self, held: Held, edit: RequestEdit | ResponseEdit) -> list[str]:
        ex = held.ex
        flow = ex.flow
        done: list[str] = []
        if isinstance(edit, RequestEdit):
            if edit.url is not None:
                if ex.retarget(edit.url) is None:
                    done.append("url")
                else:
                    return done
            if edit.method is not None:
                flow.method = edit.method.encode("latin-1")
                done.append("method")
            if edit.headers is not None:
                flow.req_headers = _edit_headers(flow.req_headers, edit.headers)
                done.append("headers")
            if edit.body is not None:
                ex.replace_request_body(edit.body.encode("utf-8"))
                done.append("body")
            return done
        if edit.headers is not None:
            flow.resp_headers = _edit_headers(flow.resp_headers, edit.headers)
            done.append("headers")
        if edit.status is not None:
            flow.status = edit.status
            flow.reason = b""
            done.append("status")
        if edit.body is not None:  # a new body: the upstream's is dropped for this answer
            headers = [h for h in flow.resp_headers if h[0].lower() not in (b"content-length",)]
            ex.respond(flow.status, headers, edit.body.encode("utf-8"))
            done.append("body")
        return done

    def _timeout(self, aid: str) -> None:
        held = self.pending.get(aid)
        if held is None or held.ex.flow.state != ACTIVE:
            return
        allow = held.spec.on_timeout == "allow"
        self._resolve(aid, "timeout_allowed" if allow else "timeout_denied", None, [])
        ex = held.ex
        if not allow:
            ex.respond(504, [_TEXT], b"no decision in time: denied")
        self.emit(
            events.INTERCEPT_TIMEOUT,
            {"id": aid, "flow_id": ex.flow.id, "on_timeout": held.spec.on_timeout},
        )
        ex.resume()

    def _ended(self, ex: Exchange) -> None:
        """The exchange ended while held (killed, the client left): free its approval."""
        phases: tuple[Phase, ...] = ("request", "response")
        for phase in phases:
            aid = approval_id(ex.flow.id, phase)
            held = self.pending.get(aid)
            if held is None or held.ex is not ex:
                continue
            outcome = "killed" if ex.flow.state == "killed" else "client_gone"
            self._resolve(aid, outcome, None, [])
            self.emit(
                events.INTERCEPT_RESOLVED,
                {"id": aid, "flow_id": ex.flow.id, "decision": outcome, "by": None},
            )

    # -- the fleet-wide approvals cache ----------------------------------------------------------
    def cache_put(self, key: str, expires_at: float) -> None:
        self.cache[key] = expires_at

    def cache_drop(self, key: str) -> None:
        self.cache.pop(key, None)
