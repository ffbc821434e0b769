"""Ingest: the durable JetStream consumer that moves flow events into the repository.

Every store replica pulls from the same durable consumer, so together they form
one work queue over the FLOWS stream. A fetched batch of messages is written in
one transaction and acked only after the commit: a store that dies mid-batch
leaves its messages unacked, JetStream redelivers them after ``ack_wait`` to
whichever store fetches next, and the merge by flow id makes the second write a
no-op. Up to ``depth`` batches are in flight (fetched ahead, or being ingested by
parallel workers); each is acked after its own commit, in any order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from libs.common import events, subjects
from libs.common.bus import Bus, processing_batch
from libs.common.models import Severity
from libs.common.tasks import cancel_and_wait, spawn
from services.store.repository import FlowRepository, RepositoryError

log = logging.getLogger("proxyfleet.store.consumer")

RETRY_DELAY = 1.0  # seconds before a batch that failed to commit is redelivered
MAX_ACK_PENDING = 20_000
DATABASE_PROBE_TIMEOUT = 5.0


@dataclass
class IngestStats:
    """Counters for metrics and tests (monotonic except the ``last_*`` gauges)."""

    messages: int = 0
    batches: int = 0
    events: int = 0
    decode_errors: int = 0
    bad_events: int = 0
    ingest_errors: int = 0
    last_lag_s: float = 0.0  # stream store time of the newest message -> its commit
    last_commit_ms: float = 0.0
    pending: int = 0  # messages the consumer still had to deliver at the last fetch


class FlowConsumer:
    """Fetch FLOWS messages, commit their events, ack; until ``stop()``."""

    def __init__(
        self,
        bus: Bus,
        repo: FlowRepository,
        batch: int = 32,
        ack_wait: float = 10.0,
        fetch_timeout: float = 0.5,
        durable: str = subjects.STORE_DURABLE,
        depth: int = 2,
        source: str = "store",
    ) -> None:
        self.bus = bus
        self.repo = repo
        self.batch = batch
        self.ack_wait = ack_wait
        self.fetch_timeout = fetch_timeout
        self.durable = durable
        self.stats = IngestStats()
        self.source = source  # the store's id, as the source of its system events
        self._throttle = events.Throttle(5.0)  # a failing database must not flood EVENTS
        self._sub: JetStreamContext.PullSubscription | None = None
        self._stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(depth)
        self._inflight: set[asyncio.Task[None]] = set()
        self._fetcher: asyncio.Task[None] | None = None
        # the database failed a commit and has not answered since: fetch nothing (the
        # messages wait in the stream, unacked) until a ping says it is back
        self.database_error: str | None = None

    async def start(self) -> None:
        """Create (or update) the durable consumer, bind to it, start the loops."""
        config = ConsumerConfig(
            durable_name=self.durable,
            name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait,
            max_ack_pending=MAX_ACK_PENDING,
            filter_subject=subjects.FLOWS_SUBJECTS,
        )
        # CONSUMER.CREATE is create-or-update: a new ack_wait takes effect on restart.
        await self.bus.js.add_consumer(subjects.FLOWS_STREAM, config=config)
        self._sub = await self.bus.js.pull_subscribe_bind(
            durable=self.durable, stream=subjects.FLOWS_STREAM
        )
        self._fetcher = spawn(self._fetch_loop(), name="store-fetch")
        log.info(
            "consuming %s as durable %r (batches of %d messages, ack wait %gs)",
            subjects.FLOWS_STREAM,
            self.durable,
            self.batch,
            self.ack_wait,
        )

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop fetching, commit and ack what was already fetched, then return."""
        self._stopping.set()
        try:
            async with asyncio.timeout(timeout):
                if self._fetcher is not None:
                    await asyncio.shield(self._fetcher)
        except TimeoutError:
            log.warning(
                "ingest did not finish in %gs; unacked messages will be redelivered", timeout
            )
        await cancel_and_wait(self._fetcher, *self._inflight)
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    # -- fetching ---------------------------------------------------------------------------
    async def _fetch_loop(self) -> None:
        """Fetch while up to ``depth`` earlier batches are being ingested."""
        assert self._sub is not None
        failing = False
        while not self._stopping.is_set():
            if self.database_error is not None:
                await self._wait_for_database()
                continue
            try:
                msgs = await self._sub.fetch(self.batch, timeout=self.fetch_timeout)
            except TimeoutError:
                failing = False
                continue
            except Exception as exc:  # disconnected, consumer deleted, ...: retry soon
                log.log(logging.DEBUG if failing else logging.WARNING, "fetch failed: %r", exc)
                failing = True
                await self._sleep(1.0)
                continue
            failing = False
            await self._slots.acquire()
            task = spawn(self._ingest(msgs), name="store-ingest")
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        if self._inflight:  # stopping: commit and ack what was fetched
            await asyncio.gather(*self._inflight, return_exceptions=True)

    async def _wait_for_database(self) -> None:
        """One probe of a failing database (a second apart); back: say so, fetch again."""
        try:
            await asyncio.wait_for(self.repo.ping(), DATABASE_PROBE_TIMEOUT)
        except Exception as exc:
            self.database_error = str(exc) if isinstance(exc, RepositoryError) else repr(exc)
            await self._sleep(RETRY_DELAY)
            return
        log.info("database answers again: ingest resumed")
        self.database_error = None
        events.emit_soon(
            self.bus, self.source, events.DATABASE_RECOVERED, {}, "info", replica=self.source
        )

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # -- committing -------------------------------------------------------------------------
    async def _ingest(self, msgs: list[Msg]) -> None:
        try:
            await self._commit(msgs)
        finally:
            self._slots.release()

    async def _commit(self, msgs: list[Msg]) -> None:
        t0 = time.monotonic()
        try:
            with processing_batch(subjects.FLOWS_SUBJECTS, msgs):  # no-op unless tracing
                result = await self.repo.ingest([m.data for m in msgs])
        except Exception as exc:  # RepositoryError, or a bug: never ack, never stop ingest
            self.stats.ingest_errors += 1
            log.error(
                "ingest of %d messages failed, redelivery in %gs: %s",
                len(msgs),
                RETRY_DELAY,
                exc if isinstance(exc, RepositoryError) else repr(exc),
            )
            self._event(
                events.INGEST_ERROR,
                "error",
                messages=len(msgs),
                error=str(exc) if isinstance(exc, RepositoryError) else repr(exc),
                redelivery_in=RETRY_DELAY,
            )
            for msg in msgs:
                with contextlib.suppress(Exception):
                    await msg.nak(delay=RETRY_DELAY)
            if isinstance(exc, RepositoryError) and self.database_error is None:
                self.database_error = str(exc)
                log.error("database unavailable: ingest paused until it answers")
                events.emit_soon(
                    self.bus,
                    self.source,
                    events.DATABASE_UNAVAILABLE,
                    {"error": str(exc)},
                    "error",
                    replica=self.source,
                )
            await self._sleep(RETRY_DELAY)
            return
        undecodable = set(result.undecodable)
        for i, msg in enumerate(msgs):
            # a lost ack or term only means a harmless redelivery
            with contextlib.suppress(Exception):
                if i in undecodable:
                    log.warning(
                        "message %s on %s is not a JSON array of flow events: dropped",
                        _seq(msg),
                        msg.subject,
                    )
                    await msg.term()
                else:
                    await msg.ack()
        s = self.stats
        s.messages += len(msgs)
        s.batches += 1
        s.decode_errors += len(undecodable)
        s.events += result.events - result.bad_events
        if result.bad_events:
            s.bad_events += result.bad_events
            log.warning("%d malformed flow events skipped", result.bad_events)
        if undecodable or result.bad_events:
            self._event(
                events.INGEST_DECODE_ERROR,
                "warning",
                messages_dropped=len(undecodable),
                stream_seqs=[_seq(msgs[i]) for i in sorted(undecodable)][:20],
                events_skipped=result.bad_events,
            )
        s.last_commit_ms = (time.monotonic() - t0) * 1000.0
        with contextlib.suppress(Exception):
            meta = msgs[-1].metadata
            s.last_lag_s = max(0.0, time.time() - meta.timestamp.timestamp())
            s.pending = meta.num_pending

    def _event(self, type: str, severity: Severity, **data: Any) -> None:
        held = self._throttle.allow(type)
        if held is None:
            return
        if held:
            data["suppressed"] = held  # like events held back in the last few seconds
        events.emit_soon(self.bus, self.source, type, data, severity, replica=self.source)


def _seq(msg: Msg) -> str:
    try:
        return str(msg.metadata.sequence.stream)
    except Exception:
        return "?"
