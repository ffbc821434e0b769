"""``replica_gone``: noticing replicas that vanished from the registry without leaving.

A replica that stops cleanly deletes its entry in KV ``fleet_replicas`` (a ``DEL``
marker); one that dies or hangs just stops heartbeating, and its entry expires by the
bucket's TTL. The store watches the bucket and tells the two apart: a key whose last
operation was a put and which is no longer in the bucket's stream (expired), or which
was purged (a server TTL marker or an explicit purge), is reported once as
``replica_gone``. Every store replica watches; the event's ``Nats-Msg-Id`` is
``gone-<replica>-<last revision>``, so JetStream keeps one per expiry however many
stores noticed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import nats.errors
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import ValidationError

from libs.common import events, subjects
from libs.common.bus import Bus
from libs.common.models import ReplicaStatus

log = logging.getLogger("proxyfleet.store.replicas")


class RegistryWatch:
    """Follows the replica registry and emits ``replica_gone`` for expired entries."""

    def __init__(self, bus: Bus, source: str, interval: float = 1.0) -> None:
        self.bus = bus
        self.source = source  # this store's id (who noticed)
        self.interval = interval
        self.known: dict[str, tuple[int, bytes]] = {}  # key -> (last put revision, value)
        self.gone = 0

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

    async def _on_entry(self, entry: KeyValue.Entry) -> None:
        key = entry.key
        if entry.operation == KV_DEL:
            self.known.pop(key, None)  # a clean stop: the replica deregistered itself
        elif entry.operation == KV_PURGE:  # expired with a server marker, or purged
            await self._gone(key, "purged")
        elif entry.revision is not None:
            self.known[key] = (entry.revision, entry.value or b"")

    async def check(self) -> None:
        """Report the known replicas whose entry is no longer in the bucket (expired)."""
        if not self.known:
            return
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
