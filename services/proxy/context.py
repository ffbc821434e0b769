"""State shared by every connection of one proxy replica.

The relay reads from here on its hot path (``config``, ``chain``,
``destinations``, ``capture``, ``pool``) and keeps the live bookkeeping here
(``active`` exchanges, ``connections``, counters) that status, heartbeats and
kill commands read. Everything derived from a config revision (the addon chain,
the destination policy) is rebuilt once in ``apply_config``, never per request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from services.proxy.addons import build_chain, rules
from services.proxy.capture import Capture
from services.proxy.config import ProxyConfig
from services.proxy.destinations import DestinationPolicy, ProtectedEndpoints
from services.proxy.intercepts import Intercepts
from services.proxy.pool import UpstreamPool
from services.proxy.tls import CertificateAuthority

if TYPE_CHECKING:
    from services.proxy.exchange import Exchange


# What an upstream can do wrong that the relay counts: a response head over the cap,
# bytes no request asked for (the connection is then never reused), an unparsable response.
UPSTREAM_FAULTS = ("head_too_large", "stray_bytes", "invalid_response")


class Connection(Protocol):
    """What the replica's lifecycle needs of a client connection."""

    ex: Exchange | None

    def shutdown(self) -> None: ...

    def end(self, ex: Exchange, state: str, error: str | None = None) -> None: ...

    def abort(self) -> None: ...


def parse_reverse(mode: str) -> tuple[str, str, int, bytes] | None:
    """``reverse:https://host:port`` -> (scheme, host, port, Host header); None if not."""
    if not mode.startswith("reverse:"):
        return None
    u = urlsplit(mode.removeprefix("reverse:"))
    assert u.hostname is not None
    port = u.port or (443 if u.scheme == "https" else 80)
    host_header = u.hostname if u.port is None else f"{u.hostname}:{u.port}"
    return u.scheme, u.hostname.lower(), port, host_header.encode("idna")


def parse_upstream(mode: str) -> tuple[str, int] | None:
    """``upstream:http://host:port`` -> (host, port) of the proxy to chain through."""
    if not mode.startswith("upstream:"):
        return None
    u = urlsplit(mode.removeprefix("upstream:"))
    assert u.hostname is not None
    return u.hostname.lower(), u.port or 8080


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
        endpoint_names: list[tuple[str, int]] | None = None,
        restrict_private: bool = False,
    ) -> None:
        self.replica = replica
        self.capture = capture
        self.ca = ca
        self.mode = mode
        self.reverse = parse_reverse(mode)
        self.upstream_proxy = parse_upstream(mode)
        self.pool = UpstreamPool(pool_size)
        # the fleet's own (host, port) endpoints, never reachable through the proxy
        self.endpoint_names = list(endpoint_names or ())
        self.endpoints = ProtectedEndpoints.resolve(self.endpoint_names)
        self.restrict_private = restrict_private
        # RFC 9110 Via: our received-by pseudonym names the replica, so a request that
        # comes back through it (a loop, even via other proxies) is recognised.
        self.via_token = f"proxyfleet-{replica}".encode()
        self.via = b"1.1 " + self.via_token
        self.active: dict[str, Exchange] = {}
        self.connections: set[Connection] = set()
        self.flows_total = 0
        # upstreams that broke the protocol, by fault (read by the metrics collector)
        self.upstream_faults = dict.fromkeys(UPSTREAM_FAULTS, 0)
        self.draining = False
        self.policy = rules.EMPTY
        self.intercepts = Intercepts(replica, capture)
        self.apply_config(config)

    def apply_config(self, config: ProxyConfig) -> None:
        """Switch to a new config revision; live connections keep going, idle upstream
        connections are recycled (they were opened under the old settings)."""
        doc = config.doc
        allow = list(doc.destination_allow)
        if self.reverse is not None:  # the operator named this upstream: it may be private
            allow.append(self.reverse[1])
        self.destinations = DestinationPolicy.build(
            allow, doc.destination_deny, self.endpoints, self.restrict_private
        )
        self.chain = build_chain(config, self.policy, self.replica, self.intercepts)
        self.config = config
        self.pool.clear()

    def apply_policy(self, policy: rules.CompiledPolicy) -> None:
        """Switch to a new rules-policy revision: exchanges already past a phase keep
        what the old one decided; the next hook point runs the new one."""
        self.policy = policy
        self.chain = build_chain(self.config, policy, self.replica, self.intercepts)

    def protect(self, endpoints: ProtectedEndpoints) -> None:
        """Replace the protected endpoints (e.g. once the listener's real port is known)."""
        self.endpoints = endpoints
        self.apply_config(self.config)

    def kill(self, flow_id: str, reason: str = "killed by operator") -> bool:
        """Abort the active flow ``flow_id``; False if this replica does not hold it."""
        ex = self.active.get(flow_id)
        if ex is None:
            return False
        ex.conn.kill(ex, reason)
        return True
