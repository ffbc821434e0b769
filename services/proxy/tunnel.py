"""Byte relays for CONNECT tunnels and WebSockets, as swapped-in protocols.

Once a connection stops carrying HTTP (a blind tunnel, or a WebSocket after
``101``), both of its transports get a ``RelayEnd`` as their protocol: each end
writes what it reads to the other's transport, passes a half-close on, and
pauses its peer's reading while its own transport's buffer is full. An end that
has no peer yet (an upstream that speaks first, like SMTP, before the client
side is wired) keeps what it reads until it is wired.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class FrameCounter:
    """Counts WebSocket frames and complete messages in one direction of a relay.

    Only frame headers are looked at (the payload is skipped by length), so the
    cost is a few operations per frame, whatever its size.
    """

    __slots__ = ("_hdr", "_need", "frames", "messages")

    def __init__(self) -> None:
        self._hdr = b""
        self._need = 0
        self.frames = 0
        self.messages = 0

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._need:
                take = min(self._need, n - i)
                self._need -= take
                i += take
                continue
            old = len(self._hdr)
            buf = self._hdr + data[i : i + 14]
            if len(buf) < 2:
                self._hdr = buf
                return
            b0, b1 = buf[0], buf[1]
            length = b1 & 0x7F
            ext = 2 if length == 126 else 8 if length == 127 else 0
            hlen = 2 + ext + (4 if b1 & 0x80 else 0)
            if len(buf) < hlen:
                self._hdr = buf
                return
            if ext:
                length = int.from_bytes(buf[2 : 2 + ext], "big")
            i += hlen - old
            self._hdr = b""
            self._need = length
            self.frames += 1
            if b0 & 0x80 and (b0 & 0x0F) < 8:  # FIN on a data/continuation frame
                self.messages += 1


class RelayOwner(Protocol):
    """The client connection a relay belongs to: told once when the relay is over."""

    def relay_closed(self) -> None: ...


class RelayEnd(asyncio.Protocol):
    """One side of a byte relay: what its transport reads goes to the peer's transport."""

    def __init__(
        self, relay: Relay, stat: str, counter: FrameCounter | None, messages: str
    ) -> None:
        self.relay = relay
        self.stat = stat  # the flow stats key counting the bytes this end reads
        self.counter = counter
        self.messages = messages  # the stats key of its WebSocket message count
        self.transport: Any = None
        self.peer: RelayEnd | None = None
        self.early: list[bytes] = []  # read before the peer was wired
        self.eof = False
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            self.early.append(data)
            return
        peer.transport.write(data)
        stats = self.relay.stats
        stats[self.stat] += len(data)
        if self.counter is not None:
            self.counter.feed(data)
            stats[self.messages] = self.counter.messages

    def eof_received(self) -> bool | None:
        # half-close: pass the FIN on and keep reading the other way; once both sides
        # sent FIN the relay is over
        self.eof = True
        peer = self.peer
        if peer is None or peer.eof:
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.transport.close()
        self.relay.end_closed()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.closed:
            self.peer.transport.resume_reading()


class Relay:
    """Both ends of one tunnel or WebSocket and the flow stats they keep."""

    def __init__(self, owner: RelayOwner, stats: dict[str, int], count_frames: bool) -> None:
        self.owner = owner
        self.stats = stats
        self.client = RelayEnd(
            self,
            "bytes_client_to_server",
            FrameCounter() if count_frames else None,
            "messages_client_to_server",
        )
        self.server = RelayEnd(
            self,
            "bytes_server_to_client",
            FrameCounter() if count_frames else None,
            "messages_server_to_client",
        )
        self.done = False

    def wire(self, client_transport: Any, server_transport: Any) -> None:
        """Swap both transports over to the relay; bytes either end read early go on now."""
        client, server = self.client, self.server
        client_transport.set_protocol(client)
        client.transport = client_transport
        if server.transport is None:
            server_transport.set_protocol(server)
            server.transport = server_transport
        client.peer, server.peer = server, client
        for end in (server, client):
            early, end.early = end.early, []
            for data in early:
                end.data_received(data)
        client_transport.resume_reading()
        server_transport.resume_reading()

    def end_closed(self) -> None:
        if (
            not self.done
            and (self.client.closed or self.client.transport is None)
            and (self.server.closed or self.server.transport is None)
        ):
            self.done = True
            self.owner.relay_closed()
        elif not self.done and (self.client.closed or self.server.closed):
            # one side is gone: the other was told to close and reports in turn
            for end in (self.client, self.server):
                if not end.closed and end.transport is not None:
                    end.transport.close()

    def abort(self) -> None:
        for end in (self.client, self.server):
            if end.transport is not None and not end.closed:
                end.transport.abort()
