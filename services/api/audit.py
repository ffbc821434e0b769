"""Audit records of mutating API calls on ``fleet.events.api.audit`` (stream EVENTS).

A core publish, not a JetStream one: the record is stored when the EVENTS
stream exists (the replicas create it), and the API call never waits for, or
fails on, the audit trail. Records name the key id, never the key.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from libs.common import subjects
from libs.common.bus import Bus
from services.api.auth import Principal

log = logging.getLogger("proxyfleet.api.audit")

_SUBJECT = subjects.events_subject(subjects.API_SOURCE, subjects.AUDIT_EVENT)


async def record(
    bus: Bus, principal: Principal | None, action: str, outcome: str, **details: Any
) -> None:
    """Publish one audit record (best effort)."""
    event = {
        "time": time.time(),
        "action": action,
        "outcome": outcome,
        "key_id": principal.key_id if principal is not None else None,
        **details,
    }
    try:
        await bus.nc.publish(_SUBJECT, orjson.dumps(event, default=str))
    except Exception as exc:
        log.debug("audit record not published: %r", exc)
