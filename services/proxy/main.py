"""``proxyfleet proxy``: one proxy replica, its parts wired together.

``Replica`` is what the CLI runs and what integration tests start in-process:
``start()`` connects to NATS, opens the listener and starts the background
tasks; ``stop()`` drains, flushes captured flows and leaves the registry.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Awaitable
from typing import Any

from libs.common import events
from libs.common.bus import Bus, BusUnavailable
from libs.common.metrics import MetricsListenError, MetricsServer
from libs.common.models import RuntimeConfig
from libs.common.settings import ProxySettings
from libs.common.tasks import cancel_and_wait, install_signal_handlers, spawn
from services.proxy.capture import Capture
from services.proxy.config import ProxyConfig
from services.proxy.context import ProxyContext
from services.proxy.control import Control
from services.proxy.destinations import fleet_endpoints, restricts_private
from services.proxy.metrics import registry_for
from services.proxy.server import ListenError, ProxyServer
from services.proxy.tls import CertificateAuthority

log = logging.getLogger("proxyfleet.proxy")


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for the relay's allocation pattern.

    Every exchange allocates a few dozen short-lived containers that reference
    counting frees; with the default gen-0 threshold (700) the collector still
    runs every ~20 exchanges and, with many flows queued for publishing, its
    older-generation passes cost tens of microseconds per request and show up
    as latency spikes. Freezing the start-up heap and collecting young objects
    less often halves that cost (measured: 27 -> 18 us of relay work per
    exchange with a full capture queue; c=50 p99 ~100 ms -> ~30 ms under wrk);
    cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


class StartupError(Exception):
    """The replica cannot start; the message is the one line printed before exiting."""


def initial_config(settings: ProxySettings) -> ProxyConfig:
    """The config a replica starts with, from its settings (revision 0)."""
    # every runtime-config field has a process setting of the same name (its default)
    doc = RuntimeConfig(**{name: getattr(settings, name) for name in RuntimeConfig.model_fields})
    return ProxyConfig.build(doc, 0, settings.upstream_ca_bundle)


class Replica:
    """A running proxy replica: listener, capture publisher, control plane."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.ca: CertificateAuthority | None = None
        self.bus: Bus | None = None
        self.ctx: ProxyContext | None = None
        self.server: ProxyServer | None = None
        self.control: Control | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.registry = registry_for(self)  # this replica's Prometheus metrics
        self.metrics: MetricsServer | None = None
        self.stopped: dict[str, Any] | None = None  # the replica_stopped data, once stopped

    async def start(self) -> None:
        """Bring the replica up, or raise ``StartupError`` with a one-line reason."""
        s = self.settings
        try:
            self.ca = CertificateAuthority.load_or_create(s.data_dir)
            config = initial_config(s)
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot prepare TLS: {exc}") from None
        try:
            self.bus = await Bus.connect(
                s.nats_url,
                f"proxy {s.replica_id}",
                s.nats_connect_timeout,
                replicas=s.nats_replicas,
            )
        except BusUnavailable as exc:
            raise StartupError(str(exc)) from None
        await self.bus.ensure_streams()
        capture = Capture(
            s.replica_id,
            self.bus,
            queue_size=s.capture_queue_size,
            batch_max=s.capture_batch_max,
            linger=s.capture_linger_ms / 1000,
            queue_bytes=s.capture_queue_bytes,
        )
        capture.configure(config)
        self.ctx = ProxyContext(
            s.replica_id,
            config,
            capture,
            self.ca,
            s.proxy_mode,
            s.upstream_pool_size,
            endpoint_names=fleet_endpoints(s),
            restrict_private=restricts_private(s.proxy_listen),
        )
        self.server = ProxyServer(self.ctx, s.proxy_listen, s.proxy_reuse_port)
        self.control = Control(self.bus, self.ctx, self.server, s)
        if s.proxy_metrics_listen:
            metrics = MetricsServer(self.registry, s.proxy_metrics_listen)
            try:
                await metrics.start()
            except MetricsListenError as exc:
                await self.bus.close()
                raise StartupError(str(exc)) from None
            self.metrics = metrics
        if s.proxy_start_listening:
            try:
                await self.server.start()
            except ListenError as exc:
                if self.metrics is not None:
                    await self.metrics.stop()
                await self.bus.close()
                raise StartupError(str(exc)) from None
        await self.control.start()
        await self.control.publish_ca(self.ca.cert_path.read_bytes())
        self._tasks = [
            spawn(capture.run(), name="capture"),
            spawn(self.control.heartbeat_loop(), name="heartbeat"),
            spawn(self.control.watch_config(), name="config-watch"),
            spawn(self.control.watch_policy(), name="policy-watch"),
            spawn(self.control.watch_approvals(), name="approvals-watch"),
            spawn(self.control.watch_keys(), name="keys-watch"),
        ]
        log.info("replica %s started", s.replica_id)
        await self.control.event(
            events.REPLICA_STARTED,
            {
                "listen": self.server.address,
                "listening": self.server.state == "running",
                "mode": s.proxy_mode,
                "pid": os.getpid(),
            },
        )

    @property
    def address(self) -> str:
        assert self.server is not None
        return self.server.address

    async def stop(self, drain: float | None = None) -> dict[str, Any]:
        """Drain the listener, publish what was captured, deregister, disconnect.

        Never hangs or raises because NATS is down: captured flows get
        ``FLUSH_TIMEOUT`` seconds to go out (the batch a publisher was sending
        included), what is left is counted as undeliverable (one log line, and the
        ``replica_stopped`` event's data, which this returns), and every NATS step
        after that is bounded. Calling it again returns the same summary.
        """
        if self.stopped is not None:
            return self.stopped
        assert self.server and self.ctx and self.control and self.bus
        rid = self.settings.replica_id
        deadline = self.settings.drain_timeout if drain is None else drain
        log.info("replica %s stopping: draining up to %gs", rid, deadline)
        await self.server.stop(deadline)
        await cancel_and_wait(*self._tasks)
        capture = self.ctx.capture
        await capture.flush(timeout=FLUSH_TIMEOUT)
        lost = capture.abandon()
        if lost.events:
            why = "NATS unreachable" if not self.bus.connected else "NATS too slow"
            log.warning(
                "replica %s: %d flows not recorded (%d flow events undeliverable: %s)",
                rid,
                lost.flows,
                lost.events,
                why,
            )
        await _bounded(self.control.close(), "unsubscribe")
        if self.bus.connected:  # else the registry entry expires with its TTL
            await _bounded(self.control.deregister(), "deregister")
        data: dict[str, Any] = {
            "flows_total": self.ctx.flows_total,
            "events_dropped": capture.dropped,
            "events_undeliverable": capture.undeliverable,
            "flows_undeliverable": lost.flows,
            "drain": deadline,
        }
        self.stopped = data
        await self.control.event(events.REPLICA_STOPPED, data)  # bounded, never raises
        await _bounded(self.bus.close(), "disconnect", BUS_CLOSE_TIMEOUT)
        if self.metrics is not None:
            await self.metrics.stop()
        log.info("replica %s stopped", rid)
        return data


