"""The proxy's prepared runtime configuration.

Config documents are validated (``RuntimeConfig``) and then compiled once into a
``ProxyConfig``: host globs become one regex, the upstream TLS context is built.
The relay reads only these prepared attributes; swapping the object is how a new
revision takes effect without touching live connections.
"""

from __future__ import annotations

import fnmatch
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from libs.common.models import RuntimeConfig
from services.proxy.redact import DEFAULT as DEFAULT_REDACTION
from services.proxy.redact import Redaction
from services.proxy.tls import upstream_context


def compile_host_globs(patterns: list[str]) -> re.Pattern[str] | None:
    """One case-insensitive regex matching ``host`` or ``host:port`` against any glob."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns), re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """A compiled runtime-config revision."""

    doc: RuntimeConfig
    revision: int
    upstream_ssl: ssl.SSLContext
    ignore_re: re.Pattern[str] | None = field(default=None)
    redact: Redaction = field(default=DEFAULT_REDACTION)  # capture's header redaction

    @classmethod
    def build(cls, doc: RuntimeConfig, revision: int, ca_bundle: Path | None) -> ProxyConfig:
        return cls(
            doc=doc,
            revision=revision,
            upstream_ssl=upstream_context(doc.upstream_verify_tls, ca_bundle),
            ignore_re=compile_host_globs(doc.ignore_hosts),
            redact=Redaction.compile(doc.redact_headers),
        )

    def tunnel_untouched(self, host: str, port: int) -> bool:
        """True if CONNECT to ``host:port`` must be relayed without interception."""
        if not self.doc.intercept_tls:
            return True
        r = self.ignore_re
        return r is not None and (
            r.match(host) is not None or r.match(f"{host}:{port}") is not None
        )
