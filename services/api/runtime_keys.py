"""API keys made and revoked at runtime, shared by every API replica through KV.

``POST /api/keys`` makes a key: the secret is returned once and never stored; KV
``fleet_api_keys`` keeps ``key.<id>`` = its id, scope, SHA-256 digest and creation.
Each API replica watches the bucket and keeps the runtime keys in its ``KeyRing`` beside
the configured ones (``FLEET_API_KEYS`` or the generated key file), which cannot be
revoked over the API. A revoke deletes the entry: the replica that answered drops the key
before it answers, the others as their watch delivers the delete (well under a second).
When a key was last used is kept per replica in memory and written to ``used.<id>`` at
most every ``USED_FLUSH_S``: authentication itself never waits on NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from libs.common.bus import Bus
from libs.common.settings import ApiKeySpec
from libs.common.tasks import cancel_and_wait, spawn

log = logging.getLogger("proxyfleet.api.keys")

KEY_PREFIX = "key."
USED_PREFIX = "used."
USED_FLUSH_S = 5.0
MAX_RUNTIME_KEYS = 1000
Scope = Literal["read", "admin"]


@dataclass(frozen=True, slots=True)
class RuntimeKey:
    """A key made over the API, as stored (no secret)."""

    id: str
    scope: Scope
    sha256: bytes
    created: float
    created_by: str
    name: str

    def to_kv(self) -> bytes:
        return orjson.dumps(
            {
                "id": self.id,
                "scope": self.scope,
                "sha256": self.sha256.hex(),
                "created": self.created,
                "created_by": self.created_by,
                "name": self.name,
            }
        )

    @classmethod
    def from_kv(cls, raw: bytes | None) -> RuntimeKey | None:
        """The stored key, or None for a value that is not one (never trusted blindly:
        anyone with the NATS password could write the bucket)."""
        try:
            data: Any = orjson.loads(raw or b"")
            digest = bytes.fromhex(data["sha256"])
            scope = data["scope"]
            if scope not in ("read", "admin") or len(digest) != 32:
                return None
            return cls(
                str(data["id"]),
                scope,
                digest,
                float(data.get("created", 0.0)),
                str(data.get("created_by", "")),
                str(data.get("name", "")),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def spec(self) -> ApiKeySpec:
        return ApiKeySpec(id=self.id, scope=self.scope, sha256=self.sha256)


def new_key_id() -> str:
    return f"k{secrets.token_hex(6)}"


def new_secret() -> str:
    return "pfk_" + secrets.token_urlsafe(32)


class RuntimeKeys:
    """The runtime keys of one API replica: its watch of the bucket, and writes to it."""

    def __init__(self, bus: Bus, on_change: Callable[[list[RuntimeKey]], None]) -> None:
        self.bus = bus
        self.keys: dict[str, RuntimeKey] = {}
        self.last_used: dict[str, float] = {}  # by this replica, since it started
        self._flushed: dict[str, float] = {}
        self._on_change = on_change  # called with the current keys after every change
        self._kv: KeyValue | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.ready = asyncio.Event()

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.bus.api_keys_kv()
        return self._kv

    async def start(self) -> None:
        self._tasks = [
            spawn(self._watch(), name="api-keys-watch"),
            spawn(self._flush_loop(), name="api-keys-used"),
        ]

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        with contextlib.suppress(Exception):
            await self._flush()

    async def _watch(self) -> None:
        """Keep ``keys`` equal to the bucket's ``key.*`` entries, reconnecting forever."""
        while True:
            try:
                kv = await self.kv()
                watcher = await kv.watch(KEY_PREFIX + ">")
                try:
                    async for entry in watcher:
                        if entry is None:  # the initial values are all delivered
                            self.ready.set()
                            continue
                        self._apply(entry.key, entry.value, entry.operation)
                finally:
                    with contextlib.suppress(Exception):
                        await watcher.stop()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("watching the runtime API keys failed, retrying: %r", exc)
                await asyncio.sleep(1.0)

    def _apply(self, name: str, value: bytes | None, operation: str | None) -> None:
        key_id = name.removeprefix(KEY_PREFIX)
        if operation in (KV_DEL, KV_PURGE):
            self.keys.pop(key_id, None)
        else:
            key = RuntimeKey.from_kv(value)
            if key is None or key.id != key_id:
                log.warning("runtime API key entry %r is not a key: ignored", name)
                return
            self.keys[key_id] = key
        self._on_change(list(self.keys.values()))

    async def create(self, scope: Scope, name: str, by: str) -> tuple[RuntimeKey, str]:
        """Make a key; return it and its secret (the only time the secret exists)."""
        secret = new_secret()
        key = RuntimeKey(
            new_key_id(), scope, hashlib.sha256(secret.encode()).digest(), time.time(), by, name
        )
        kv = await self.kv()
        await kv.create(KEY_PREFIX + key.id, key.to_kv())
        self._apply(KEY_PREFIX + key.id, key.to_kv(), None)  # honoured here at once
        return key, secret

    async def revoke(self, key_id: str) -> bool:
        """Revoke a runtime key; False when there is no such key."""
        kv = await self.kv()
        try:
            await kv.get(KEY_PREFIX + key_id)
        except Exception:
            return False
        self._apply(KEY_PREFIX + key_id, None, KV_DEL)  # refused here before we answer
        await kv.delete(KEY_PREFIX + key_id)
        with contextlib.suppress(Exception):
            await kv.delete(USED_PREFIX + key_id)
        return True

    def touch(self, key_id: str) -> None:
        self.last_used[key_id] = time.time()

    async def used(self) -> dict[str, float]:
        """When each key was last used, by any replica (as far as they have flushed)."""
        out = dict(self.last_used)
        with contextlib.suppress(Exception):
            kv = await self.kv()
            for name in await kv.keys():
                if not name.startswith(USED_PREFIX):
                    continue
                with contextlib.suppress(Exception):
                    at = float((await kv.get(name)).value or b"0")
                    key_id = name.removeprefix(USED_PREFIX)
                    out[key_id] = max(out.get(key_id, 0.0), at)
        return out

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(USED_FLUSH_S)
            try:
                await self._flush()
            except Exception as exc:
                log.debug("flushing key use failed: %r", exc)

    async def _flush(self) -> None:
        changed = {k: v for k, v in self.last_used.items() if self._flushed.get(k) != v}
        if not changed:
            return
        kv = await self.kv()
        for key_id, at in changed.items():
            await kv.put(USED_PREFIX + key_id, str(at).encode())
            self._flushed[key_id] = at
