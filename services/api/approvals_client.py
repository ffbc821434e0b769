"""Intercepts held on the replicas, as the API reaches them (``libs.common.approvals``).

Nothing about a held exchange is kept here beyond one call: the pending list is
scatter-gathered from every registered replica (``fleet.cmd.all.intercepts``), a
decision is broadcast (``fleet.cmd.all.decide``) and the one replica holding the id
answers it, the live feed reads the replicas' intercept events from stream EVENTS,
and cached approvals are the entries of KV ``fleet_approvals``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from libs.common import events, subjects
from libs.common.approvals import (
    DECIDE_VERB,
    INTERCEPTS_VERB,
    CachedApproval,
    Decision,
    PendingApproval,
    cache_key,
    pending_from_reply,
    strip_query,
)
from libs.common.bus import Bus
from libs.common.models import CommandReply
from services.api.errors import ApiError
from services.api.fleet import Fleet

log = logging.getLogger("proxyfleet.api.approvals")

# command verbs of the contract (``fleet.cmd.<replica|all>.<verb>``)
# reply codes of the contract, and the one a replica may use to refuse a mismatched edit
NOT_FOUND = "APPROVAL_NOT_FOUND"
DECIDED = "APPROVAL_DECIDED"
PHASE_MISMATCH = "APPROVAL_PHASE_MISMATCH"
UNKNOWN_COMMAND = "UNKNOWN_COMMAND"  # a replica that does not know the verb

INTERCEPT_TYPES = (events.INTERCEPT_CREATED, events.INTERCEPT_RESOLVED, events.INTERCEPT_TIMEOUT)
_TAIL_INACTIVE = 120.0  # seconds before the server drops a tail consumer nobody reads
_PURGE_BATCH = 64  # cache entries purged concurrently


@dataclass
class PendingList:
    """Every held exchange that the replicas answering reported, oldest first."""

    pending: list[PendingApproval]
    missing: list[str] = field(default_factory=list)  # registered, but no usable answer


@dataclass
class Decided:
    """The holding replica's ``ok`` to a decision."""

    replica: str
    approval: PendingApproval


def intercept_subjects() -> list[str]:
    """EVENTS subjects of the replicas' intercept events (any source)."""
    return [subjects.events_filter(None, t) for t in INTERCEPT_TYPES]


