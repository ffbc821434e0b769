"""Byte-relay helpers for tunnels and WebSocket connections."""

from __future__ import annotations


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
