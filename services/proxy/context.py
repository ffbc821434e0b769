"""State shared by every connection of one proxy replica.

The relay reads from here on its hot path (``config``, ``capture``, ``pool``)
and keeps the live bookkeeping here (``active`` flows, ``connections``,
counters) that status, heartbeats and kill commands read.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from services.proxy.capture import Capture
from services.proxy.config import ProxyConfig
from services.proxy.pool import UpstreamPool
from services.proxy.tls import CertificateAuthority

if TYPE_CHECKING:
    from services.proxy.http1 import ClientConnection, Exchange


def parse_reverse(mode: str) -> tuple[str, str, int, bytes] | None:
    """``reverse:https://host:port`` -> (scheme, host, port, Host header); None if regular."""
    if not mode.startswith("reverse:"):
        return None
    u = urlsplit(mode.removeprefix("reverse:"))
    assert u.hostname is not None
    port = u.port or (443 if u.scheme == "https" else 80)
    host_header = u.hostname if u.port is None else f"{u.hostname}:{u.port}"
    return u.scheme, u.hostname.lower(), port, host_header.encode("idna")


class ProxyContext:
    """Per-replica state handed to every ``ClientConnection``."""

    def __init__(
        self,
        replica: str,
        config: ProxyConfig,
        capture: Capture,
        ca: CertificateAuthority,
        mode: str = "regular",
        pool_size: int = 64,
    ) -> None:
        self.replica = replica
        self.config = config
        self.capture = capture
        self.ca = ca
        self.mode = mode
        self.reverse = parse_reverse(mode)
        self.pool = UpstreamPool(pool_size)
        self.listen_port = -1
        self.local_names: frozenset[str] = frozenset({"localhost", socket.gethostname().lower()})
        self.active: dict[str, Exchange] = {}
        self.connections: set[ClientConnection] = set()
        self.flows_total = 0
        self.draining = False

    def is_local(self, host: str) -> bool:
        """True if ``host`` names this machine (used to refuse proxy loops)."""
        if host in self.local_names:
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return ip.is_loopback or ip.is_unspecified

    def apply_config(self, config: ProxyConfig) -> None:
        """Switch to a new config revision; live connections keep going, idle upstream
        connections are recycled (they were opened under the old TLS settings)."""
        self.config = config
        self.pool.clear()

    def kill(self, flow_id: str, reason: str = "killed by operator") -> bool:
        """Abort the active flow ``flow_id``; False if this replica does not hold it."""
        ex = self.active.get(flow_id)
        if ex is None:
            return False
        ex.conn.kill(ex, reason)
        return True
