"""The destination policy (issue 7, item 9): checked after resolution, fleet endpoints
always refused, private ranges refused on a non-loopback listener, allow/deny lists.

Real ``getaddrinfo`` throughout: literals and ``localhost`` need no network.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from libs.common.models import RuntimeConfig, parse_destination
from libs.common.settings import ProxySettings, SettingsError, load
from services.proxy.destinations import (
    DestinationPolicy,
    ProtectedEndpoints,
    classify,
    fleet_endpoints,
    is_local_address,
    pick,
    resolve,
    restricts_private,
)

NATS = ProtectedEndpoints.resolve([("127.0.0.1", 4222)])


def policy(
    allow: list[str] | None = None,
    deny: list[str] | None = None,
    endpoints: ProtectedEndpoints = NATS,
    restrict_private: bool = True,
) -> DestinationPolicy:
    return DestinationPolicy.build(allow or [], deny or [], endpoints, restrict_private)


async def verdicts(p: DestinationPolicy, host: str, port: int) -> list[str | None]:
    ips = await resolve(asyncio.get_running_loop(), host, port)
    assert ips, host
    return [p.check(host, ip, port) for ip in ips]


# --- hostile spellings of this host ---------------------------------------------------

LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0177.0.0.1",
    "017700000001",
    "[::ffff:127.0.0.1]",
    "::ffff:127.0.0.1",
    "[::ffff:7f00:1]",
    "::1",
    "[::1]",
    "0.0.0.0",
    "0",
    "[::]",
    "localhost",
    "LOCALHOST",
]


def _numeric_ok(host: str) -> bool:
    try:
        socket.getaddrinfo(host.strip("[]"), 80, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        return False
    return True


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
async def test_every_spelling_of_a_fleet_endpoint_is_refused(host: str) -> None:
    if host[0].isdigit() and not _numeric_ok(host):
        pytest.skip(f"this libc's getaddrinfo does not read {host!r} (nothing to connect to)")
    # even on a loopback listener (private ranges allowed), the endpoint is refused
    for reason in await verdicts(policy(restrict_private=False), host, 4222):
        assert reason is not None and "proxyfleet endpoint" in reason, (host, reason)


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
async def test_every_spelling_of_loopback_is_private_on_a_public_listener(host: str) -> None:
    if host[0].isdigit() and not _numeric_ok(host):
        pytest.skip(f"this libc's getaddrinfo does not read {host!r}")
    for reason in await verdicts(policy(), host, 80):
        assert reason is not None and "address (refused on a non-loopback" in reason


async def test_localhost_with_a_trailing_dot_never_reaches_loopback() -> None:
    p = policy()
    try:
        reasons = await verdicts(p, "localhost.", 4222)
    except socket.gaierror:
        return  # this resolver does not know the FQDN form: nothing to connect to
    assert all(r is not None and "proxyfleet endpoint" in r for r in reasons)


def test_ipv4_mapped_ipv6_is_normalised_to_ipv4() -> None:
    assert classify("::ffff:127.0.0.1") == (ipaddress.ip_address("127.0.0.1"), "loopback")
    assert classify("[::ffff:10.1.2.3]") == (ipaddress.ip_address("10.1.2.3"), "private")
    assert classify("fe80::1%1") == (ipaddress.ip_address("fe80::1"), "link-local")
    assert classify("not-an-ip") is None


def test_reason_names_the_destination_and_the_cause() -> None:
    p = policy()
    assert p.check("127.0.0.1", "127.0.0.1", 4222) == (
        "destination 127.0.0.1:4222 is a proxyfleet endpoint"
    )
    assert p.check("localhost", "127.0.0.1", 4222) == (
        "destination localhost:4222 (127.0.0.1) is a proxyfleet endpoint"
    )
    assert p.check("[::1]", "::1", 80) == (
        "destination [::1]:80 is a loopback address (refused on a non-loopback listener; "
        "destination_allow can permit it)"
    )
    assert p.check("h", "bogus", 80) == "destination 'bogus' is not an IP address"


# --- the private-range default ------------------------------------------------------

NON_PUBLIC = {
    "169.254.169.254": "link-local",
    "10.0.0.1": "private",
    "10.255.255.255": "private",
    "172.16.0.1": "private",
    "172.31.255.254": "private",
    "192.168.1.1": "private",
    "100.64.0.1": "shared (CGNAT)",
    "100.127.255.254": "shared (CGNAT)",
    "127.42.0.1": "loopback",
    "0.0.0.0": "unspecified",
    "0.1.2.3": "this-network",
    "224.0.0.1": "multicast",
    "255.255.255.255": "reserved",
    "198.18.0.1": "benchmarking",
    "::": "unspecified",
    "::1": "loopback",
    "fc00::1": "private",
    "fd12:3456::1": "private",
    "fe80::1": "link-local",
    "febf::1": "link-local",
    "ff02::1": "multicast",
    "::127.0.0.1": "reserved",  # IPv4-compatible (deprecated)
    "64:ff9b::a00:1": "private (via NAT64)",  # NAT64 of 10.0.0.1
    "64:ff9b::7f00:1": "loopback (via NAT64)",
    "2002:a9fe:a9fe::1": "link-local (via 6to4)",  # 6to4 of 169.254.169.254
    "2001:db8::1": "documentation",
}
PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "172.32.0.1",
    "172.15.255.255",
    "100.128.0.1",
    "100.63.255.255",
    "11.0.0.1",
    "192.169.0.1",
    "169.255.0.1",
    "2606:4700:4700::1111",
    "2001:4860:4860::8888",
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8: how IPv6-only networks reach IPv4 sites
    "2002:808:808::1",
    "2a00:1450::1",
]


@pytest.mark.parametrize(("ip", "kind"), sorted(NON_PUBLIC.items()))
def test_non_public_addresses_are_refused_on_a_public_listener(ip: str, kind: str) -> None:
    reason = policy().check("x.example", ip, 80)
    assert reason is not None and f"is a {kind} address" in reason, reason
    assert policy(restrict_private=False).check("x.example", ip, 80) is None


@pytest.mark.parametrize("ip", PUBLIC)
def test_public_addresses_are_allowed(ip: str) -> None:
    assert policy().check("x.example", ip, 80) is None


def test_restricts_private_follows_the_listener() -> None:
    assert restricts_private("127.0.0.1:8080") is False
    assert restricts_private("127.0.0.5:8080") is False
    assert restricts_private("[::1]:8080") is False
    assert restricts_private("localhost:8080") is False
    assert restricts_private("0.0.0.0:8080") is True
    assert restricts_private("[::]:8080") is True
    assert restricts_private("10.1.2.3:8080") is True
    assert restricts_private("no-such-host.invalid:8080") is True  # fail closed


# --- protected endpoints -------------------------------------------------------------


def _a_local_non_loopback_address() -> str | None:
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                ip = str(s.getsockname()[0])
        except OSError:
            continue
        facts = classify(ip)
        if facts is not None and facts[1] not in ("loopback", "unspecified"):
            return ip
    return None


def test_an_unspecified_bind_protects_every_local_address_on_that_port() -> None:
    ep = ProtectedEndpoints.resolve([("0.0.0.0", 8080), ("::", 9101)])
    p = policy(endpoints=ep, restrict_private=False)
    for ip in ("127.0.0.1", "127.3.4.5", "0.0.0.0", "::1", "::", "::ffff:127.0.0.1"):
        for port in (8080, 9101):
            assert p.check(ip, ip, port) is not None, (ip, port)
    assert p.check("h", "127.0.0.1", 8081) is None
    assert p.check("h", "8.8.8.8", 8080) is None  # another machine's 8080
    local = _a_local_non_loopback_address()
    if local is not None:
        assert is_local_address(ipaddress.ip_address(local))
        assert p.check(local, local, 8080) == (
            f"destination {local if ':' not in local else f'[{local}]'}:8080 "
            "is a proxyfleet endpoint"
        )


def test_an_empty_bind_host_means_every_address() -> None:
    ep = ProtectedEndpoints.resolve([("", 8080)])
    assert 8080 in ep.any_ports and 8080 in ep.local_ports


def test_a_loopback_endpoint_covers_the_whole_loopback_range_on_its_port() -> None:
    p = policy(restrict_private=False)
    assert p.check("h", "127.0.0.2", 4222) is not None
    assert p.check("h", "::1", 4222) is not None
    assert p.check("h", "0.0.0.0", 4222) is not None
    assert p.check("h", "127.0.0.1", 4223) is None
    assert p.check("h", "10.0.0.1", 4222) is None  # not ours: NATS is bound to loopback


def test_an_endpoint_name_that_did_not_resolve_is_still_refused_by_name() -> None:
    ep = ProtectedEndpoints.resolve([("nats.invalid", 4222), ("127.0.0.1", 0)])
    assert ep.unresolved == ("nats.invalid:4222",)
    p = policy(endpoints=ep, restrict_private=False)
    assert p.check("NATS.invalid.", "203.0.113.9", 4222) is not None
    assert p.check("nats.invalid", "203.0.113.9", 4223) is None
    assert not ep.exact  # port 0 (ephemeral) skipped


def test_a_named_endpoint_is_resolved_at_build_time() -> None:
    ep = ProtectedEndpoints.resolve([("localhost", 8081)])
    p = policy(endpoints=ep, restrict_private=False)
    assert p.check("other.example", "127.0.0.1", 8081) is not None
    assert ("localhost", 8081) in ep.names


def test_fleet_endpoints_from_settings() -> None:
    s = ProxySettings(
        nats_url="nats://user:p%40ss@nats.example:4223, tls://127.0.0.1,demo.example:4224,"
        "nats://[::1]",
        proxy_listen="0.0.0.0:8080",
        proxy_metrics_listen="127.0.0.1:9101",
        protected_endpoints="api:8081,127.0.0.1:9102",  # type: ignore[arg-type]
    )
    assert fleet_endpoints(s) == [
        ("nats.example", 4223),
        ("127.0.0.1", 4222),
        ("demo.example", 4224),
        ("::1", 4222),
        ("0.0.0.0", 8080),
        ("127.0.0.1", 9101),
        ("api", 8081),
        ("127.0.0.1", 9102),
    ]
    assert ProxySettings().protected_endpoints == ["127.0.0.1:8081"]
    assert ("127.0.0.1", 8081) in fleet_endpoints(ProxySettings())


# --- allow / deny and precedence -----------------------------------------------------


def test_allow_cannot_open_a_fleet_endpoint() -> None:
    p = policy(allow=["127.0.0.0/8", "0.0.0.0/0", "::/0", "*", "localhost"])
    assert p.check("localhost", "127.0.0.1", 4222) is not None
    assert p.check("localhost", "127.0.0.1", 3000) is None  # but it opens the rest


def test_deny_beats_allow() -> None:
    p = policy(allow=["10.0.0.0/8", "8.8.8.8"], deny=["10.9.0.0/16", "8.8.8.0/24"])
    assert p.check("h", "10.1.2.3", 80) is None
    reason = p.check("h", "10.9.1.1", 80)
    assert reason == "destination h:80 (10.9.1.1) is refused by destination_deny '10.9.0.0/16'"
    assert p.check("h", "8.8.8.8", 80) is not None  # deny refuses public addresses too


def test_port_qualified_entries() -> None:
    p = policy(allow=["10.0.0.5:8080", "[fd00::/8]:443"], deny=["[2606:4700::/32]:25"])
    assert p.check("h", "10.0.0.5", 8080) is None
    assert p.check("h", "10.0.0.5", 8081) is not None
    assert p.check("h", "fd00::7", 443) is None
    assert p.check("h", "fd00::7", 80) is not None
    assert p.check("h", "2606:4700::1", 25) is not None
    assert p.check("h", "2606:4700::1", 443) is None


def test_host_globs_match_the_requested_name() -> None:
    p = policy(allow=["*.corp.example", "db.lab:5432"], deny=["*.bad.example"])
    assert p.check("git.corp.example", "10.0.0.5", 443) is None
    assert p.check("GIT.Corp.Example.", "10.0.0.5", 443) is None
    assert p.check("corp.example.evil", "10.0.0.5", 443) is not None
    assert p.check("db.lab", "10.0.0.6", 5432) is None
    assert p.check("db.lab", "10.0.0.6", 22) is not None
    reason = p.check("x.bad.example", "93.184.216.34", 443)
    assert reason is not None and "'*.bad.example'" in reason


def test_a_mapped_allow_entry_means_its_ipv4_network() -> None:
    p = policy(allow=["::ffff:10.0.0.0/104"])
    assert p.check("h", "10.1.2.3", 80) is None
    assert p.check("h", "::ffff:10.1.2.3", 80) is None


def test_choose_returns_the_first_allowed_address() -> None:
    p = policy()
    assert p.choose("h", ["127.0.0.1", "8.8.8.8"], 80) == ("8.8.8.8", None)
    ip, reason = p.choose("h", ["10.0.0.1", "127.0.0.1"], 80)
    assert ip is None and reason is not None and "10.0.0.1" in reason
    assert p.choose("h", [], 80) == (None, "h resolved to no address")


async def test_pick_resolves_and_checks() -> None:
    loop = asyncio.get_running_loop()
    p = policy()
    assert await pick(p, loop, "8.8.8.8", 443) == ("8.8.8.8", None)
    assert await pick(p, loop, "[2606:4700:4700::1111]", 443) == ("2606:4700:4700::1111", None)
    ip, reason = await pick(p, loop, "2130706433", 4222)
    assert (
        ip is None and reason == "destination 2130706433:4222 (127.0.0.1) is a proxyfleet endpoint"
    )
    with pytest.raises(socket.gaierror):
        await pick(p, loop, "no-such-host.invalid", 80)


async def test_resolve_keeps_an_ipv6_scope_for_the_connect() -> None:
    names = dict(socket.if_nameindex())
    if not names:
        pytest.skip("no interfaces")
    index, name = next(iter(names.items()))
    ips = await resolve(asyncio.get_running_loop(), f"fe80::1%{name}", 80)
    assert ips == [f"fe80::1%{index}"]
    assert policy().check("h", ips[0], 80) is not None  # link-local


# --- validation of the lists ---------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("10.0.0.0/8", (ipaddress.ip_network("10.0.0.0/8"), None)),
        (" 10.1.2.3 ", (ipaddress.ip_network("10.1.2.3/32"), None)),
        ("::1", (ipaddress.ip_network("::1/128"), None)),
        ("[fc00::/7]:443", (ipaddress.ip_network("fc00::/7"), 443)),
        ("[::1]", (ipaddress.ip_network("::1/128"), None)),
        ("10.0.0.5:8080", (ipaddress.ip_network("10.0.0.5/32"), 8080)),
        ("::ffff:10.0.0.0/104", (ipaddress.ip_network("10.0.0.0/8"), None)),
        ("*.Internal.Example", ("*.internal.example", None)),
        ("db.corp.:5432", ("db.corp", 5432)),
        ("*", ("*", None)),
    ],
)
def test_parse_destination(entry: str, expected: object) -> None:
    assert parse_destination(entry) == expected


@pytest.mark.parametrize(
    "entry",
    [
        "",
        "127.1",
        "2130706433",
        "0x7f000001",
        "10.0.0.1/8",  # host bits set: a typo more likely than a wish
        "10.0.0.0/33",
        "[::1",
        "[::1]x",
        "[::1]:",
        "host:0",
        "host:65536",
        "host:http",
        "a b",
        "a/b",
        "fe80::1%eth0",
        "x" * 254,
    ],
)
def test_bad_entries_are_refused_naming_the_entry(entry: str) -> None:
    with pytest.raises(ValueError, match="invalid destination"):
        parse_destination(entry)
    with pytest.raises(ValidationError) as exc:
        RuntimeConfig(destination_deny=["10.0.0.0/8", entry])
    assert "invalid destination" in str(exc.value)


def test_runtime_config_fields_normalise() -> None:
    doc = RuntimeConfig(destination_allow=[" *.Corp.Example "], destination_deny=["10.0.0.0/8"])
    assert doc.destination_allow == ["*.corp.example"]
    assert RuntimeConfig().destination_allow == [] == RuntimeConfig().destination_deny


def test_settings_read_comma_separated_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_DESTINATION_ALLOW", "10.0.0.0/8, *.corp.example")
    monkeypatch.setenv("FLEET_DESTINATION_DENY", "[::1]:80")
    monkeypatch.setenv("FLEET_PROTECTED_ENDPOINTS", "api:8081,[::1]:9102")
    s = load(ProxySettings)
    assert s.destination_allow == ["10.0.0.0/8", "*.corp.example"]
    assert s.destination_deny == ["[::1]:80"]
    assert s.protected_endpoints == ["api:8081", "[::1]:9102"]
    monkeypatch.setenv("FLEET_DESTINATION_DENY", "127.1")
    with pytest.raises(SettingsError, match="FLEET_DESTINATION_DENY"):
        load(ProxySettings)
    monkeypatch.delenv("FLEET_DESTINATION_DENY")
    monkeypatch.setenv("FLEET_PROTECTED_ENDPOINTS", "api")
    with pytest.raises(SettingsError, match="FLEET_PROTECTED_ENDPOINTS"):
        load(ProxySettings)


# --- properties ----------------------------------------------------------------------

PROPERTY_POLICY = DestinationPolicy.build(
    ["10.1.0.0/16", "192.168.7.7:8080"],
    ["8.8.4.0/24", "10.1.2.0/24"],
    ProtectedEndpoints.resolve([("127.0.0.1", 4222), ("0.0.0.0", 9101)]),
    True,
)
ports = st.sampled_from([80, 443, 4222, 8080, 9101])


@given(st.integers(min_value=0, max_value=2**32 - 1), ports)
def test_mapped_ipv6_gets_the_ipv4_verdict(n: int, port: int) -> None:
    v4 = str(ipaddress.IPv4Address(n))
    mapped = f"::ffff:{v4}"
    assert PROPERTY_POLICY.check("h.example", mapped, port) == PROPERTY_POLICY.check(
        "h.example", v4, port
    )


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_embedded_ipv4_is_refused_iff_the_ipv4_is(n: int) -> None:
    # (allow and deny CIDRs name IPv4 networks: they do not reach into the IPv6 forms)
    facts = classify(str(ipaddress.IPv4Address(n)))
    assert facts is not None
    non_public = facts[1] is not None
    nat64 = str(ipaddress.IPv6Address((0x64FF9B << 96) | n))
    sixtofour = str(ipaddress.IPv6Address((0x2002 << 112) | (n << 80) | 1))
    assert (PROPERTY_POLICY.check("h", nat64, 80) is not None) == non_public
    assert (PROPERTY_POLICY.check("h", sixtofour, 80) is not None) == non_public


@given(st.integers(min_value=0, max_value=2**128 - 1), ports)
def test_check_never_raises_and_is_deterministic(n: int, port: int) -> None:
    ip = str(ipaddress.IPv6Address(n))
    first = PROPERTY_POLICY.check("h", ip, port)
    assert first == PROPERTY_POLICY.check("h", ip, port)
    assert first is None or first.startswith("destination ")


# -- upstream: mode (the upstream proxy resolves names) --------------------------------------
@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.1",
        "2130706433",
        "[::ffff:127.0.0.1]",
        "localhost",
        "localhost.",
        "a.localhost",
    ],
)
def test_unresolved_check_refuses_our_endpoints_in_every_spelling(host: str) -> None:
    reason = policy().check_unresolved(host, 4222)
    assert reason is not None and "proxyfleet endpoint" in reason


def test_unresolved_check_applies_protected_names_and_deny_globs() -> None:
    ep = ProtectedEndpoints.resolve([("nats.invalid", 4222)])
    p = DestinationPolicy.build([], ["*.blocked.example"], ep, restrict_private=True)
    assert "proxyfleet endpoint" in (p.check_unresolved("NATS.invalid.", 4222) or "")
    assert "destination_deny" in (p.check_unresolved("x.blocked.example", 443) or "")
    # a name we do not resolve: the private-range default is the upstream proxy's business
    assert p.check_unresolved("intranet.example", 80) is None
    # a private literal on a public listener is still refused
    assert "private" in (p.check_unresolved("10.1.2.3", 80) or "")
