"""``ignore_hosts`` and ``intercept_tls``: CONNECTs relayed as blind tunnels.

A ``CONNECT`` whose target matches one of the ``ignore_hosts`` globs (``host`` or
``host:port``), or any ``CONNECT`` when ``intercept_tls`` is off, is tunnelled
untouched instead of intercepted. The globs are compiled into one regex per
config revision (``ProxyConfig.ignore_re``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.proxy.config import ProxyConfig
from services.proxy.hooks import Addon

if TYPE_CHECKING:
    from services.proxy.exchange import Exchange


class IgnoreHosts(Addon):
    name = "ignore_hosts"

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config

    @classmethod
    def configure(cls, config: ProxyConfig) -> IgnoreHosts | None:
        """The addon for ``config``, or None when every CONNECT is intercepted."""
        if config.doc.intercept_tls and config.ignore_re is None:
            return None
        return cls(config)

    def request_head(self, ex: Exchange) -> None:
        flow = ex.flow
        if flow.method == b"CONNECT" and self.config.tunnel_untouched(flow.host, flow.port):
            ex.tunnel = True
