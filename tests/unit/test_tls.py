"""The proxy's CA and TLS contexts, with real keys, files, processes and handshakes."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import ssl
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.proxy.tls import CertificateAuthority, upstream_context

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "data")


def fingerprint(path: Path) -> str:
    return x509.load_pem_x509_certificate(path.read_bytes()).fingerprint(hashes.SHA256()).hex()


def san_of(cert: x509.Certificate) -> list[object]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [name.value for name in ext]


def memory_handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str | None
) -> ssl.SSLObject:
    """Run a TLS handshake between two in-memory endpoints; return the client's side."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {client: False, server: False}
    for _ in range(10):
        for obj in (client, server):
            if not done[obj]:
                try:
                    obj.do_handshake()
                    done[obj] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return client
    raise AssertionError("handshake did not finish")


def peer_cert(obj: ssl.SSLObject) -> x509.Certificate:
    der = obj.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


# --- the CA on disk ---------------------------------------------------------------------


def test_first_start_creates_ca_and_second_loads_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ca = CertificateAuthority.load_or_create(data)
    assert ca.cert_path == data / "ca.pem" and ca.key_path == data / "ca-key.pem"
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(ca.key_path).st_mode) == 0o600
    assert sorted(p.name for p in data.iterdir()) == ["ca-key.pem", "ca.lock", "ca.pem"]

    cert = ca.cert
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "proxyfleet CA"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "proxyfleet"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= 3650

    before = ca.cert_path.read_bytes(), ca.key_path.read_bytes()
    again = CertificateAuthority.load_or_create(data)
    assert (again.cert_path.read_bytes(), again.key_path.read_bytes()) == before
    assert again.cert.fingerprint(hashes.SHA256()) == cert.fingerprint(hashes.SHA256())


def test_wide_key_permissions_are_narrowed(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path)
    os.chmod(ca.key_path, 0o644)
    CertificateAuthority.load_or_create(tmp_path)
    assert stat.S_IMODE(os.stat(ca.key_path).st_mode) == 0o600


def test_key_that_does_not_match_cert_is_refused(tmp_path: Path) -> None:
    a = CertificateAuthority.load_or_create(tmp_path / "a")
    b = CertificateAuthority.load_or_create(tmp_path / "b")
    shutil.copyfile(b.key_path, a.key_path)
    with pytest.raises(ValueError, match="does not match"):
        CertificateAuthority.load_or_create(tmp_path / "a")


def test_cert_without_key_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path)
    ca.key_path.unlink()
    with pytest.raises(ValueError, match="missing"):
        CertificateAuthority.load_or_create(tmp_path)


