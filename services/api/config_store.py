"""The runtime config document in KV ``fleet_config``/``proxy`` (a revisioned document,
``services.api.documents``), and the CA certificate the proxies publish next to it."""

from __future__ import annotations

from nats.js.errors import KeyNotFoundError

from libs.common import subjects
from libs.common.bus import Bus
from libs.common.models import RuntimeConfig
from services.api.documents import CONFIG, DocumentStore


class ConfigStore(DocumentStore[RuntimeConfig]):
    """Reads and compare-and-set writes of the config document; the CA certificate."""

    def __init__(self, bus: Bus) -> None:
        super().__init__(bus, CONFIG)

    async def ca_certificate(self) -> bytes | None:
        """The CA certificate PEM a proxy published, or None."""
        kv = await self.kv()
        try:
            entry = await kv.get(subjects.CA_CERT_KEY)
        except KeyNotFoundError:
            return None
        return entry.value or None
