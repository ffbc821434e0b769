"""The listener lifecycle of one replica: start, graceful stop (drain), status.

Stopping closes the listening socket first (new connections are refused), lets
in-flight exchanges finish while idle keep-alive connections close at once, and
aborts whatever is still running at the deadline.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from libs.common import events
from libs.common.settings import parse_hostport
from services.proxy.client import ClientConnection
from services.proxy.context import ProxyContext
from services.proxy.destinations import ProtectedEndpoints
from services.proxy.flow import ERROR

log = logging.getLogger("proxyfleet.proxy")

# Reports a system event (type, data); set by the replica, bounded and never raising.
EventHook = Callable[[str, dict[str, Any]], Awaitable[Any]]


class ListenError(Exception):
    """The listener could not be opened (port taken, bad address)."""


class ProxyServer:
    """Owns the listening socket of a replica and drains it on stop."""

    def __init__(self, ctx: ProxyContext, listen: str, reuse_port: bool = False) -> None:
        self.ctx = ctx
        self.listen = listen
        self.reuse_port = reuse_port
        self.state = "stopped"
        self.started_at = time.time()
        self._server: asyncio.Server | None = None
        self._lock = asyncio.Lock()
        self.on_event: EventHook | None = None

    @property
    def address(self) -> str:
        """The bound ``host:port`` (the real port when ``:0`` was asked for)."""
        if self._server is not None and self._server.sockets:
            host, port = self._server.sockets[0].getsockname()[:2]
            return f"{host}:{port}"
        return self.listen

    async def start(self) -> None:
        """Open the listener (idempotent)."""
        async with self._lock:
            if self._server is not None:
                return
            host, port = parse_hostport(self.listen)
            loop = asyncio.get_running_loop()
            try:
                self._server = await loop.create_server(
                    lambda: ClientConnection(self.ctx),
                    host,
                    port,
                    reuse_address=True,
                    reuse_port=self.reuse_port or None,
                    backlog=1024,
                )
            except OSError as exc:
                raise ListenError(
                    f"cannot listen on {self.listen}: {exc.strerror or exc}"
                ) from None
            sock = self._server.sockets[0]
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # the listener's real address (port 0 asked for one) is a fleet endpoint too
            # (names resolved off the loop: a start command may come while traffic flows)
            bound = [tuple(s.getsockname()[:2]) for s in self._server.sockets]
            names = [*self.ctx.endpoint_names, *bound]
            self.ctx.protect(await asyncio.to_thread(ProtectedEndpoints.resolve, names))
            self.ctx.draining = False
            self.state = "running"
            log.info("listener started on %s", self.address)
            if self.on_event is not None:
                await self.on_event(events.LISTENER_STARTED, {"address": self.address})

    async def stop(self, deadline: float) -> int:
        """Stop accepting, drain for up to ``deadline`` seconds; return flows aborted."""
        async with self._lock:
            if self._server is None:
                return 0
            address = self.address
            self.state = "stopping"
            self.ctx.draining = True
            self._server.close()
            for conn in list(self.ctx.connections):
                conn.shutdown()
            end = time.monotonic() + deadline
            while self.ctx.connections and time.monotonic() < end:
                await asyncio.sleep(0.05)
            aborted = 0
            for conn in list(self.ctx.connections):
                if conn.ex is not None:
                    conn.end(conn.ex, ERROR, "proxy stopped before the flow finished")
                    aborted += 1
                conn.abort()
            self.ctx.connections.clear()
            self.ctx.pool.clear()
            await self._server.wait_closed()
            self._server = None
            self.state = "stopped"
            log.info("listener on %s stopped (%d flows cut at the deadline)", address, aborted)
            if self.on_event is not None:
                await self.on_event(
                    events.LISTENER_STOPPED,
                    {"address": address, "aborted": aborted, "deadline": deadline},
                )
            return aborted
