"""The proxy's certificate authority and the TLS contexts built from it.

To read a CONNECT tunnel the proxy ends the client's TLS itself, with a certificate for
the requested host signed by its own CA (which clients must trust), and opens a second
TLS connection upstream. The CA lives in ``data_dir`` and is shared by every replica
there, so a client that trusts it once trusts the whole fleet.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import logging
import os
import secrets
import shutil
import ssl
import tempfile
import weakref
from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

ALPN = ["http/1.1"]  # the proxy speaks HTTP/1.1 only, on both sides
CACHE_SIZE = 1024
CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=365)  # under the 398 days browsers accept
BACKDATE = datetime.timedelta(days=2)  # tolerate clients whose clock is behind
RENEW_BEFORE = datetime.timedelta(days=1)  # re-mint a cached leaf this close to expiry

_PEM = serialization.Encoding.PEM
_PKCS8 = serialization.PrivateFormat.PKCS8
_NO_PASSWORD = serialization.NoEncryption()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` so that readers see the old file or the whole new one, never a part.

    The temporary file is created with ``mode`` (a key is never readable by others, not
    even for a moment) and in the same directory, so ``os.replace`` is an atomic rename.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(_PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class CertificateAuthority:
    """The CA in ``data_dir`` plus a cache of per-host server contexts signed by it."""

    def __init__(
        self,
        cert_path: Path,
        key_path: Path,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    ) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.cert = cert
        self._key = key
        self._ca_pem = cert.public_bytes(_PEM)
        # One leaf key for every host (as mitmproxy does): minting is then one signature.
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(_PEM, _PKCS8, _NO_PASSWORD)
        try:
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
        self._contexts: OrderedDict[str, tuple[ssl.SSLContext, datetime.datetime]] = OrderedDict()
        # ssl loads certificates from files only: they pass through this private directory.
        self._tmpdir = Path(tempfile.mkdtemp(prefix="proxyfleet-tls-"))  # mode 0700
        weakref.finalize(self, shutil.rmtree, self._tmpdir, True)

    @classmethod
    def load_or_create(cls, data_dir: Path) -> CertificateAuthority:
        """Load the CA from ``data_dir``, creating it on first start.

        Replicas sharing ``data_dir`` may start together; an exclusive lock on ``ca.lock``
        makes exactly one of them create the CA and the others load that one. Blocks.
        """
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert_path, key_path = data_dir / "ca.pem", data_dir / "ca-key.pem"
        lock_fd = os.open(data_dir / "ca.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            # The certificate is written last, so it marks a complete CA: a key without
            # it is what a crash mid-creation leaves behind, and is replaced.
            if not cert_path.exists():
                key = ec.generate_private_key(ec.SECP256R1())
                cert = _make_ca_cert(key)
                _write_atomic(key_path, key.private_bytes(_PEM, _PKCS8, _NO_PASSWORD), 0o600)
                _write_atomic(cert_path, cert.public_bytes(_PEM), 0o644)
                return cls(cert_path, key_path, cert, key)
            if not key_path.exists():
                raise ValueError(f"{cert_path} exists but its key {key_path} is missing")
            if os.stat(key_path).st_mode & 0o777 & ~0o600:
                log.warning("%s was readable by others: set its mode to 0600", key_path)
                os.chmod(key_path, 0o600)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        finally:
            os.close(lock_fd)  # releases the lock
        if not isinstance(loaded, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError(f"{key_path}: CA key must be EC or RSA")
        if _spki(cert.public_key()) != _spki(loaded.public_key()):
            raise ValueError(f"{key_path} does not match the certificate {cert_path}")
        if cert.not_valid_after_utc <= _now():
            raise ValueError(
                f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}: delete it and "
                f"{key_path.name} to create a new CA (clients must then trust the new one)"
            )
        return cls(cert_path, key_path, cert, loaded)

    def server_context(self, host: str) -> ssl.SSLContext:
        """A server context presenting a certificate for ``host``, cached per host (LRU).

        It follows SNI like ``client_hello_context``: a client naming another host gets
        that host's certificate, as a client of the real server would.
        """
        host = host.strip("[]").lower()
        if not host.isascii():
            host = host.encode("idna").decode("ascii")  # certificates hold A-labels only
        hit = self._contexts.get(host)
        if hit is not None and _now() < hit[1]:
            self._contexts.move_to_end(host)
            return hit[0]
        leaf = self._mint(host)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(ALPN)
        fd, name = tempfile.mkstemp(dir=self._tmpdir, suffix=".pem")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(leaf.public_bytes(_PEM) + self._ca_pem + self._leaf_key_pem)
            ctx.load_cert_chain(name)
        finally:
            os.unlink(name)
        # Every context carries the callback, so any of them can be the first one used.
        ctx.sni_callback = self._on_sni
        # Re-mint near expiry, unless the CA's own expiry caps the leaf (a new one would too).
        renew_at = leaf.not_valid_after_utc - RENEW_BEFORE
        if leaf.not_valid_after_utc >= self.cert.not_valid_after_utc:
            renew_at = self.cert.not_valid_after_utc
        self._contexts[host] = (ctx, renew_at)
        self._contexts.move_to_end(host)
        while len(self._contexts) > CACHE_SIZE:
            self._contexts.popitem(last=False)
        return ctx

    def client_hello_context(self, default_host: str) -> ssl.SSLContext:
        """The context to accept a client's TLS with, after it sent CONNECT default_host.

        A client sending SNI gets a certificate for that name (it may differ from the
        CONNECT host); one sending none gets ``default_host``'s certificate.
        """
        return self.server_context(default_host)

    def _on_sni(
        self, ssl_object: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext
    ) -> int | None:
        if server_name is None:
            return None
        # kept on the connection: the relay connects upstream with the client's SNI
        ssl_object.proxyfleet_sni = server_name  # type: ignore[attr-defined]
        try:
            ssl_object.context = self.server_context(server_name)
        except Exception:  # a name we cannot put in a certificate: end this handshake only
            log.warning("cannot mint a certificate for SNI %r", server_name, exc_info=True)
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        return None

    def _mint(self, host: str) -> x509.Certificate:
        """A fresh leaf certificate for ``host`` (a DNS name or an IP address)."""
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        now = _now()
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self.cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + LEAF_VALIDITY, self.cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(self._aki, critical=False)
            .sign(self._key, hashes.SHA256())
        )


def _make_ca_cert(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "proxyfleet CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "proxyfleet"),
        ]
    )
    now = _now()
    key_usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )


def upstream_context(verify: bool, ca_bundle: Path | None = None) -> ssl.SSLContext:
    """A client context for upstream servers: system trust store plus ``ca_bundle``.

    ``verify=False`` accepts any certificate (for test upstreams with self-signed ones).
    """
    ctx = ssl.create_default_context()
    if ca_bundle is not None:
        ctx.load_verify_locations(cafile=ca_bundle)
    if not verify:
        ctx.check_hostname = False  # must precede CERT_NONE
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(ALPN)
    return ctx
