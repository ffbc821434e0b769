"""The flow store's Prometheus metrics.

Ingest counters come from the consumer's ``IngestStats`` (kept per committed
batch anyway). What needs a round trip is sampled just before each scrape
(``refresh``): the durable consumer's info from JetStream (messages not yet
delivered = the store's lag behind the proxies, and those delivered but not
acked) and a row estimate from the database. A sample that fails is left out
of that scrape rather than reported stale.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from libs.common import subjects

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from libs.common.bus import Bus
    from libs.common.settings import StoreSettings
    from services.store.consumer import FlowConsumer
    from services.store.repository import FlowRepository


class Store(Protocol):
    """What the collector reads of a store replica (``services.store.main.Store``); a
    protocol, so that this module does not import the one that imports it."""

    settings: StoreSettings
    bus: Bus | None
    repo: FlowRepository | None
    consumer: FlowConsumer | None


log = logging.getLogger("proxyfleet.store.metrics")

PREFIX = "proxyfleet_store_"
SAMPLE_TIMEOUT = 1.0


class StoreCollector(Collector):
    """Samples of one store replica."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.pending: int | None = None  # consumer: messages not yet delivered to any store
        self.ack_pending: int | None = None  # delivered, not yet acked (being ingested)
        self.redelivered: int | None = None
        self.rows: int | None = None

    async def refresh(self) -> None:
        """Take the samples that need NATS or the database (called before each scrape)."""
        store = self.store
        consumer = store.consumer
        self.pending = self.ack_pending = self.redelivered = None
        if store.bus is not None and consumer is not None and store.bus.connected:
            try:
                info = await store.bus.js.consumer_info(
                    subjects.FLOWS_STREAM, consumer.durable, timeout=SAMPLE_TIMEOUT
                )
            except Exception as exc:
                log.debug("consumer info for metrics failed: %r", exc)
            else:
                self.pending = info.num_pending
                self.ack_pending = info.num_ack_pending
                self.redelivered = info.num_redelivered
        self.rows = None
        if store.repo is not None:
            try:
                self.rows = await asyncio.wait_for(store.repo.estimate_rows(), SAMPLE_TIMEOUT)
            except Exception as exc:
                log.debug("row estimate for metrics failed: %r", exc)

    def collect(self) -> Iterator[Metric]:
        store = self.store
        yield InfoMetricFamily(
            PREFIX + "replica", "This store replica", value={"replica": store.settings.replica_id}
        )
        yield GaugeMetricFamily(
            PREFIX + "nats_connected",
            "1 while the NATS connection is up",
            value=1.0 if store.bus is not None and store.bus.connected else 0.0,
        )
        consumer = store.consumer
        if consumer is not None:
            yield GaugeMetricFamily(
                PREFIX + "database_up",
                "0 while the database fails (ingest is paused; the messages wait in the "
                "stream), else 1",
                value=0.0 if consumer.database_error is not None else 1.0,
            )
            st = consumer.stats
            counters = (
                ("messages_ingested", "FLOWS messages committed (and acked)", st.messages),
                ("events_ingested", "Flow events committed (duplicates included)", st.events),
                ("batches", "Fetched batches committed, one transaction each", st.batches),
                (
                    "decode_errors",
                    "FLOWS messages that were not a JSON array of flow events (dropped)",
                    st.decode_errors,
                ),
                ("bad_events", "Malformed flow events skipped", st.bad_events),
                (
                    "ingest_errors",
                    "Batches whose commit failed (their messages are redelivered)",
                    st.ingest_errors,
                ),
            )
            for name, doc, value in counters:
                yield CounterMetricFamily(PREFIX + name, doc, value=value)
            yield GaugeMetricFamily(
                PREFIX + "last_ingest_duration_seconds",
                "Time the last batch took to decode, write and commit",
                value=st.last_commit_ms / 1000.0,
            )
            yield GaugeMetricFamily(
                PREFIX + "last_ingest_delay_seconds",
                "Age of the newest message of the last batch when it was committed "
                "(stream arrival to commit)",
                value=st.last_lag_s,
            )
        samples = (
            (
                "consumer_pending_messages",
                "FLOWS messages the durable consumer has not delivered yet (ingest lag), "
                "sampled from JetStream at scrape time",
                self.pending,
            ),
            (
                "consumer_ack_pending_messages",
                "FLOWS messages delivered to a store and not acked yet, sampled at scrape time",
                self.ack_pending,
            ),
            (
                "consumer_redelivered_messages",
                "Messages delivered more than once and not acked yet, sampled at scrape time",
                self.redelivered,
            ),
            (
                "db_rows",
                "Flows in the database: a cheap estimate (SQLite rowid span, PostgreSQL "
                "statistics), sampled at scrape time",
                self.rows,
            ),
        )
        for name, doc, sample in samples:
            if sample is not None:
                yield GaugeMetricFamily(PREFIX + name, doc, value=sample)


def registry_for(collector: StoreCollector) -> CollectorRegistry:
    """A registry of this store's own (never the process-global default one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
