"""A revisioned JSON document in one KV key: the runtime config and the rules policy.

The KV revision is the document's version: it is the ETag, it is what
``If-Match`` is checked against, and writes are compare-and-set on it
(``update(last=revision)``, ``create`` when absent), so two writers can never
silently overwrite each other, not even two API replicas. The key's history is
the bucket's (64 writes): it lists past revisions and is what a rollback copies.

A ``DocumentKind`` is everything that differs between two such documents: the
bucket and key, the pydantic model, the error-code prefix (``CONFIG_INVALID``,
``POLICY_CONFLICT``, ...), the size limit of a request body, and the heartbeat
fields in which a replica reports the revision it runs. ``DocumentStore`` reads and
writes one; ``services.api.document_write`` holds the write path the routes share.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

import orjson
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, create_model

from libs.common import subjects
from libs.common.bus import Bus
from libs.common.models import RuntimeConfig
from libs.common.policy import Policy
from services.api.errors import ApiError
from services.api.fleet import CONFIG_REPORT, POLICY_REPORT, Reported

log = logging.getLogger("proxyfleet.api.documents")

M = TypeVar("M", bound=BaseModel)

MAX_REVISION = 2**63 - 1  # a JetStream sequence is unsigned 64-bit; a KV revision fits here
_WATCH_INACTIVE = 5.0
_PAYLOAD_SLACK = 1024  # room under the server's max_payload for the message's headers


class DocumentKind(Generic[M]):
    """What a revisioned document is: where it lives, its model, its names."""

    def __init__(
        self,
        *,
        name: str,
        code: str,
        key: str,
        open_kv: Callable[[Bus], Coroutine[Any, Any, KeyValue]],
        model: type[M],
        max_body: int,
        reported: Reported,
    ) -> None:
        self.name = name  # "config": messages, the envelope's member, /api/<name>
        self.code = code  # "CONFIG": CONFIG_INVALID, CONFIG_CONFLICT, ...
        self.key = key
        self.open_kv = open_kv
        self.model = model
        self.max_body = max_body  # bytes of a request body
        self.reported = reported
        # GET's body, accepted back by PUT: the revision read (a precondition) + the document
        fields: dict[str, Any] = {
            "revision": (
                StrictInt | None,
                Field(None, ge=0, le=MAX_REVISION, description="the revision read; stale -> 412"),
            ),
            name: (dict[str, Any], ...),
        }
        self.envelope: type[BaseModel] = create_model(
            f"{name.title()}Envelope", __config__=ConfigDict(extra="forbid"), **fields
        )

    def error(self, suffix: str) -> str:
        """The error code ``<CODE>_<suffix>`` (``CONFIG_INVALID``)."""
        return f"{self.code}_{suffix}"

    def empty(self) -> M:
        """The document in force when none was ever written (the defaults)."""
        return self.model.model_validate({})


CONFIG: DocumentKind[RuntimeConfig] = DocumentKind(
    name="config",
    code="CONFIG",
    key=subjects.CONFIG_KEY,
    open_kv=Bus.config_kv,
    model=RuntimeConfig,
    max_body=256 * 1024,
    reported=CONFIG_REPORT,
)

POLICY: DocumentKind[Policy] = DocumentKind(
    name="policy",
    code="POLICY",
    key=subjects.POLICY_KEY,
    open_kv=Bus.policy_kv,
    model=Policy,
    max_body=1024 * 1024,
    reported=POLICY_REPORT,
)


class RevisionConflict(Exception):
    """The key's revision moved between read and write (compare-and-set failed)."""


@dataclass(frozen=True, slots=True)
class Revision:
    """One past write of the key."""

    revision: int
    time: datetime | None
    operation: Literal["put", "delete"]
    document: dict[str, Any] | None


class DocumentStore(Generic[M]):
    """Reads and compare-and-set writes of one revisioned document."""

    def __init__(self, bus: Bus, kind: DocumentKind[M]) -> None:
        self.bus = bus
        self.kind = kind
        self._kv: KeyValue | None = None
        self._lock = asyncio.Lock()

    async def kv(self) -> KeyValue:
        if self._kv is None:
            async with self._lock:
                if self._kv is None:
                    self._kv = await self.kind.open_kv(self.bus)
        return self._kv

    async def current_revision(self) -> tuple[int, bytes | None]:
        """(revision, raw document); (0, None) when the key was never written or is deleted."""
        kv = await self.kv()
        try:
            entry = await kv.get(self.kind.key)
        except KeyNotFoundError:
            return 0, None
        return entry.revision or 0, entry.value

    def parse(self, raw: bytes | None, revision: int) -> M:
        """The stored document at ``revision`` (the defaults when none), or 502
        ``<CODE>_CORRUPT`` when what is stored there is not a valid document."""
        if raw is None:
            return self.kind.empty()
        try:
            return self.kind.model.model_validate_json(raw)
        except ValidationError as exc:
            raise ApiError(
                502,
                self.kind.error("CORRUPT"),
                f"stored revision {revision} is not a valid {self.kind.name} "
                f"({exc.error_count()} errors); PUT a valid document to replace it",
            ) from None

    async def current(self) -> tuple[M, int]:
        """The document in force and its revision (defaults and 0 when none was written)."""
        revision, raw = await self.current_revision()
        return self.parse(raw, revision), revision

    async def write(self, doc: M, last: int) -> int:
        """Write ``doc`` if the key is still at revision ``last`` (0 = absent); new revision."""
        payload = doc.model_dump_json().encode()
        limit = self.bus.max_payload - _PAYLOAD_SLACK
        if len(payload) > limit:
            raise ApiError(
                413,
                "PAYLOAD_TOO_LARGE",
                f"the {self.kind.name} would be {len(payload)} bytes stored; "
                f"NATS carries at most {limit}",
            )
        kv = await self.kv()
        try:
            if last == 0:
                return await kv.create(self.kind.key, payload)
            return await kv.update(self.kind.key, payload, last=last)
        except KeyWrongLastSequenceError:
            raise RevisionConflict from None

    async def raw_at(self, revision: int) -> bytes | None:
        """The document written at ``revision``, or None when that revision is not a
        put of this key (another key of the bucket, a delete, or gone from the
        history the bucket keeps)."""
        if revision < 1:  # nats-py reads revision 0 as "the latest"
            return None
        kv = await self.kv()
        try:
            entry = await kv.get(self.kind.key, revision=revision)
        except NotFoundError:  # KeyNotFoundError included: wrong key, deleted, purged
            return None
        return entry.value

    async def history(self, limit: int) -> list[Revision]:
        """Past writes of the key, newest first (the bucket keeps the last 64)."""
        kv = await self.kv()
        watcher = await kv.watch(
            self.kind.key, include_history=True, inactive_threshold=_WATCH_INACTIVE
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
                            document=None if deleted else json_object_or_none(entry.value),
                        )
                    )
        except TimeoutError:
            raise ApiError(
                503, "BUS_UNAVAILABLE", f"reading the {self.kind.name} history timed out"
            ) from None
        finally:
            try:
                await watcher.stop()
            except Exception as exc:
                log.debug("history watcher stop: %r", exc)
        out.reverse()
        return out[:limit]


def json_object_or_none(raw: bytes | None) -> dict[str, Any] | None:
    """A stored document as a JSON object; None when it is not one."""
    try:
        value = orjson.loads(raw or b"")
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
