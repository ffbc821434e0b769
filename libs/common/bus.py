"""The thin layer every service uses to talk over NATS.

It owns the connection policy (retry the first connect for a bounded time, then
reconnect forever), creates the streams and KV buckets with the retention the
design asks for, and offers the few messaging shapes we use: JetStream publish
with a ``Nats-Msg-Id``, request/reply, and scatter-gather to every replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from libs.common import subjects

log = logging.getLogger("proxyfleet.bus")

FLOWS_MAX_AGE = 24 * 3600.0
FLOWS_MAX_BYTES = 4 << 30
EVENTS_MAX_AGE = 7 * 24 * 3600.0
DUPLICATE_WINDOW = 120.0


class BusUnavailable(Exception):
    """NATS could not be reached within the start-up deadline."""


class Bus:
    """A connected NATS client plus its JetStream context."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str,
        timeout: float = 15.0,
        on_state: Callable[[bool], Awaitable[None] | None] | None = None,
    ) -> Bus:
        """Connect, retrying for up to ``timeout`` seconds; then reconnect forever.

        ``on_state(connected)`` is called on every disconnect/reconnect so that a
        service can report (not block on) the bus state.
        """

        async def _notify(up: bool) -> None:
            if on_state is not None:
                res = on_state(up)
                if res is not None:
                    await res

        async def disconnected() -> None:
            if nc_ref and (nc_ref[0].is_closed or nc_ref[0].is_draining):
                return  # our own close(), not an outage
            log.warning("nats disconnected")
            await _notify(False)

        async def reconnected() -> None:
            log.info("nats reconnected to %s", nc.connected_url.netloc if nc.connected_url else "?")
            await _notify(True)

        async def error(exc: Exception) -> None:
            log.debug("nats error: %r", exc)

        nc_ref: list[NATS] = []
        servers = [s.strip() for s in url.split(",") if s.strip()]
        # With max_reconnect_attempts=-1 nats-py keeps retrying the first connect
        # itself, so the start-up deadline is enforced around the whole call.
        try:
            nc = await asyncio.wait_for(
                nats.connect(
                    servers,
                    name=name,
                    connect_timeout=max(1, min(5, int(timeout))),
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    allow_reconnect=True,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    error_cb=error,
                ),
                timeout,
            )
        except Exception as exc:  # TimeoutError, OSError, NoServersError, auth errors...
            reason = "no answer" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            raise BusUnavailable(
                f"NATS unreachable at {url} after {timeout:g}s: {reason}"
            ) from None
        nc_ref.append(nc)
        log.info("nats connected to %s", url)
        return cls(nc)

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    @property
    def max_payload(self) -> int:
        """Largest message the server accepts (from its INFO)."""
        return int(self.nc.max_payload)

    async def ensure_streams(self) -> None:
        """Create (or update to the expected shape) the FLOWS and EVENTS streams."""
        await self._ensure_stream(
            StreamConfig(
                name=subjects.FLOWS_STREAM,
                subjects=[subjects.FLOWS_SUBJECTS],
                max_age=FLOWS_MAX_AGE,
                max_bytes=FLOWS_MAX_BYTES,
                duplicate_window=DUPLICATE_WINDOW,
            )
        )
        await self._ensure_stream(
            StreamConfig(
                name=subjects.EVENTS_STREAM,
                subjects=[subjects.EVENTS_SUBJECTS],
                max_age=EVENTS_MAX_AGE,
                duplicate_window=DUPLICATE_WINDOW,
            )
        )

    async def _ensure_stream(self, config: StreamConfig) -> None:
        assert config.name is not None
        try:
            await self.js.stream_info(config.name)
        except NotFoundError:
            try:
                await self.js.add_stream(config)
                log.info("created stream %s", config.name)
            except Exception as exc:  # another replica created it first
                if "already in use" not in str(exc):
                    raise
            return
        await self.js.update_stream(config)

    async def config_kv(self) -> KeyValue:
        """The runtime-config bucket (history kept for audit and rollback)."""
        return await self._ensure_kv(
            KeyValueConfig(bucket=subjects.CONFIG_BUCKET, history=subjects.CONFIG_HISTORY)
        )

    async def replicas_kv(self, ttl: float) -> KeyValue:
        """The replica registry: an entry disappears ``ttl`` seconds after its last heartbeat."""
        return await self._ensure_kv(
            KeyValueConfig(bucket=subjects.REPLICAS_BUCKET, history=1, ttl=ttl)
        )

    async def _ensure_kv(self, config: KeyValueConfig) -> KeyValue:
        try:
            return await self.js.key_value(config.bucket)
        except BucketNotFoundError:
            try:
                return await self.js.create_key_value(config)
            except Exception:
                return await self.js.key_value(config.bucket)

    async def js_publish(
        self,
        subject: str,
        payload: bytes,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> Any:
        """Publish into a stream and wait for its ack; ``msg_id`` makes retries idempotent."""
        hdrs = dict(headers or {})
        if msg_id is not None:
            hdrs["Nats-Msg-Id"] = msg_id
        return await self.js.publish(subject, payload, timeout=timeout, headers=hdrs or None)

    async def request(self, subject: str, payload: bytes, timeout: float = 2.0) -> Msg:
        """One request, one reply (raises ``nats.errors.TimeoutError`` / ``NoRespondersError``)."""
        return await self.nc.request(subject, payload, timeout=timeout)

    async def scatter_gather(
        self, subject: str, payload: bytes, timeout: float = 1.0, expected: int | None = None
    ) -> list[Msg]:
        """Send one request to every subscriber and collect replies until ``timeout``.

        Returns early once ``expected`` replies have arrived (the caller knows the
        replica count from the registry); replies arriving late are ignored.
        """
        inbox = self.nc.new_inbox()
        replies: list[Msg] = []
        enough = asyncio.Event()

        async def on_reply(msg: Msg) -> None:
            replies.append(msg)
            if expected is not None and len(replies) >= expected:
                enough.set()

        sub = await self.nc.subscribe(inbox, cb=on_reply)
        try:
            await self.nc.publish(subject, payload, reply=inbox)
            await self.nc.flush()
            try:
                await asyncio.wait_for(enough.wait(), timeout)
            except TimeoutError:
                pass
        finally:
            await sub.unsubscribe()
        return replies

    async def close(self) -> None:
        """Flush what is pending and close (drain) the connection."""
        if self.nc.is_closed:
            return
        try:
            await asyncio.wait_for(self.nc.drain(), 5.0)
        except Exception:
            await self.nc.close()
