"""Replay: a recorded request sent again through this replica's own relay.

The request enters the relay as a new client's would, over one end of a socket pair
(so framing, the destination policy, rules and capture all apply, and nothing needs
the listener to be open); the flow it makes is marked ``replay_of``. The caller gets
the new flow's id as soon as it exists; the response is read and dropped here (the
flow records it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from libs.common.replay import ReplayRequest
from libs.common.tasks import spawn
from services.proxy.client import ClientConnection
from services.proxy.context import ProxyContext
from services.proxy.flow import Flow

log = logging.getLogger("proxyfleet.replay")

START_TIMEOUT = 5.0  # seconds for the relay to take the request in


class ReplayFailed(Exception):
    pass


async def replay(ctx: ProxyContext, request: ReplayRequest) -> str:
    """Send ``request`` through the relay; the id of the flow it made."""
    loop = asyncio.get_running_loop()
    started: asyncio.Future[str] = loop.create_future()

    def on_flow(flow: Flow) -> None:
        flow.replay_of = request.replay_of
        if not started.done():
            started.set_result(flow.id)

    def factory() -> ClientConnection:
        conn = ClientConnection(ctx)
        conn.replay = on_flow
        return conn

    ours, theirs = socket.socketpair()
    try:
        await loop.connect_accepted_socket(factory, theirs)
    except BaseException:
        ours.close()
        theirs.close()
        raise
    reader, writer = await asyncio.open_connection(sock=ours)
    writer.write(request.wire())
    spawn(_drain(reader, writer, ctx.config.doc.upstream_read_timeout + 5), name="replay")
    try:
        async with asyncio.timeout(START_TIMEOUT):
            return await started
    except TimeoutError:
        writer.close()
        raise ReplayFailed("the relay did not take the request in") from None


async def _drain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, wait: float) -> None:
    """Read the response to its end (the relay records it), then close our end."""
    try:
        async with asyncio.timeout(wait):
            while await reader.read(1 << 16):
                pass
    except (TimeoutError, OSError) as exc:
        log.debug("replay connection ended: %r", exc)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
