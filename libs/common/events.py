"""The system event log: one helper every service uses to publish a ``SystemEvent``.

Events go to the EVENTS stream on ``fleet.events.<source>.<type>`` with a ``Nats-Msg-Id``
(so a retried or doubly detected event is stored once). Emitting is never allowed to
hurt the caller: ``emit`` waits for the stream's ack for a bounded time, swallows every
failure (NATS down, no stream, timeout) into a debug log line and a counter, and
``emit_soon`` does the same from a background task for code that cannot await.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from libs.common import subjects
from libs.common.models import Severity, SystemEvent
from libs.common.tasks import spawn

if TYPE_CHECKING:
    from libs.common.bus import Bus

log = logging.getLogger("proxyfleet.events")

# Event types (the last token of the subject). Sources: a proxy replica id, a store id, "api".
REPLICA_STARTED = "replica_started"
REPLICA_STOPPED = "replica_stopped"
REPLICA_GONE = "replica_gone"  # registry entry expired (no heartbeat, no deregistration)
LISTENER_STARTED = "listener_started"
LISTENER_STOPPED = "listener_stopped"
CONFIG_APPLIED = "config_applied"
CONFIG_REJECTED = "config_rejected"
FLOW_KILLED = "flow_killed"
POLICY_APPLIED = "policy_applied"
POLICY_REJECTED = "policy_rejected"  # the replica keeps its last good policy
INTERCEPT_CREATED = "intercept_created"
INTERCEPT_RESOLVED = "intercept_resolved"
INTERCEPT_TIMEOUT = "intercept_timeout"
FLOW_REPLAYED = "flow_replayed"
INGEST_ERROR = "ingest_error"  # the store could not commit a batch (it is redelivered)
INGEST_DECODE_ERROR = "ingest_decode_error"  # messages/events the store had to drop
DATABASE_UNAVAILABLE = "database_unavailable"  # the store stopped ingesting: its database fails
DATABASE_RECOVERED = "database_recovered"  # ... and answers again: ingest resumed
AUDIT = subjects.AUDIT_EVENT  # one per mutating API call

TYPES = (
    REPLICA_STARTED,
    REPLICA_STOPPED,
    REPLICA_GONE,
    LISTENER_STARTED,
    LISTENER_STOPPED,
    CONFIG_APPLIED,
    CONFIG_REJECTED,
    FLOW_KILLED,
    POLICY_APPLIED,
    POLICY_REJECTED,
    INTERCEPT_CREATED,
    INTERCEPT_RESOLVED,
    INTERCEPT_TIMEOUT,
    FLOW_REPLAYED,
    INGEST_ERROR,
    INGEST_DECODE_ERROR,
    DATABASE_UNAVAILABLE,
    DATABASE_RECOVERED,
    AUDIT,
)

DEFAULT_TIMEOUT = 2.0
RETRY_PAUSE = 0.5  # seconds between tries of a failed publish
BACKGROUND_RETRY_S = 15.0  # an event sent in the background outlasts a leader election
_TOKEN_BAD = re.compile(r"[^A-Za-z0-9_-]")

published = 0  # process-wide counters (metrics, tests)
failed = 0


def new_id() -> str:
    """24 hex digits, time-ordered (milliseconds) like flow ids."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


def token(value: str) -> str:
    """``value`` made safe as one subject token (no dots, wildcards or spaces)."""
    return _TOKEN_BAD.sub("_", value)[:64] or "_"


def build(
    source: str,
    type: str,
    data: Mapping[str, Any] | None = None,
    severity: Severity = "info",
    replica: str | None = None,
) -> SystemEvent:
    return SystemEvent(
        id=new_id(),
        type=token(type),
        source=token(source),
        time=time.time(),
        severity=severity,
        replica=replica,
        data=dict(data or {}),
    )


async def publish(
    bus: Bus | None,
    event: SystemEvent,
    msg_id: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    retry_for: float = 0.0,
) -> bool:
    """Store ``event`` in EVENTS; False (never an exception) when it could not be.

    ``retry_for``: seconds to keep trying after a failed publish (a stream leader being
    elected takes 4-9 s), with the same message id each time, so that the stream's
    duplicate window stores the event once however many tries reached it.
    """
    global published, failed
    if bus is None or not bus.connected:
        failed += 1
        log.debug("event %s not published: NATS is not connected", event.type)
        return False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_for
    payload = event.model_dump_json().encode()
    while True:
        try:
            await bus.js_publish(
                subjects.events_subject(event.source, event.type),
                payload,
                msg_id=msg_id or event.id,
                timeout=timeout,
            )
            break
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # no stream, timeout, disconnect: the caller must not care
            closed = bool(getattr(getattr(bus, "nc", None), "is_closed", False))
            if loop.time() + RETRY_PAUSE < deadline and not closed:
                await asyncio.sleep(RETRY_PAUSE)
                continue
            failed += 1
            log.debug("event %s not published: %r", event.type, exc)
            return False
    published += 1
    return True


async def emit(
    bus: Bus | None,
    source: str,
    type: str,
    data: Mapping[str, Any] | None = None,
    severity: Severity = "info",
    *,
    replica: str | None = None,
    msg_id: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    retry_for: float = 0.0,
) -> SystemEvent | None:
    """Publish one system event, waiting at most ``timeout`` seconds a try (and trying
    again for ``retry_for`` seconds, see ``publish``); never raises.

    Returns the event when the stream acknowledged it, else None.
    """
    try:
        event = build(source, type, data, severity, replica)
    except Exception as exc:  # data that is not JSON-able is a bug, not a crash
        log.warning("event %s not built: %r", type, exc)
        return None
    return event if await publish(bus, event, msg_id, timeout, retry_for) else None


def emit_soon(
    bus: Bus | None,
    source: str,
    type: str,
    data: Mapping[str, Any] | None = None,
    severity: Severity = "info",
    *,
    replica: str | None = None,
    msg_id: str | None = None,
) -> asyncio.Task[SystemEvent | None] | None:
    """``emit`` from a background task (for synchronous code); None outside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return None
    return spawn(
        emit(
            bus,
            source,
            type,
            data,
            severity,
            replica=replica,
            msg_id=msg_id,
            retry_for=BACKGROUND_RETRY_S,
        ),
        name=f"event-{type}",
    )


class Throttle:
    """At most one event per key every ``interval`` seconds; counts what it held back."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None: hold this one back. Else the number held back since the last one allowed."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)
