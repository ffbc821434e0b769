"""The replicas as the API sees them: the registry (KV ``fleet_replicas``) and commands.

The registry is read fresh on every call (one stream-info request for the
keys, then one direct get per replica, in parallel): it is the replicas' own
report, refreshed every heartbeat, and an entry vanishes by TTL when its
replica dies, so a cached copy could only be more wrong.

The API never creates the registry bucket: its TTL belongs to the replicas
(3 heartbeats), and no bucket simply means no replica has ever registered.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import nats.errors
import orjson
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import ValidationError

from libs.common import subjects
from libs.common.bus import Bus
from libs.common.models import CommandReply, ReplicaStatus
from services.api.errors import ApiError

log = logging.getLogger("proxyfleet.api.fleet")

_REJECTED = re.compile(r"^revision (\d+) rejected")
_WATCH_INACTIVE = 5.0  # seconds the server keeps a finished watcher's consumer


@dataclass(frozen=True, slots=True)
class Reported:
    """The heartbeat fields in which a replica reports one revisioned document: the
    revision it runs and why it refused a newer one ("revision N rejected: why")."""

    revision: str
    error: str


CONFIG_REPORT = Reported("config_revision", "config_error")
POLICY_REPORT = Reported("policy_revision", "policy_error")


@dataclass
class ApplyReport:
    """Which replicas run a document's revision, which still do not, which refused it."""

    applied: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)


RolloutState = Literal["applied", "pending", "rejected"]


def classify(
    status: ReplicaStatus, revision: int, reported: Reported = CONFIG_REPORT
) -> tuple[RolloutState, str | None]:
    """``("applied"|"rejected"|"pending", error)`` of one replica for ``revision`` of the
    document whose heartbeat fields ``reported`` names (the config by default)."""
    running: int = getattr(status, reported.revision)
    if running >= revision:
        return "applied", None
    error: str | None = getattr(status, reported.error)
    if error:
        m = _REJECTED.match(error)
        if m and int(m.group(1)) >= revision:
            return "rejected", error
    return "pending", None


class Fleet:
    """Registry reads and commands over one shared ``Bus``."""

    def __init__(self, bus: Bus, command_timeout: float) -> None:
        self.bus = bus
        self.command_timeout = command_timeout
        self._kv: KeyValue | None = None

    async def _registry(self) -> KeyValue | None:
        if self._kv is None:
            try:
                self._kv = await self.bus.js.key_value(subjects.REPLICAS_BUCKET)
            except BucketNotFoundError:
                return None
        return self._kv

    async def replicas(self) -> list[ReplicaStatus]:
        """Every registered replica, sorted by id."""
        kv = await self._registry()
        if kv is None:
            return []
        prefix = subjects.kv_subject(subjects.REPLICAS_BUCKET, "")
        try:
            info = await self.bus.js.stream_info(
                subjects.kv_stream(subjects.REPLICAS_BUCKET), subjects_filter=prefix + ">"
            )
        except NotFoundError:  # the bucket was deleted meanwhile
            self._kv = None
            return []
        keys = [s.removeprefix(prefix) for s in (info.state.subjects or {})]
        found = await asyncio.gather(*(self._entry(kv, k) for k in keys))
        return sorted((s for s in found if s is not None), key=lambda s: s.id)

    async def replica(self, replica_id: str) -> ReplicaStatus | None:
        kv = await self._registry()
        return None if kv is None else await self._entry(kv, replica_id)

    @staticmethod
    async def _entry(kv: KeyValue, key: str) -> ReplicaStatus | None:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:  # deleted (deregistered) or expired meanwhile
            return None
        return _parse(key, entry.value)

    # -- commands ---------------------------------------------------------------------------
    async def command(
        self, replica_id: str, verb: str, body: dict[str, Any], timeout: float | None = None
    ) -> CommandReply:
        """One command to one replica; 503 NO_REPLICAS when it does not answer."""
        wait = timeout or self.command_timeout
        subject = subjects.command_subject(replica_id, verb)
        try:
            msg = await self.bus.request(subject, orjson.dumps(body), timeout=wait)
        except nats.errors.NoRespondersError:
            raise ApiError(
                503, "NO_REPLICAS", f"replica {replica_id} is registered but not listening"
            ) from None
        except TimeoutError:
            raise ApiError(
                503, "NO_REPLICAS", f"replica {replica_id} did not answer within {wait:g}s"
            ) from None
        reply = _reply(msg.data)
        if reply is None:
            raise ApiError(503, "NO_REPLICAS", f"replica {replica_id} sent an unreadable reply")
        return reply

    async def broadcast(
        self, verb: str, body: dict[str, Any], expected: int, timeout: float | None = None
    ) -> list[CommandReply]:
        """A command to every replica; the replies that arrive by the deadline."""
        msgs = await self.bus.scatter_gather(
            subjects.command_subject(subjects.CMD_ALL, verb),
            orjson.dumps(body),
            timeout=timeout or self.command_timeout,
            expected=expected,
        )
        return [r for r in (_reply(m.data) for m in msgs) if r is not None]

    # -- config and policy roll-out ---------------------------------------------------------
    async def wait_applied(
        self, revision: int, wait: float, reported: Reported = CONFIG_REPORT
    ) -> ApplyReport:
        """Follow the registry for up to ``wait`` seconds until every replica settled
        on ``revision`` of the document ``reported`` names (the config by default).

        A replica heartbeats right after it applies (or rejects) a revision, so
        watching the registry sees the outcome as soon as it exists.
        """
        kv = await self._registry()
        if kv is None:
            return ApplyReport()
        watcher = await kv.watchall(inactive_threshold=_WATCH_INACTIVE)
        states: dict[str, ReplicaStatus] = {}
        caught_up = False
        try:
            async with asyncio.timeout(wait):
                async for entry in watcher:
                    if entry is None:  # the current values are in; live updates follow
                        caught_up = True
                    elif entry.operation in (KV_DEL, KV_PURGE):
                        states.pop(entry.key, None)
                    elif (status := _parse(entry.key, entry.value)) is not None:
                        states[entry.key] = status
                    if caught_up and all(
                        classify(s, revision, reported)[0] != "pending" for s in states.values()
                    ):
                        break
        except TimeoutError:
            pass
        finally:
            try:
                await watcher.stop()
            except Exception as exc:
                log.debug("registry watcher stop: %r", exc)
        report = ApplyReport()
        for replica_id in sorted(states):
            outcome, error = classify(states[replica_id], revision, reported)
            if outcome == "applied":
                report.applied.append(replica_id)
            elif outcome == "rejected":
                report.rejected.append({"id": replica_id, "error": error or ""})
            else:
                report.pending.append(replica_id)
        return report


def _parse(key: str, value: bytes | None) -> ReplicaStatus | None:
    if not value:
        return None
    try:
        return ReplicaStatus.model_validate_json(value)
    except ValidationError:
        log.debug("registry entry %s is not a ReplicaStatus; ignored", key)
        return None


def _reply(data: bytes) -> CommandReply | None:
    try:
        return CommandReply.model_validate_json(data)
    except ValidationError:
        log.debug("unreadable command reply: %r", data[:200])
        return None
