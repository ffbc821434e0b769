"""The store's claim on the FLOWS stream: one database ingests it, never two.

Every store pulls from one durable consumer, a shared work queue. Stores on the same
database (replicas sharing one SQLite file, or one PostgreSQL) split the work and all
see every flow; stores on *different* databases would silently split the flows between
them, and listings and lookups would then alternate. So a store claims the stream in
KV ``fleet_store`` (key ``flows``) with its database's identity (a random id made when
the database is created, see ``FlowRepository.identity``) before it consumes:

- no claim, or a claim with the same identity: take it (create, or update on the last
  revision), and keep it fresh every third of the bucket's TTL;
- a claim with another identity: refused with a one-line reason (the CLI exits 1).

A store that stops cleanly deletes the claim if it is still the one it wrote; one that
is killed leaves it to expire by the bucket's TTL (``FLEET_STORE_CLAIM_TTL``), so a
stale claim blocks a new database for one TTL at most. A store whose claim was taken by
another database while it could not reach NATS (an outage longer than the TTL) has
lost the stream: ``run()`` returns the reason and the store stops rather than split.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from libs.common import subjects
from libs.common.bus import Bus

log = logging.getLogger("proxyfleet.store.claim")

_RACE_RETRIES = 5  # another replica of the same database updated the key in between


class ClaimRefused(Exception):
    """The stream is claimed by another database; the message is one line."""


@dataclass(frozen=True)
class Claim:
    """Who holds the stream, as stored in the key."""

    db: str
    store: str = "?"
    host: str = "?"
    path: str = "?"
    at: float = 0.0

    @classmethod
    def parse(cls, raw: bytes | None) -> Claim | None:
        try:
            data: Any = orjson.loads(raw or b"")
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("db"), str):
            return None
        fields = {k: data[k] for k in ("store", "host", "path") if isinstance(data.get(k), str)}
        at = data.get("at")
        return cls(data["db"], **fields, at=float(at) if isinstance(at, int | float) else 0.0)


class StreamClaim:
    """This store's claim on FLOWS: ``acquire()`` before consuming, ``run()`` while running,
    ``release()`` on a clean stop."""

    def __init__(self, bus: Bus, db_id: str, store_id: str, db: Path | str, ttl: float) -> None:
        self.bus = bus
        self.db_id = db_id
        self.store_id = store_id
        # a SQLite file by its real path; a database URL as given (its password masked)
        self.db_path = str(Path(db).resolve()) if isinstance(db, Path) else db
        self.ttl = ttl  # the bucket's real TTL once acquired (the first store chose it)
        self.revision: int | None = None
        self._kv: KeyValue | None = None

    def _value(self) -> bytes:
        return orjson.dumps(
            {
                "db": self.db_id,
                "store": self.store_id,
                "host": socket.gethostname(),
                "path": self.db_path,
                "pid": os.getpid(),
                "at": time.time(),
            }
        )

    async def acquire(self) -> None:
        """Take the claim, or raise ``ClaimRefused`` (another database holds it)."""
        self._kv = await self.bus.store_claim_kv(self.ttl)
        with contextlib.suppress(Exception):
            self.ttl = (await self._kv.status()).ttl or self.ttl
        await self._take()
        log.info("claimed %s for database %s", subjects.FLOWS_STREAM, self.db_id)

    async def _take(self) -> None:
        kv = self._kv
        assert kv is not None
        for _ in range(_RACE_RETRIES):
            try:
                entry = await kv.get(subjects.STORE_CLAIM_KEY)
            except KeyNotFoundError:  # absent, deleted or purged (KeyDeletedError too)
                entry = None
            try:
                if entry is None:
                    self.revision = await kv.create(subjects.STORE_CLAIM_KEY, self._value())
                    return
                claim = Claim.parse(entry.value)
                if claim is not None and claim.db != self.db_id:
                    raise ClaimRefused(self._refusal(claim))
                # ours (this database, any replica of it), or unreadable: take it over
                assert entry.revision is not None
                self.revision = await kv.update(
                    subjects.STORE_CLAIM_KEY, self._value(), last=entry.revision
                )
                return
            except KeyWrongLastSequenceError:
                continue  # written in between: read it again
        raise ClaimRefused(f"the claim on {subjects.FLOWS_STREAM} keeps changing; try again")

    def _refusal(self, claim: Claim) -> str:
        age = max(0.0, time.time() - claim.at) if claim.at else None
        seen = f", last seen {age:.0f}s ago" if age is not None else ""
        return (
            f"stream {subjects.FLOWS_STREAM} is already ingested into another database "
            f"({claim.path} on {claim.host}, store {claim.store}{seen}); a second database "
            f"would split the flows between them: use the same FLEET_STORE_DB, or stop that "
            f"store (a killed store's claim expires {self.ttl:g}s after its last heartbeat)"
        )

    async def run(self) -> str:
        """Keep the claim fresh until cancelled; return the reason if it was lost."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self._take()
            except ClaimRefused as exc:
                return f"lost the claim on {subjects.FLOWS_STREAM}: {exc}"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away: the claim holds until the TTL
                log.debug("claim heartbeat failed: %r", exc)

    async def release(self) -> None:
        """Delete the claim if it is still the one this store wrote last (a replica of
        the same database that wrote since is alive and keeps it)."""
        if self._kv is None or self.revision is None:
            return
        with contextlib.suppress(Exception):
            await self._kv.delete(subjects.STORE_CLAIM_KEY, last=self.revision)
