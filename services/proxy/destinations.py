"""Where the proxy may connect: the destination policy (DESIGN.md, "Security model").

The control plane must not be reachable through the data plane. Host names are not
checked: ``127.1``, ``2130706433``, ``0x7f000001``, ``[::ffff:127.0.0.1]``,
``localhost.`` and any DNS name pointing at 10.0.0.5 all spell addresses a name
check misses. So a destination is checked *after* resolution, on the address the
proxy will actually connect to, and the proxy then connects to that checked
address (never to the name again), so a DNS answer that changes between the check
and the connect (rebinding) cannot slip past. TLS still uses the requested name for
SNI and certificate verification.

Three parts:

- ``resolve`` turns a host into addresses exactly as the OS would connect: a numeric
  ``getaddrinfo`` first (no DNS, no thread hop; it accepts every IPv4 spelling
  ``inet_aton`` does, which is what a name-based ``connect`` would end up using),
  then a normal lookup in the loop's resolver.
- ``DestinationPolicy`` is compiled once per config revision (from the runtime
  config's ``destination_allow``/``destination_deny``, the replica's protected
  endpoints and whether its listener is loopback-only); ``check`` is then a few
  set lookups and integer comparisons, microseconds, and builds a string only when
  it refuses.
- ``ProtectedEndpoints`` is the fleet's own listeners (NATS, the proxy's listener
  and metrics, the API and whatever ``protected_endpoints`` names), resolved once
  at start-up.

Precedence: a fleet endpoint is always refused (nothing opens it); then
``destination_deny``; then ``destination_allow``; then, when the proxy listens on a
non-loopback address, the refusal of non-public addresses (loopback, private,
link-local, CGNAT, reserved...). ``destination_allow`` only lifts that default: it
is not an allow-list of the only places one may go. Host globs in either list are
matched against the *requested* name (so ``*.corp.example`` in allow opens what
those names resolve to); CIDRs against the resolved address, which is the check
that holds against every spelling.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import translate
from urllib.parse import urlsplit

from libs.common.models import parse_destination
from libs.common.settings import ProxySettings, parse_hostport

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Non-public ranges, first match wins. An explicit table rather than ipaddress's
# is_private/is_global: those changed between Python patch releases (3.11 vs 3.12.4+)
# and 100.64.0.0/10 is neither; a security policy must not move with the interpreter.
_V4_TABLE: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/32", "unspecified"),  # connect() to it reaches this host
    ("0.0.0.0/8", "this-network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),  # cloud metadata (169.254.169.254) lives here
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "reserved"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "reserved"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),  # incl. 255.255.255.255
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known prefix: the last 32 bits are IPv4
_V6_TABLE: tuple[tuple[str, str], ...] = (
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("64:ff9b:1::/48", "private"),  # local-use NAT64 (RFC 8215)
    ("::/8", "reserved"),  # IPv4-compatible, IPv4-translated...; NAT64 is handled before
    ("100::/64", "reserved"),
    ("2001:db8::/32", "documentation"),
    ("2001::/23", "reserved"),  # IETF protocol assignments (Teredo, ORCHID, ...)
    ("3fff::/20", "documentation"),
    ("fc00::/7", "private"),  # unique local
    ("fe80::/10", "link-local"),
    ("fec0::/10", "private"),  # site-local (deprecated)
    ("ff00::/8", "multicast"),
)


def _ranges(table: tuple[tuple[str, str], ...]) -> tuple[tuple[int, int, str], ...]:
    nets = [(ipaddress.ip_network(n), kind) for n, kind in table]
    return tuple((int(n.network_address), int(n.broadcast_address), k) for n, k in nets)


_V4 = _ranges(_V4_TABLE)
_V6 = _ranges(_V6_TABLE)
_LOCAL_KINDS = frozenset({"loopback", "unspecified"})


def _kind4(n: int) -> str | None:
    for lo, hi, kind in _V4:
        if lo <= n <= hi:
            return kind
    return None


def _kind(addr: Address) -> str | None:
    """The non-public class of ``addr`` (``"private"``, ``"loopback"``...), or None."""
    n = int(addr)
    if addr.version == 4:
        return _kind4(n)
    if addr in _NAT64:  # a NAT64 gateway would carry it to the embedded IPv4
        inner = _kind4(n & 0xFFFFFFFF)
        return None if inner is None else f"{inner} (via NAT64)"
    if n >> 112 == 0x2002:  # 6to4: 2002:AABB:CCDD::/48 carries AA.BB.CC.DD
        inner = _kind4((n >> 80) & 0xFFFFFFFF)
        return None if inner is None else f"{inner} (via 6to4)"
    for lo, hi, kind in _V6:
        if lo <= n <= hi:
            return kind
    return None


@functools.lru_cache(maxsize=4096)
def classify(ip: str) -> tuple[Address, str | None] | None:
    """``ip`` (as ``resolve`` returns it) -> (normalised address, non-public kind).

    Brackets and a ``%scope`` are dropped; IPv4-mapped IPv6 (``::ffff:127.0.0.1``)
    becomes the IPv4 address, since that is where a connect to it goes. None if
    ``ip`` is not an IP address. Cached: parsing is most of the cost of a check.
    """
    text = ip[1:-1] if ip.startswith("[") and ip.endswith("]") else ip
    try:
        addr: Address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if addr.version == 6:
        mapped = addr.ipv4_mapped
        if mapped is not None:
            addr = mapped
    return addr, _kind(addr)


def is_local_address(addr: Address) -> bool:
    """True if ``addr`` is one of this host's addresses (a datagram bind succeeds).

    Exact at the moment of asking, with nothing to keep up to date as interfaces
    change; a few microseconds, so it is asked only for a destination port that a
    fleet service listens on for every address (``0.0.0.0``/``::``).
    """
    if _kind(addr) in _LOCAL_KINDS:
        return True
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(addr), 0))
    except OSError:
        return False
    return True


def _where(host: str, addr: Address, port: int) -> str:
    """``ip:port``, or ``host:port (ip)`` when the client spelt it otherwise."""
    ip = str(addr)
    if host.lower().strip("[]") in ("", ip):
        return f"[{ip}]:{port}" if addr.version == 6 else f"{ip}:{port}"
    return f"{host[:253]}:{port} ({ip})"


@dataclass(frozen=True, slots=True)
class ProtectedEndpoints:
    """The fleet's own listeners, as the destination check looks them up.

    ``exact``: (address, port) of every resolved endpoint. ``local_ports``: ports a
    fleet service listens on at a loopback or unspecified address; any loopback or
    unspecified destination on them is refused (``127.0.0.2`` or ``0.0.0.0`` reach a
    listener on ``127.0.0.1``/``0.0.0.0`` too). ``any_ports``: ports bound to
    ``0.0.0.0``/``::``, where every address of this host reaches the service
    (checked with ``is_local_address``). ``names``: the (host, port) pairs as
    written, so a name that did not resolve at start-up is still caught when asked
    for by that name. ``unresolved``: those names, for a start-up warning.
    """

    exact: frozenset[tuple[Address, int]] = frozenset()
    local_ports: frozenset[int] = frozenset()
    any_ports: frozenset[int] = frozenset()
    names: frozenset[tuple[str, int]] = frozenset()
    unresolved: tuple[str, ...] = ()

    @classmethod
    def resolve(cls, endpoints: Iterable[tuple[str, int]]) -> ProtectedEndpoints:
        """Resolve ``(host, port)`` pairs (blocking: start-up or config time only).

        A host of ``""``, ``0.0.0.0`` or ``::`` means every local address. Port 0
        (an ephemeral listener) is skipped: add the bound address once known.
        """
        exact: set[tuple[Address, int]] = set()
        local: set[int] = set()
        any_: set[int] = set()
        names: set[tuple[str, int]] = set()
        unresolved: list[str] = []
        for host, port in endpoints:
            if not port:
                continue
            name = host.strip().strip("[]").lower().removesuffix(".")
            if name and classify(name) is None:
                names.add((name, port))
            try:  # "" binds every address (getaddrinfo(None) would say loopback)
                infos = socket.getaddrinfo(name or "0.0.0.0", port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError):
                unresolved.append(f"{host}:{port}")
                continue
            for info in infos:
                facts = classify(str(info[4][0]))
                if facts is None:
                    continue
                addr, kind = facts
                exact.add((addr, port))
                if kind in _LOCAL_KINDS:
                    local.add(port)
                if kind == "unspecified":
                    any_.add(port)
        return cls(
            frozenset(exact), frozenset(local), frozenset(any_), frozenset(names), tuple(unresolved)
        )


def fleet_endpoints(settings: ProxySettings) -> list[tuple[str, int]]:
    """The (host, port) pairs a replica must never connect to, from its settings:
    every NATS URL (``user:pass@`` and schemes handled), the proxy's listener, its
    metrics listener and ``protected_endpoints`` (the API, the store's metrics...)."""
    out: list[tuple[str, int]] = []
    default_ports = {"nats": 4222, "tls": 4222, "ws": 80, "wss": 443}
    for url in settings.nats_url.split(","):
        url = url.strip()
        if not url:
            continue
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        try:
            port = parts.port or default_ports.get(parts.scheme, 4222)
        except ValueError:
            continue
        if parts.hostname:
            out.append((parts.hostname, port))
    listens = [settings.proxy_listen, settings.proxy_metrics_listen]
    for value in [*listens, *settings.protected_endpoints]:
        if value:
            out.append(parse_hostport(value))
    return out


def endpoints_from_settings(settings: ProxySettings) -> ProtectedEndpoints:
    """``ProtectedEndpoints`` for this replica (blocking DNS: call it at start-up)."""
    return ProtectedEndpoints.resolve(fleet_endpoints(settings))


def restricts_private(listen: str) -> bool:
    """True unless ``listen`` (``host:port``) is loopback-only: a proxy reachable from
    other machines must not hand them this host's private networks. An address that
    does not resolve counts as non-loopback (fail closed)."""
    host, port = parse_hostport(listen)
    try:
        infos = socket.getaddrinfo(host or "0.0.0.0", port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return True
    kinds = [(classify(str(i[4][0])) or (None, None))[1] for i in infos]
    return not kinds or any(k != "loopback" for k in kinds)


@dataclass(frozen=True, slots=True)
class _Rules:
    """One list (allow or deny) compiled: networks, and host globs as one regex for
    any port plus one per port. ``entries`` keeps the text for refusal messages."""

    nets: tuple[tuple[Network, int | None, str], ...]
    any_port: re.Pattern[str] | None
    by_port: dict[int, re.Pattern[str]]
    globs: tuple[tuple[re.Pattern[str], int | None, str], ...]

    @classmethod
    def build(cls, entries: Iterable[str]) -> _Rules:
        nets: list[tuple[Network, int | None, str]] = []
        globs: list[tuple[re.Pattern[str], int | None, str]] = []
        any_port: list[str] = []
        by_port: dict[int, list[str]] = {}
        for entry in entries:
            target, port = parse_destination(entry)
            if isinstance(target, str):
                rx = translate(target)
                globs.append((re.compile(rx), port, entry))
                (any_port if port is None else by_port.setdefault(port, [])).append(rx)
            else:
                nets.append((target, port, entry))

        def one(rxs: list[str]) -> re.Pattern[str] | None:
            return re.compile("|".join(f"(?:{r})" for r in rxs)) if rxs else None

        compiled = {p: c for p, rxs in by_port.items() if (c := one(rxs)) is not None}
        return cls(tuple(nets), one(any_port), compiled, tuple(globs))

    @property
    def has_globs(self) -> bool:
        return bool(self.globs)

    def match(self, name: str, addr: Address, port: int) -> str | None:
        """The first entry matching, or None. ``name``: the requested host, normalised."""
        for net, p, entry in self.nets:
            if (p is None or p == port) and addr in net:
                return entry
        return self.match_name(name, port)

    def match_name(self, name: str, port: int) -> str | None:
        """The first host-glob entry matching ``name``, or None."""
        if self.globs and name:
            hit = (self.any_port is not None and self.any_port.match(name)) or (
                (rx := self.by_port.get(port)) is not None and rx.match(name)
            )
            if hit:
                for rx_one, p, entry in self.globs:
                    if (p is None or p == port) and rx_one.match(name):
                        return entry
        return None


_NO_RULES = _Rules((), None, {}, ())


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    """The compiled destination policy of one config revision (see the module doc)."""

    endpoints: ProtectedEndpoints
    restrict_private: bool
    allow: _Rules = _NO_RULES
    deny: _Rules = _NO_RULES

    @classmethod
    def build(
        cls,
        allow: Iterable[str],
        deny: Iterable[str],
        endpoints: ProtectedEndpoints,
        restrict_private: bool,
    ) -> DestinationPolicy:
        """Compile once per config revision. Entries as ``parse_destination`` reads
        them (``RuntimeConfig`` has validated them; a bad one raises ValueError)."""
        return cls(endpoints, restrict_private, _Rules.build(allow), _Rules.build(deny))

    def check(self, host: str, ip: str, port: int) -> str | None:
        """None if the proxy may connect to ``ip:port`` (resolved from ``host``), else
        a short reason for the 403 body and the flow's error."""
        facts = classify(ip)
        if facts is None:
            return f"destination {ip!r} is not an IP address"
        addr, kind = facts
        ep = self.endpoints
        name = ""
        if ep.names or self.allow.has_globs or self.deny.has_globs:
            name = host.lower().removesuffix(".")
            if name.startswith("["):
                name = name[1:-1]
        if (
            (addr, port) in ep.exact
            or (port in ep.local_ports and kind in _LOCAL_KINDS)
            or (port in ep.any_ports and is_local_address(addr))
            or (name, port) in ep.names
        ):
            return f"destination {_where(host, addr, port)} is a proxyfleet endpoint"
        entry = self.deny.match(name, addr, port)
        if entry is not None:
            return (
                f"destination {_where(host, addr, port)} is refused by destination_deny {entry!r}"
            )
        if kind is None or not self.restrict_private:
            return None
        if self.allow.match(name, addr, port) is not None:
            return None
        return (
            f"destination {_where(host, addr, port)} is a {kind} address (refused on a "
            "non-loopback listener; destination_allow can permit it)"
        )

    def check_unresolved(self, host: str, port: int) -> str | None:
        """The check for ``upstream:`` mode, where the upstream proxy resolves names: an
        IP literal (any spelling) gets the full check, ``localhost`` names count as
        127.0.0.1, and other names meet the name rules (protected endpoint names and
        ``destination_deny`` globs). The private-range default cannot apply to a name
        we do not resolve: that is the upstream proxy's policy."""
        name = host.lower().removesuffix(".")
        if name.startswith("["):
            name = name[1:-1]
        try:
            infos = socket.getaddrinfo(
                name, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
            )
        except (socket.gaierror, UnicodeError):
            infos = []
        if infos:
            return self.choose(host, _addresses(infos), port)[1]  # type: ignore[arg-type]
        if name == "localhost" or name.endswith(".localhost"):
            return self.check(host, "127.0.0.1", port)
        if (name, port) in self.endpoints.names:
            return f"destination {host}:{port} is a proxyfleet endpoint"
        entry = self.deny.match_name(name, port)
        if entry is not None:
            return f"destination {host}:{port} is refused by destination_deny {entry!r}"
        return None

    def choose(self, host: str, ips: Iterable[str], port: int) -> tuple[str | None, str | None]:
        """The first allowed address of ``ips`` and None, or None and the first
        refusal (or a "resolved to no address" reason if ``ips`` is empty)."""
        first: str | None = None
        for ip in ips:
            reason = self.check(host, ip, port)
            if reason is None:
                return ip, None
            if first is None:
                first = reason
        return None, first or f"{host} resolved to no address"


def _addresses(infos: list[tuple[object, ...]]) -> list[str]:
    seen: dict[str, None] = {}
    for info in infos:
        sockaddr = info[4]
        assert isinstance(sockaddr, tuple)
        ip = str(sockaddr[0])
        if len(sockaddr) == 4 and sockaddr[3]:  # IPv6 scope: connect needs it back
            ip = f"{ip}%{sockaddr[3]}"
        seen.setdefault(ip, None)
    return list(seen)


async def resolve(loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[str]:
    """The addresses a connect to ``host:port`` would use, in the resolver's order.

    IP literals in any form the OS accepts (``[::1]``, ``127.1``, ``2130706433``)
    are read with a numeric ``getaddrinfo`` in the loop thread (no DNS; about two
    microseconds); other names go to ``loop.getaddrinfo``. Raises
    ``socket.gaierror`` when the name does not resolve.
    """
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return _addresses(infos)  # type: ignore[arg-type]


async def pick(
    policy: DestinationPolicy, loop: asyncio.AbstractEventLoop, host: str, port: int
) -> tuple[str | None, str | None]:
    """Resolve ``host`` and return (address to connect to, None), or (None, refusal).
    ``socket.gaierror`` propagates (a 502 "cannot resolve", not a 403)."""
    return policy.choose(host, await resolve(loop, host, port), port)


__all__ = [
    "DestinationPolicy",
    "ProtectedEndpoints",
    "classify",
    "endpoints_from_settings",
    "fleet_endpoints",
    "is_local_address",
    "pick",
    "resolve",
    "restricts_private",
]
