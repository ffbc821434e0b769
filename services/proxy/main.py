"""``proxyfleet proxy``: run one proxy replica until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging

from libs.common.bus import Bus, BusUnavailable
from libs.common.models import RuntimeConfig
from libs.common.settings import ProxySettings
from libs.common.tasks import cancel_and_wait, install_signal_handlers, spawn
from services.proxy.capture import Capture
from services.proxy.config import ProxyConfig
from services.proxy.context import ProxyContext
from services.proxy.control import Control
from services.proxy.server import ListenError, ProxyServer
from services.proxy.tls import CertificateAuthority

log = logging.getLogger("proxyfleet.proxy")


class StartupError(Exception):
    """The replica cannot start; the message is the one line printed before exiting."""


def initial_config(settings: ProxySettings) -> ProxyConfig:
    """The config a replica starts with, from its settings (revision 0)."""
    doc = RuntimeConfig(
        capture_body_limit=settings.capture_body_limit,
        ignore_hosts=settings.ignore_hosts,
        intercept_tls=settings.intercept_tls,
        upstream_verify_tls=settings.upstream_verify_tls,
        upstream_connect_timeout=settings.upstream_connect_timeout,
        upstream_read_timeout=settings.upstream_read_timeout,
        client_idle_timeout=settings.client_idle_timeout,
    )
    return ProxyConfig.build(doc, 0, settings.upstream_ca_bundle)


async def run_proxy(settings: ProxySettings) -> None:
    """Start the replica, serve until a signal, then drain and exit."""
    stop = asyncio.Event()
    install_signal_handlers(stop)
    try:
        ca = CertificateAuthority.load_or_create(settings.data_dir)
        config = initial_config(settings)
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot prepare TLS: {exc}") from None
    try:
        bus = await Bus.connect(
            settings.nats_url, f"proxy {settings.replica_id}", settings.nats_connect_timeout
        )
    except BusUnavailable as exc:
        raise StartupError(str(exc)) from None
    await bus.ensure_streams()
    capture = Capture(
        settings.replica_id,
        bus,
        queue_size=settings.capture_queue_size,
        batch_max=settings.capture_batch_max,
        linger=settings.capture_linger_ms / 1000,
    )
    ctx = ProxyContext(
        settings.replica_id, config, capture, ca, settings.proxy_mode, settings.upstream_pool_size
    )
    server = ProxyServer(ctx, settings.proxy_listen, settings.proxy_reuse_port)
    control = Control(bus, ctx, server, settings)
    if settings.proxy_start_listening:
        try:
            await server.start()
        except ListenError as exc:
            await bus.close()
            raise StartupError(str(exc)) from None
    await control.start()
    tasks = [
        spawn(capture.run(), name="capture"),
        spawn(control.heartbeat_loop(), name="heartbeat"),
        spawn(control.watch_config(), name="config-watch"),
    ]
    print(
        f"proxyfleet proxy {settings.replica_id} listening on {server.address} "
        f"({settings.proxy_mode}); CA certificate: {ca.cert_path}",
        flush=True,
    )
    log.info("replica %s started", settings.replica_id)
    await stop.wait()
    log.info(
        "replica %s stopping: draining for up to %gs", settings.replica_id, settings.drain_timeout
    )
    await server.stop(settings.drain_timeout)
    await cancel_and_wait(*tasks)
    await capture.flush(timeout=5.0)
    await control.close()
    await control.deregister()
    await bus.close()
    log.info("replica %s stopped", settings.replica_id)
