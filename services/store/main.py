"""``proxyfleet store``: the flow store, its parts wired together.

``Store`` is what the CLI runs and what integration tests start in-process:
``start()`` connects to NATS, opens the database, claims the FLOWS stream for it
(``claim``: a second database is refused) and starts ingest, queries, retention and
the registry watch (``replicas``: a gone replica's open flows are ended); ``stop()``
stops fetching, commits and acks the batch in progress, releases the claim, closes
the database and drains the NATS connection.
"""

from __future__ import annotations

import asyncio
import logging

from libs.common import natsurl
from libs.common.bus import Bus, BusUnavailable
from libs.common.metrics import MetricsListenError, MetricsServer
from libs.common.settings import StoreSettings
from libs.common.tasks import cancel_and_wait, install_signal_handlers, spawn
from services.store.claim import ClaimRefused, StreamClaim
from services.store.consumer import FlowConsumer
from services.store.metrics import StoreCollector, registry_for
from services.store.replicas import RegistryWatch, gone_reason, restarted_reason
from services.store.repository import FlowRepository, RepositoryError
from services.store.rpc import StoreRPC
from services.store.sqlite import SQLiteRepository

log = logging.getLogger("proxyfleet.store")

READY_PROBE_TIMEOUT = 1.5


class StartupError(Exception):
    """The store cannot start; the message is the one line printed before exiting."""


def open_repository(s: StoreSettings) -> FlowRepository:
    """The repository ``FLEET_STORE_DB`` names (not yet opened): PostgreSQL for a
    ``postgresql://`` URL, else the SQLite file."""
    if s.pg_dsn is not None:
        from services.store.postgres import PostgresRepository

        return PostgresRepository(
            s.pg_dsn,
            password=s.pg_password,
            pool_size=s.store_pg_pool,
            scan_limit=s.store_scan_limit,
            open_timeout=s.nats_connect_timeout,
        )
    return SQLiteRepository(
        s.db_path, ingest_workers=s.store_ingest_workers, scan_limit=s.store_scan_limit
    )


