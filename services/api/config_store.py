"""The runtime config document in KV ``fleet_config``/``proxy``, with its revisions.

The KV revision is the document's version: it is the ETag, it is what
``If-Match`` is checked against, and writes are compare-and-set on it
(``update(last=revision)``, ``create`` when absent), so two writers can never
silently overwrite each other, not even two API replicas.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import orjson
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import ValidationError

from libs.common import subjects
from libs.common.bus import Bus
from libs.common.models import RuntimeConfig
from services.api.errors import ApiError

log = logging.getLogger("proxyfleet.api.config")

_WATCH_INACTIVE = 5.0


class RevisionConflict(Exception):
    """The key's revision moved between read and write (compare-and-set failed)."""


@dataclass(frozen=True, slots=True)
class Revision:
    """One past write of the config key."""

    revision: int
    time: datetime | None
    operation: Literal["put", "delete"]
    document: dict[str, Any] | None


class ConfigStore:
    """Reads and compare-and-set writes of the config document; the CA certificate."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._kv: KeyValue | None = None
        self._lock = asyncio.Lock()

    async def kv(self) -> KeyValue:
        if self._kv is None:
            async with self._lock:
                if self._kv is None:
                    self._kv = await self.bus.config_kv()
        return self._kv

    async def current_revision(self) -> tuple[int, bytes | None]:
        """(revision, raw document); (0, None) when the key was never written or is deleted."""
        kv = await self.kv()
        try:
            entry = await kv.get(subjects.CONFIG_KEY)
        except KeyNotFoundError:
            return 0, None
        return entry.revision or 0, entry.value

    async def current(self) -> tuple[RuntimeConfig, int]:
        """The document in force and its revision (defaults and 0 when none was written)."""
        revision, raw = await self.current_revision()
        if raw is None:
            return RuntimeConfig.model_validate({}), 0
        try:
            return RuntimeConfig.model_validate_json(raw), revision
        except ValidationError as exc:
            raise ApiError(
                502,
                "CONFIG_CORRUPT",
                f"stored revision {revision} is not a valid config "
                f"({exc.error_count()} errors); PUT a valid document to replace it",
            ) from None

    async def write(self, doc: RuntimeConfig, last: int) -> int:
        """Write ``doc`` if the key is still at revision ``last`` (0 = absent); new revision."""
        kv = await self.kv()
        payload = doc.model_dump_json().encode()
        try:
            if last == 0:
                return await kv.create(subjects.CONFIG_KEY, payload)
            return await kv.update(subjects.CONFIG_KEY, payload, last=last)
        except KeyWrongLastSequenceError:
            raise RevisionConflict from None

    async def raw_at(self, revision: int) -> bytes | None:
        """The document written at ``revision``, or None when that revision is not a
        put of the config key (another key of the bucket, a delete, or gone from the
        history the bucket keeps)."""
        if revision < 1:  # nats-py reads revision 0 as "the latest"
            return None
        kv = await self.kv()
        try:
            entry = await kv.get(subjects.CONFIG_KEY, revision=revision)
        except NotFoundError:  # KeyNotFoundError included: wrong key, deleted, purged
            return None
        return entry.value

    async def history(self, limit: int) -> list[Revision]:
        """Past writes of the key, newest first (the bucket keeps the last 64)."""
        kv = await self.kv()
        watcher = await kv.watch(
            subjects.CONFIG_KEY, include_history=True, inactive_threshold=_WATCH_INACTIVE
        )
        out: list[Revision] = []
        try:
            async with asyncio.timeout(10.0):
                async for entry in watcher:
                    if entry is None:
                        break
                    deleted = entry.operation in (KV_DEL, KV_PURGE)
                    out.append(
                        Revision(
                            revision=entry.revision or 0,
                            time=entry.created if isinstance(entry.created, datetime) else None,
                            operation="delete" if deleted else "put",
                            document=None if deleted else _json_object(entry.value),
                        )
                    )
        except TimeoutError:
            raise ApiError(503, "BUS_UNAVAILABLE", "reading the config history timed out") from None
        finally:
            try:
                await watcher.stop()
            except Exception as exc:
                log.debug("history watcher stop: %r", exc)
        out.reverse()
        return out[:limit]

    async def ca_certificate(self) -> bytes | None:
        """The CA certificate PEM a proxy published, or None."""
        kv = await self.kv()
        try:
            entry = await kv.get(subjects.CA_CERT_KEY)
        except KeyNotFoundError:
            return None
        return entry.value or None


def _json_object(raw: bytes | None) -> dict[str, Any] | None:
    try:
        value = orjson.loads(raw or b"")
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
