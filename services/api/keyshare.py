"""Publish the API keys' SHA-256 digests so the proxies can mask them in recorded traffic.

An admin key that passes through a proxy (a client calling the API through it)
would otherwise be stored and streamed to anyone with a read key. Each API
replica puts the digests of its keys into KV ``fleet_keys`` at start-up (key:
the hex digest; value: the key's id and scope, never the key); every proxy
replica watches the bucket and masks a matching ``X-API-Key`` or Bearer token.
Digests of random 32-byte keys give nothing away; entries are left in place
when a key is retired, so a retired key is still masked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import orjson

from libs.common.bus import Bus
from libs.common.settings import ApiKeySpec

log = logging.getLogger("proxyfleet.api.keys")

PUBLISH_TIMEOUT = 5.0


async def publish_key_digests(bus: Bus, keys: Iterable[ApiKeySpec]) -> int:
    """Put one entry per key in ``fleet_keys`` (skipping ones already there); returns how
    many were written. Bounded and never raising: masking must not stop the API."""
    written = 0
    try:
        async with asyncio.timeout(PUBLISH_TIMEOUT):
            kv = await bus.keys_kv()
            for spec in keys:
                name = spec.sha256.hex()
                value = orjson.dumps({"id": spec.id, "scope": spec.scope})
                try:
                    current = (await kv.get(name)).value
                except Exception:  # KeyNotFoundError, KeyDeletedError
                    current = None
                if current != value:
                    await kv.put(name, value)
                    written += 1
    except Exception as exc:
        log.warning("could not publish the API key digests for masking: %r", exc)
    return written