class Store:
    """A running store replica: consumer, query endpoints, pruner, repository."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.bus: Bus | None = None
        self.repo: FlowRepository | None = None
        self.consumer: FlowConsumer | None = None
        self.rpc: StoreRPC | None = None
        self._pruner: asyncio.Task[None] | None = None
        self.registry_watch: RegistryWatch | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.claim: StreamClaim | None = None
        self._claim_task: asyncio.Task[None] | None = None
        self.failed = asyncio.Event()  # set with ``failure`` when the store must stop
        self.failure = ""
        self._stopped = False
        self.collector = StoreCollector(self)  # this store's Prometheus metrics
        self.registry = registry_for(self.collector)
        self.metrics: MetricsServer | None = None

    async def start(self) -> None:
        """Bring the store up, or raise ``StartupError`` with a one-line reason."""
        s = self.settings
        try:
            self.bus = await Bus.connect(
                s.nats_url,
                f"store {s.replica_id}",
                s.nats_connect_timeout,
                replicas=s.nats_replicas,
            )
        except BusUnavailable as exc:
            raise StartupError(str(exc)) from None
        try:
            try:
                await self.bus.ensure_streams()
            except Exception as exc:
                raise StartupError(f"cannot create the JetStream streams: {exc!r}") from None
            repo = open_repository(s)
            try:
                await repo.open()
            except RepositoryError as exc:
                await repo.close()
                raise StartupError(str(exc)) from None
            self.repo = repo
            log.info("database %s open", s.db_label)
            claim = StreamClaim(
                self.bus,
                await repo.identity(),
                s.replica_id,
                s.db_path if s.pg_dsn is None else s.db_label,
                s.store_claim_ttl,
            )
            try:
                await claim.acquire()
            except ClaimRefused as exc:
                raise StartupError(str(exc)) from None
            except Exception as exc:
                raise StartupError(f"cannot claim the FLOWS stream: {exc!r}") from None
            self.claim = claim
            self.consumer = FlowConsumer(
                self.bus,
                repo,
                batch=s.store_fetch_batch,
                ack_wait=s.store_ack_wait,
                depth=max(2, s.store_ingest_workers + 1),  # every worker busy + one fetched
                source=s.replica_id,
            )
            try:
                await self.consumer.start()
                self.rpc = StoreRPC(self.bus, repo)
                await self.rpc.start()
            except Exception as exc:  # JetStream refused the consumer, NATS went away, ...
                raise StartupError(f"cannot set up ingest and queries on NATS: {exc!r}") from None
            if s.store_metrics_listen:
                metrics = MetricsServer(
                    self.registry,
                    s.store_metrics_listen,
                    refresh=self.collector.refresh,
                    ready=self.not_ready,
                )
                try:
                    await metrics.start()
                except MetricsListenError as exc:
                    raise StartupError(str(exc)) from None
                self.metrics = metrics
        except BaseException:
            if self.consumer is not None:
                await self.consumer.stop(timeout=2.0)
            if self.claim is not None:
                await self.claim.release()
            await self._release()
            raise
        self._pruner = spawn(self._prune_loop(), name="store-prune")
        self._claim_task = spawn(self._keep_claim(), name="store-claim")
        self.registry_watch = RegistryWatch(
            self.bus,
            s.replica_id,
            s.store_replica_check_interval,
            on_gone=self._end_flows_of,
            on_restart=self._end_flows_before,
            # started events of the gone replica may still be on their way (redelivery)
            sweep_window=max(30.0, 3 * s.store_ack_wait),
        )
        self._watcher = spawn(self.registry_watch.run(), name="store-registry-watch")
        log.info("store %s started", s.replica_id)

    async def not_ready(self) -> str | None:
        """Why this store cannot ingest or answer now (``/readyz``), or None when it can."""
        if self.bus is None or not self.bus.connected:
            return "NATS is not connected"
        if self.repo is None:
            return "the database is not open"
        try:
            await asyncio.wait_for(self.repo.ping(), READY_PROBE_TIMEOUT)
        except Exception as exc:
            return f"database unavailable: {exc}" if str(exc) else "database unavailable"
        if self.failure:
            return self.failure
        return None

    async def stop(self) -> None:
        """Stop ingest (finishing the batch in progress), queries and pruning; disconnect."""
        if self._stopped:
            return
        self._stopped = True
        log.info("store %s stopping", self.settings.replica_id)
        if self.consumer is not None:
            await self.consumer.stop()
        if self.rpc is not None:
            await self.rpc.stop()
        await cancel_and_wait(self._pruner, self._watcher, self._claim_task)
        if self.claim is not None and not self.failure:
            await self.claim.release()
        await self._release()
        if self.metrics is not None:
            await self.metrics.stop()
        log.info("store %s stopped", self.settings.replica_id)

    async def _release(self) -> None:
        if self.repo is not None:
            await self.repo.close()
        if self.bus is not None:
            await self.bus.close()

    async def _keep_claim(self) -> None:
        assert self.claim is not None
        reason = await self.claim.run()
        log.error("%s", reason)
        self.failure = reason
        self.failed.set()

    async def _end_flows_of(self, replica: str) -> None:
        """End the open flows of a replica that is gone (``RegistryWatch``)."""
        assert self.repo is not None
        ended = await self.repo.end_active_flows(replica, gone_reason(replica))
        if ended:
            log.warning("%d active flows of gone replica %s ended as error", ended, replica)

    async def _end_flows_before(self, replica: str, started_at: float) -> None:
        """End what an earlier run of ``replica`` left active (``RegistryWatch``)."""
        assert self.repo is not None
        ended = await self.repo.end_active_flows(
            replica, restarted_reason(replica), started_before=started_at
        )
        if ended:
            log.warning("%d active flows of an earlier run of %s ended as error", ended, replica)

    async def _prune_loop(self) -> None:
        """Apply retention now and then every ``store_prune_interval`` seconds."""
        s = self.settings
        assert self.repo is not None
        while True:
            try:
                deleted = await self.repo.prune(s.store_max_age, s.store_max_flows)
            except RepositoryError as exc:
                log.warning("retention pass failed: %s", exc)
            else:
                if deleted:
                    log.info("retention: %d flows deleted", deleted)
            await asyncio.sleep(s.store_prune_interval)


async def run_store(settings: StoreSettings) -> None:
    """Run the store until SIGTERM/SIGINT, then stop gracefully and return.

    A signal that arrives while the store is still starting (e.g. waiting for
    NATS) abandons the start and returns at once.
    """
    stop = asyncio.Event()
    install_signal_handlers(stop)
    store = Store(settings)
    starting = asyncio.ensure_future(store.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.info("stop requested during start-up")
        await cancel_and_wait(starting, stopping)
        return
    if starting.exception() is not None:
        stopping.cancel()
        starting.result()  # raises StartupError
    print(
        f"proxyfleet store {settings.replica_id}: database {settings.db_label}, "
        f"NATS {natsurl.redact(settings.nats_url)}"
        + (f"; metrics: http://{store.metrics.address}/metrics" if store.metrics else ""),
        flush=True,
    )
    failing = asyncio.ensure_future(store.failed.wait())
    await asyncio.wait({stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
    await cancel_and_wait(stopping, failing)
    await store.stop()
    if store.failure:
        raise StartupError(store.failure)