RACER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from services.proxy.tls import CertificateAuthority
    from cryptography.hazmat.primitives import hashes
    print("ready", flush=True)
    sys.stdin.readline()  # the start signal, sent to all racers at once
    ca = CertificateAuthority.load_or_create(Path(sys.argv[1]))
    print(ca.cert.fingerprint(hashes.SHA256()).hex(), flush=True)
    """
)


def test_replicas_starting_together_create_one_ca(tmp_path: Path) -> None:
    data = tmp_path / "shared"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(data)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        for _ in range(6)
    ]
    for p in procs:  # barrier: every racer has imported everything and waits
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    prints = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert prints == {fingerprint(data / "ca.pem")}
    assert sorted(p.name for p in data.iterdir()) == ["ca-key.pem", "ca.lock", "ca.pem"]


# --- leaf certificates -----------------------------------------------------------------


def trusting(ca: CertificateAuthority) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca.cert_path)


def test_leaf_certificate_fields(ca: CertificateAuthority) -> None:
    client = memory_handshake(ca.server_context("Example.TEST"), trusting(ca), "example.test")
    leaf = peer_cert(client)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "example.test"
    assert san_of(leaf) == ["example.test"]
    assert leaf.issuer == ca.cert.subject
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert leaf.not_valid_after_utc <= ca.cert.not_valid_after_utc
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 367
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    assert client.selected_alpn_protocol() is None  # the client offered no ALPN
    assert client.version() in ("TLSv1.2", "TLSv1.3")


def test_one_leaf_key_and_fresh_serials(ca: CertificateAuthority) -> None:
    certs = [
        peer_cert(memory_handshake(ca.server_context(h), trusting(ca), h))
        for h in ("a.test", "b.test")
    ]
    assert certs[0].public_key() == certs[1].public_key()
    assert certs[0].serial_number != certs[1].serial_number


def test_ipv6_and_long_hosts(ca: CertificateAuthority) -> None:
    loose = trusting(ca)
    loose.check_hostname = False
    v6 = peer_cert(memory_handshake(ca.server_context("[::1]"), loose, None))
    assert san_of(v6) == [ipaddress.ip_address("::1")]
    host = ".".join(["x" * 60] * 3) + ".test"
    long = peer_cert(memory_handshake(ca.server_context(host), trusting(ca), host))
    assert long.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == host[:64]
    assert san_of(long) == [host]


def test_contexts_are_cached_per_lowercased_host(ca: CertificateAuthority) -> None:
    ctx = ca.server_context("a.test")
    assert ca.server_context("a.test") is ctx
    assert ca.server_context("A.Test") is ctx
    assert ca.client_hello_context("a.test") is ctx
    assert ca.server_context("b.test") is not ctx


# --- real handshakes over TCP ----------------------------------------------------------


async def serve(ctx: ssl.SSLContext) -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(await reader.readline())
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=ctx)
    return server, server.sockets[0].getsockname()[1]


async def fetch_cert(
    port: int, ctx: ssl.SSLContext, server_hostname: str | None
) -> tuple[x509.Certificate, str | None]:
    """Connect, echo one line through the tunnel, return the server's cert and ALPN."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=server_hostname
    )
    try:
        writer.write(b"ping\n")
        assert await reader.readline() == b"ping\n"
        obj = writer.get_extra_info("ssl_object")
        return peer_cert(obj), obj.selected_alpn_protocol()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_sni_selects_the_certificate(ca: CertificateAuthority) -> None:
    server, port = await serve(ca.client_hello_context("localhost"))
    async with server:
        client = trusting(ca)
        client.set_alpn_protocols(["h2", "http/1.1"])
        cert, alpn = await fetch_cert(port, client, "example.test")
        assert san_of(cert) == ["example.test"]
        assert alpn == "http/1.1"
        cert, _ = await fetch_cert(port, trusting(ca), "other.test")
        assert san_of(cert) == ["other.test"]


async def test_no_sni_gets_the_connect_host(ca: CertificateAuthority) -> None:
    server, port = await serve(ca.client_hello_context("default.test"))
    async with server:
        loose = trusting(ca)
        loose.check_hostname = False  # chain still verified, against our CA
        cert, _ = await fetch_cert(port, loose, "")  # "" sends no SNI
        assert san_of(cert) == ["default.test"]


async def test_ip_host_is_verified_by_ip_san(ca: CertificateAuthority) -> None:
    # Clients send no SNI for an IP, so this is the CONNECT host's certificate, checked
    # by the client against its IPAddress SAN.
    server, port = await serve(ca.client_hello_context("127.0.0.1"))
    async with server:
        cert, _ = await fetch_cert(port, trusting(ca), "127.0.0.1")
        assert san_of(cert) == [ipaddress.ip_address("127.0.0.1")]


async def test_client_not_trusting_the_ca_fails(ca: CertificateAuthority) -> None:
    server, port = await serve(ca.client_hello_context("localhost"))
    async with server:
        with pytest.raises(ssl.SSLCertVerificationError):
            await fetch_cert(port, ssl.create_default_context(), "localhost")


# --- upstream contexts -----------------------------------------------------------------


def fixed_cert_server(ca: CertificateAuthority, host: str) -> ssl.SSLContext:
    """A plain upstream: presents ``host``'s certificate whatever SNI the client sends."""
    ctx = ca.server_context(host)
    ctx.sni_callback = None
    return ctx


async def test_upstream_verifies_with_the_bundle(ca: CertificateAuthority) -> None:
    server, port = await serve(fixed_cert_server(ca, "localhost"))
    async with server:
        ctx = upstream_context(verify=True, ca_bundle=ca.cert_path)
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
        cert, alpn = await fetch_cert(port, ctx, "localhost")
        assert san_of(cert) == ["localhost"] and alpn == "http/1.1"
        with pytest.raises(ssl.SSLCertVerificationError):
            await fetch_cert(port, upstream_context(verify=True), "localhost")
        with pytest.raises(ssl.SSLCertVerificationError):  # right CA, wrong name
            await fetch_cert(port, ctx, "elsewhere.test")


async def test_upstream_without_verify_accepts_anything(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    stranger = CertificateAuthority.load_or_create(tmp_path / "stranger")
    server, port = await serve(fixed_cert_server(stranger, "localhost"))
    async with server:
        cert, alpn = await fetch_cert(port, upstream_context(verify=False), "wrong.test")
        assert san_of(cert) == ["localhost"] and alpn == "http/1.1"
