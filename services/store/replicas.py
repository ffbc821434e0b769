"""``replica_gone``: noticing replicas that vanished from the registry without leaving.

A replica that stops cleanly deletes its entry in KV ``fleet_replicas`` (a ``DEL``
marker); one that dies or hangs just stops heartbeating, and its entry expires by the
bucket's TTL. The store watches the bucket and tells the two apart: a key whose last
operation was a put and which is no longer in the bucket's stream (expired), or which
was purged (a server TTL marker or an explicit purge), is reported once as
``replica_gone``. Every store replica watches; the event's ``Nats-Msg-Id`` is
``gone-<replica>-<last revision>``, so JetStream keeps one per expiry however many
stores noticed it.

A gone replica's flows that are still ``active`` will never be ended by it, so the store
ends them (``error``, "replica gone: <id>") in its database; every store that notices
does so (idempotent). It sweeps again at each check for ``sweep_window`` seconds, for
``started`` events of that replica that were still on their way through FLOWS, and
stops once the replica registers again. The rows are marked presumed: a real final
event that arrives later (the replica was not gone after all) still replaces them.

A replica id that comes back with a new run (its entry's ``started_at`` changed: it
was restarted under the same id, quicker than the registry TTL, so it never expired)
holds none of the flows its earlier run left ``active``: those that started before the
new run are ended too ("replica restarted: <id>"), also presumed. The same check on a
replica first seen by this store covers restarts while the store was down.

An expiry is only believed while this store could see the registry: after its own NATS
connection was down, entries may have expired for replicas that were alive all along
(they could not heartbeat either), so for one registry TTL after the reconnect nothing
is reported; a replica that is really gone is reported when the grace ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import orjson
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import ValidationError

from libs.common import events, subjects
from libs.common.bus import Bus
from libs.common.models import ReplicaStatus

log = logging.getLogger("proxyfleet.store.replicas")

OnGone = Callable[[str], Awaitable[None]]
OnRestart = Callable[[str, float], Awaitable[None]]


def gone_reason(replica: str) -> str:
    """The error a flow of a gone replica ends with."""
    return f"replica gone: {replica}"


def restarted_reason(replica: str) -> str:
    """The error a flow of an earlier run of a replica id ends with."""
    return f"replica restarted: {replica}"


class RegistryWatch:
    """Follows the replica registry and emits ``replica_gone`` for expired entries."""

    def __init__(
        self,
        bus: Bus,
        source: str,
        interval: float = 1.0,
        on_gone: OnGone | None = None,
        sweep_window: float = 30.0,
        on_restart: OnRestart | None = None,
    ) -> None:
        self.bus = bus
        self.source = source  # this store's id (who noticed)
        self.interval = interval
        self.on_gone = on_gone  # ends the replica's open flows
        # ends the open flows an earlier run of the replica id left (started before it)
        self.on_restart = on_restart
        self.incarnations: dict[str, float] = {}  # replica -> its run's started_at
        self.sweep_window = sweep_window
        self.known: dict[str, tuple[int, bytes]] = {}  # key -> (last put revision, value)
        self.gone = 0
        self.checks = 0  # registry checks run (for tests and metrics)
        self.ttl: float | None = None  # the registry bucket's TTL, read from its config
        self._sweeping: dict[str, float] = {}  # gone replica -> monotonic end of its sweeps
        self._purged: set[str] = set()  # purge markers seen during the grace period

    async def run(self) -> None:
        """Watch until cancelled; waits for the bucket (the replicas create it)."""
        while True:
            try:
                kv = await self.bus.js.key_value(subjects.REPLICAS_BUCKET)
            except BucketNotFoundError:
                await asyncio.sleep(self.interval)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("registry not reachable: %r", exc)
                await asyncio.sleep(self.interval)
                continue
            with contextlib.suppress(Exception):
                self.ttl = (await kv.status()).ttl or None
            try:
                await self._follow(kv)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("registry watch interrupted: %r", exc)
                await asyncio.sleep(self.interval)

    async def _follow(self, kv: KeyValue) -> None:
        watcher = await kv.watchall()
        try:
            next_check = time.monotonic() + self.interval
            while True:
                wait = max(0.0, next_check - time.monotonic())
                try:
                    entry: Any = await watcher.updates(timeout=wait or 0.001)
                except (nats.errors.TimeoutError, TimeoutError):
                    entry = None
                if isinstance(entry, KeyValue.Entry):
                    await self._on_entry(entry)
                elif entry is not None:  # the watcher was stopped
                    return
                if time.monotonic() >= next_check:
                    await self.check()
                    next_check = time.monotonic() + self.interval
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    def in_grace(self) -> bool:
        """True while expiries cannot be trusted: this store's NATS connection is down, or
        came back less than one registry TTL ago."""
        if not self.bus.connected:
            return True
        back = self.bus.last_reconnect
        if back is None:
            return False
        ttl = self.ttl if self.ttl is not None else 3 * self.interval
        return time.monotonic() - back < ttl

    async def _on_entry(self, entry: KeyValue.Entry) -> None:
        key = entry.key
        if entry.operation == KV_DEL:
            self.known.pop(key, None)  # a clean stop: the replica deregistered itself
            self._purged.discard(key)
        elif entry.operation == KV_PURGE:  # expired with a server marker, or purged
            if self.in_grace():
                self._purged.add(key)  # decided when the grace ends (check())
            else:
                await self._gone(key, "purged")
        elif entry.revision is not None:
            self.known[key] = (entry.revision, entry.value or b"")
            self._purged.discard(key)
            self._sweeping.pop(key, None)  # it is back: its new flows are its own
            await self._check_incarnation(key, entry.value or b"")

    async def _check_incarnation(self, key: str, value: bytes) -> None:
        """A replica id seen running a new run (first sight, or a restart under the same
        id, quicker than the registry TTL): flows an earlier run left active are over,
        since a replica holds its flows in memory."""
        if self.on_restart is None:
            return
        try:
            started = float(orjson.loads(value)["started_at"])
        except (ValueError, KeyError, TypeError):
            return
        if self.incarnations.get(key) == started:
            return
        self.incarnations[key] = started
        try:
            await self.on_restart(key, started)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database failed: the next heartbeat tries again
            self.incarnations.pop(key, None)
            log.warning("ending the flows of an earlier run of %s failed: %s", key, exc)

    async def check(self) -> None:
        """Report the known replicas whose entry is no longer in the bucket (expired), and
        sweep the flows of those reported recently."""
        self.checks += 1
        await self._sweep()
        if not self.known or self.in_grace():
            return
        for key in list(self._purged):
            self._purged.discard(key)
            await self._gone(key, "purged")
        candidates = dict(self.known)
        prefix = subjects.kv_subject(subjects.REPLICAS_BUCKET, "")
        try:
            info = await self.bus.js.stream_info(
                subjects.kv_stream(subjects.REPLICAS_BUCKET), subjects_filter=prefix + ">"
            )
        except NotFoundError:
            present: set[str] = set()
        except Exception as exc:  # NATS away: try again next time
            log.debug("registry check failed: %r", exc)
            return
        else:
            present = {s.removeprefix(prefix) for s in (info.state.subjects or {})}
        for key, (revision, _) in candidates.items():
            if key not in present and self.known.get(key, (None,))[0] == revision:
                await self._gone(key, "expired")

    async def _gone(self, key: str, how: str) -> None:
        last = self.known.pop(key, None)
        if last is None:
            return  # never seen alive by this store, or already reported
        revision, value = last
        data: dict[str, Any] = {"how": how, "last_revision": revision, "detected_by": self.source}
        with contextlib.suppress(ValidationError):
            status = ReplicaStatus.model_validate_json(value)
            data.update(
                last_seen=status.updated_at,
                state=status.state,
                listen=status.listen,
                active_flows=status.active_flows,
            )
        self.gone += 1
        log.warning("replica %s is gone (registry entry %s without deregistering)", key, how)
        await events.emit(
            self.bus,
            key,
            events.REPLICA_GONE,
            data,
            "warning",
            replica=self.source,
            msg_id=f"gone-{key}-{revision}",
        )
        if self.on_gone is not None:
            self._sweeping[key] = time.monotonic() + self.sweep_window
            await self._end_flows(key)

    async def _sweep(self) -> None:
        now = time.monotonic()
        for key, until in list(self._sweeping.items()):
            if now >= until:
                del self._sweeping[key]
            else:
                await self._end_flows(key)

    async def _end_flows(self, key: str) -> None:
        assert self.on_gone is not None
        try:
            await self.on_gone(key)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database failed: the next sweep tries again
            log.warning("ending the flows of gone replica %s failed: %s", key, exc)