FLUSH_TIMEOUT = 5.0  # seconds captured flows get to reach NATS on stop
STEP_TIMEOUT = 2.0  # each later NATS step of stopping (unsubscribe, deregister)
BUS_CLOSE_TIMEOUT = 6.0  # Bus.close drains for up to 5 s


async def _bounded(step: Awaitable[Any], what: str, timeout: float = STEP_TIMEOUT) -> None:
    """Run one NATS step of stopping: at most ``timeout`` seconds, never raising (NATS
    may be down; the replica must still stop cleanly)."""
    try:
        async with asyncio.timeout(timeout):
            await step
    except Exception as exc:  # TimeoutError, or nats-py failing on a dead connection
        log.debug("stop: %s failed: %r", what, exc)


async def run_proxy(settings: ProxySettings) -> None:
    """Run one replica until SIGTERM/SIGINT, then drain and return."""
    replica = Replica(settings)
    await replica.start()  # a signal before this point ends the process the default way
    tune_gc()
    stop = asyncio.Event()
    install_signal_handlers(stop)
    assert replica.ca is not None
    print(
        f"proxyfleet proxy {settings.replica_id} listening on {replica.address} "
        f"({settings.proxy_mode}); CA certificate: {replica.ca.cert_path}"
        + (f"; metrics: http://{replica.metrics.address}/metrics" if replica.metrics else ""),
        flush=True,
    )
    await stop.wait()
    await replica.stop()