class Approvals:
    """Pending approvals, decisions and the cached-approvals bucket over one ``Bus``."""

    def __init__(self, bus: Bus, fleet: Fleet) -> None:
        self.bus = bus
        self.fleet = fleet

    # -- pending ----------------------------------------------------------------------------
    async def pending(self) -> PendingList:
        """Scatter-gather ``intercepts`` (expecting one answer per registered replica)."""
        registered = await self.fleet.replicas()
        if not registered:
            return PendingList([])
        replies = await self.fleet.broadcast(INTERCEPTS_VERB, {}, expected=len(registered))
        found: dict[str, PendingApproval] = {}
        answered: set[str] = set()
        for reply in replies:
            if not reply.ok:
                log.debug("replica %s: intercepts refused: %s", reply.replica, reply.code)
                continue
            answered.add(reply.replica)
            for item in pending_from_reply(reply.data):
                found.setdefault(item.id, item)
        missing = sorted(s.id for s in registered if s.id not in answered)
        ordered = sorted(found.values(), key=lambda p: (p.created_at, p.id))
        return PendingList(ordered, missing)

    # -- decisions --------------------------------------------------------------------------
    async def decide(self, decision: Decision) -> Decided:
        """Broadcast one decision; the holding replica's answer, or the matching ApiError."""
        registered = await self.fleet.replicas()
        if not registered:
            raise not_found(decision.id, "no proxy replica is registered")
        replies = await self.fleet.broadcast(
            DECIDE_VERB, decision.model_dump(mode="json", exclude_none=True), len(registered)
        )
        # the holder's answer first: ok, then a refusal of the contract (APPROVAL_*), then a
        # replica that failed the command (it may be the holder); replicas that do not know
        # the verb (older ones) cannot hold anything
        meant = [r for r in replies if r.ok or r.code not in (NOT_FOUND, UNKNOWN_COMMAND)]
        meant.sort(key=lambda r: (not r.ok, r.code != DECIDED, not _ours(r.code), r.replica))
        if meant:
            if meant[0].ok:
                return _decided(decision.id, meant[0])
            raise refusal(decision.id, meant[0])
        answered = {r.replica for r in replies}
        silent = sorted(s.id for s in registered if s.id not in answered)
        if silent:
            raise ApiError(
                503,
                "NO_REPLICAS",
                f"no replica that answered holds approval {decision.id}; "
                f"{', '.join(silent)} did not answer within {self.fleet.command_timeout:g}s "
                "and may hold it: retry",
            )
        raise not_found(decision.id, f"none of the {len(registered)} replicas holds it")

    # -- cached approvals -------------------------------------------------------------------
    async def _bucket(self) -> KeyValue:
        return await self.bus.approvals_kv()

    async def cache(self, approval: PendingApproval, by: str | None, ttl: float) -> CachedApproval:
        """Write the cached approval that lets ``approval``'s rule, method and URL pass."""
        now = time.time()
        entry = CachedApproval(
            rule=approval.rule,
            method=approval.request.method.upper(),
            url=strip_query(approval.request.url),
            by=by,
            created_at=now,
            expires_at=now + ttl,
        )
        kv = await self._bucket()
        await kv.put(entry.key(), entry.model_dump_json().encode())
        return entry

    async def cached(self, now: float) -> list[tuple[str, CachedApproval]]:
        """``(key, entry)`` of every entry still live at ``now``, oldest first."""
        kv = await self._bucket()
        watcher = await kv.watchall(ignore_deletes=True, inactive_threshold=5.0)
        out: list[tuple[str, CachedApproval]] = []
        try:
            async for entry in watcher:
                if entry is None:  # every current value delivered
                    break
                if not entry.value:
                    continue
                try:
                    cached = CachedApproval.model_validate_json(entry.value)
                except ValidationError:
                    log.debug("cached approval %s is unreadable; skipped", entry.key)
                    continue
                if cached.expires_at > now:
                    out.append((entry.key, cached))
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
        out.sort(key=lambda kc: (kc[1].created_at, kc[0]))
        return out

    async def forget(self, rule: str, method: str, url: str) -> str | None:
        """Purge the entry ``cache_key(rule, method, url)`` names; its key, None if absent."""
        key = cache_key(rule, method, url)
        kv = await self._bucket()
        try:
            await kv.get(key)
        except KeyNotFoundError:
            return None
        await kv.purge(key)
        return key

    async def forget_all(self) -> int:
        """Purge every entry (a purge marker per key, which every watching replica sees)."""
        kv = await self._bucket()
        watcher = await kv.watchall(ignore_deletes=True, meta_only=True, inactive_threshold=5.0)
        keys: list[str] = []
        try:
            async for entry in watcher:
                if entry is None:
                    break
                keys.append(entry.key)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
        for start in range(0, len(keys), _PURGE_BATCH):
            await asyncio.gather(*(kv.purge(k) for k in keys[start : start + _PURGE_BATCH]))
        return len(keys)


def not_found(approval: str, why: str) -> ApiError:
    return ApiError(404, "APPROVAL_NOT_FOUND", f"no pending approval {approval}: {why}")


def refusal(approval: str, reply: CommandReply) -> ApiError:
    """The ApiError of the holding replica's refusal."""
    said = f": {reply.message}" if reply.message else ""
    if reply.code == DECIDED:
        return ApiError(
            409,
            "APPROVAL_ALREADY_DECIDED",
            f"approval {approval} was already resolved on replica {reply.replica}{said}",
        )
    if reply.code == PHASE_MISMATCH:
        return ApiError(
            422, PHASE_MISMATCH, f"replica {reply.replica} refused the edit of {approval}{said}"
        )
    if not _ours(reply.code):  # the command failed there: the outcome is unknown
        return ApiError(
            502,
            "REPLICA_ERROR",
            f"replica {reply.replica} failed the decision on {approval} ({reply.code}){said}",
        )
    return ApiError(
        422,
        "DECISION_REFUSED",
        f"replica {reply.replica} refused the decision on {approval} ({reply.code}){said}",
    )


def _ours(code: str | None) -> bool:
    """A refusal the approvals contract speaks of (``APPROVAL_*``)."""
    return bool(code) and str(code).startswith("APPROVAL_")


def _decided(approval: str, reply: CommandReply) -> Decided:
    raw = reply.data.get("approval")
    try:
        held = PendingApproval.model_validate(raw)
    except ValidationError:
        raise ApiError(
            502,
            "REPLICA_ERROR",
            f"replica {reply.replica} applied the decision on {approval} but sent no "
            "readable approval (nothing was cached)",
        ) from None
    return Decided(reply.replica, held)
