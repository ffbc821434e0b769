"""The inside of an answered CONNECT: TLS or plain HTTP, told apart by one peeked byte.

After ``200 Connection established`` a client either starts TLS (its first byte
is a handshake record, a ClientHello), which the proxy intercepts with a minted
certificate, or speaks plain HTTP/1.1 inside the tunnel (``curl -p``, ``ws://``
clients). The byte is peeked, not read, so that ``start_tls`` still sees the
whole ClientHello. Either way a fresh ``ClientConnection`` for the CONNECT's
target takes the transport over (``ClientConnection.hand_over``).
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

TLS_HANDSHAKE = 0x16  # the first byte of a TLS handshake record


async def peek_first_byte(loop: asyncio.AbstractEventLoop, transport: Any) -> int | None:
    """The first byte the client sends, left unread in the socket (None at EOF).

    The transport is paused; readiness is watched on a duplicate of its socket so
    that the event loop's own reader for the transport is left alone.
    """
    sock = transport.get_extra_info("socket")
    fd = os.dup(sock.fileno())
    peek = socket.socket(fileno=fd)
    try:
        peek.settimeout(0.0)
        while True:
            try:
                data = peek.recv(1, socket.MSG_PEEK)
                return data[0] if data else None
            except BlockingIOError:
                pass
            ready = loop.create_future()
            loop.add_reader(fd, ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
    finally:
        peek.close()
