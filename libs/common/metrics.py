"""Prometheus metrics: the exposition and the small HTTP endpoint that serves it.

Every process part keeps its own ``CollectorRegistry`` (never the global default
one), so that tests can run several replicas, stores and APIs in one process.
The proxy and the store serve ``GET /metrics`` on a port of their own
(``FLEET_PROXY_METRICS_LISTEN`` / ``FLEET_STORE_METRICS_LISTEN``) with
``MetricsServer``: a few lines of asyncio on the service's own event loop, so a
collector reads the service's counters between two callbacks (never while one
is halfway through updating them) and no extra thread competes for the GIL.
The API serves ``/metrics`` as one more route.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from libs.common.settings import parse_hostport

log = logging.getLogger("proxyfleet.metrics")

METRICS_PATH = "/metrics"
READY_PATH = "/readyz"  # served when the owner gives a readiness check
_MAX_HEAD = 8192
_READ_TIMEOUT = 5.0
_REFRESH_TIMEOUT = 2.0

Refresh = Callable[[], Awaitable[None]]
Ready = Callable[[], Awaitable[str | None]]


class MetricsListenError(Exception):
    """The metrics port could not be opened (taken, bad address)."""


def exposition(registry: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
    """The registry as Prometheus text (or OpenMetrics if ``accept`` asks), and its type."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type


class MetricsServer:
    """``GET /metrics`` on its own ``host:port``, served on the running event loop.

    ``refresh`` (optional) runs before each scrape, bounded to two seconds, to
    sample what cannot be read synchronously (a JetStream consumer's lag, a
    database row count); a refresh that fails or times out leaves the last
    samples in place and the scrape still answers.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        listen: str,
        refresh: Refresh | None = None,
        ready: Ready | None = None,
    ) -> None:
        self.registry = registry
        self.listen = listen
        self.refresh = refresh
        self.ready = ready  # /readyz: None when ready, else why not (one line)
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        """The bound ``host:port`` (the real port when ``:0`` was asked for)."""
        if self._server is not None and self._server.sockets:
            host, port = self._server.sockets[0].getsockname()[:2]
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self.listen

    async def start(self) -> None:
        host, port = parse_hostport(self.listen)
        try:
            self._server = await asyncio.start_server(
                self._handle, host, port, reuse_address=True, limit=_MAX_HEAD
            )
        except OSError as exc:
            raise MetricsListenError(
                f"cannot listen on {self.listen} for metrics: {exc.strerror or exc}"
            ) from None
        log.info("metrics on http://%s%s", self.address, METRICS_PATH)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, body, content_type = await self._answer(head)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            writer.close()
            return
        reason = {
            200: "OK",
            400: "Bad Request",
            404: "Not Found",
            405: "Method Not Allowed",
            503: "Service Unavailable",
        }
        writer.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n"
            % (status, reason[status].encode(), content_type.encode(), len(body))
        )
        if not head.startswith(b"HEAD "):
            writer.write(body)
        with contextlib.suppress(Exception):
            await writer.drain()
        writer.close()

    async def _answer(self, head: bytes) -> tuple[int, bytes, str]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, b"bad request\n", "text/plain; charset=utf-8"
        method, target = parts[0], parts[1]
        path = target.split("?", 1)[0]
        if path == READY_PATH and self.ready is not None:
            if method not in ("GET", "HEAD"):
                return 405, b"GET only\n", "text/plain; charset=utf-8"
            try:
                why = await asyncio.wait_for(self.ready(), _REFRESH_TIMEOUT)
            except Exception as exc:
                why = f"readiness check failed: {exc!r}"
            if why is None:
                return 200, b"ready\n", "text/plain; charset=utf-8"
            return 503, why.encode() + b"\n", "text/plain; charset=utf-8"
        if path != METRICS_PATH:
            return 404, b"metrics are at /metrics\n", "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return 405, b"GET only\n", "text/plain; charset=utf-8"
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        if self.refresh is not None:
            try:
                await asyncio.wait_for(self.refresh(), _REFRESH_TIMEOUT)
            except Exception as exc:  # a sample we could not take: serve the last one
                log.debug("metrics refresh failed: %r", exc)
        body, content_type = exposition(self.registry, accept)
        return 200, body, content_type


__all__ = [
    "METRICS_PATH",
    "MetricsListenError",
    "MetricsServer",
    "exposition",
]
