"""Idle keep-alive connections to upstream servers, per (scheme, host, port).

Taking a connection is a dict lookup and a list pop; a pooled connection that
the server closed removes itself (``discard``) from its connection_lost callback.
"""

from __future__ import annotations

from typing import Protocol


class Pooled(Protocol):
    key: tuple[str, str, int]
    closed: bool

    def close(self) -> None: ...


class UpstreamPool:
    """At most ``per_host`` idle connections for each upstream."""

    def __init__(self, per_host: int) -> None:
        self.per_host = per_host
        self._idle: dict[tuple[str, str, int], list[Pooled]] = {}

    def take(self, key: tuple[str, str, int]) -> Pooled | None:
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            if not conn.closed:
                return conn
        return None

    def put(self, conn: Pooled) -> None:
        conns = self._idle.setdefault(conn.key, [])
        if len(conns) >= self.per_host or conn.closed:
            conn.close()
        else:
            conns.append(conn)

    def discard(self, conn: Pooled) -> None:
        conns = self._idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    def clear(self) -> None:
        """Close every idle connection (a config change made them stale)."""
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    @property
    def idle_count(self) -> int:
        return sum(len(c) for c in self._idle.values())
