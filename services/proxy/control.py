"""The replica's control plane over NATS: commands, heartbeats, config watch.

Nothing here is on the data path: commands arrive as request/reply messages,
the heartbeat is a KV put every few seconds, and a new config revision is
compiled off to the side and swapped in with one assignment.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from nats.aio.msg import Msg
from pydantic import ValidationError

from libs.common import events, subjects
from libs.common.approvals import DECIDE_VERB, INTERCEPTS_VERB, CachedApproval, Decision
from libs.common.bus import Bus, processing
from libs.common.models import CommandReply, ReplicaStatus, RuntimeConfig, Severity
from libs.common.policy import Policy
from libs.common.replay import REPLAY_VERB, ReplayRequest
from libs.common.settings import ProxySettings
from services.proxy.addons.rules import CompiledPolicy
from services.proxy.config import ProxyConfig
from services.proxy.context import ProxyContext
from services.proxy.intercepts import DecisionRefused
from services.proxy.replay import ReplayFailed, replay
from services.proxy.server import ListenError, ProxyServer

log = logging.getLogger("proxyfleet.control")


def _reason(exc: Exception) -> str:
    """One line saying why a config document was refused (field by field when validating)."""
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "document"
            parts.append(f"{where}: {err['msg']}")
        return "; ".join(parts)[:500]
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


def key_digest(kv_key: str) -> bytes | None:
    """The SHA-256 digest a ``fleet_keys`` entry names (its key is the hex digest)."""
    if len(kv_key) != 64:
        return None
    try:
        return bytes.fromhex(kv_key)
    except ValueError:
        return None


class Control:
    """Serves ``fleet.cmd.<replica|all>.<verb>`` and keeps the registry entry fresh."""

    def __init__(
        self, bus: Bus, ctx: ProxyContext, server: ProxyServer, settings: ProxySettings
    ) -> None:
        self.bus = bus
        self.ctx = ctx
        self.server = server
        self.settings = settings
        self.config_error: str | None = None
        self.policy_error: str | None = None
        self._subs: list[Any] = []
        self._watcher: Any = None
        self._policy_watcher: Any = None
        self._approvals_watcher: Any = None
        self._keys_watcher: Any = None
        server.on_event = self.event

    async def event(self, type: str, data: dict[str, Any], severity: Severity = "info") -> None:
        """Publish a system event about this replica (bounded wait, never raises)."""
        replica = self.ctx.replica
        await events.emit(self.bus, replica, type, data, severity, replica=replica)

    # -- status -------------------------------------------------------------------------
    def status(self) -> ReplicaStatus:
        ctx = self.ctx
        return ReplicaStatus(
            id=ctx.replica,
            state=self.server.state,  # type: ignore[arg-type]
            listen=self.server.address,
            mode=ctx.mode,
            active_connections=len(ctx.connections),
            active_flows=len(ctx.active),
            flows_total=ctx.flows_total,
            events_published=ctx.capture.published,
            events_dropped=ctx.capture.dropped,
            events_undeliverable=ctx.capture.undeliverable,
            events_queued=ctx.capture.pending,
            config_revision=ctx.config.revision,
            config_error=self.config_error,
            policy_revision=ctx.policy.revision,
            policy_error=self.policy_error,
            intercepts_pending=len(ctx.intercepts.pending),
            started_at=self.server.started_at,
            updated_at=time.time(),
        )

    # -- commands -------------------------------------------------------------------------
    async def start(self) -> None:
        replica = self.ctx.replica
        self.ctx.intercepts.emit = lambda type, data: events.emit_soon(
            self.bus, replica, type, data, replica=replica
        )
        for target in (self.ctx.replica, subjects.CMD_ALL):
            sub = await self.bus.nc.subscribe(
                subjects.command_wildcard(target), cb=self._on_command
            )
            self._subs.append(sub)
        await self.bus.barrier()  # commands sent once start() returns find us

    async def _on_command(self, msg: Msg) -> None:
        with processing(msg):  # continues the API request's trace (tracing on only)
            await self._command(msg)

    async def _command(self, msg: Msg) -> None:
        verb = msg.subject.rsplit(".", 1)[-1]
        try:
            body = orjson.loads(msg.data) if msg.data else {}
            if not isinstance(body, dict):
                raise ValueError("command body must be a JSON object")
            reply = await self.handle(verb, body)
        except Exception as exc:  # a bad command never takes the replica down
            log.warning("command %s failed: %r", verb, exc)
            reply = CommandReply(
                replica=self.ctx.replica, ok=False, code="BAD_COMMAND", message=str(exc)
            )
        if msg.reply:
            await msg.respond(reply.model_dump_json().encode())

    async def handle(self, verb: str, body: dict[str, Any]) -> CommandReply:
        """Run one command; the reply always carries the replica's status after it."""
        replica = self.ctx.replica
        data: dict[str, Any] = {}
        if verb == "start":
            try:
                await self.server.start()
            except ListenError as exc:
                return CommandReply(
                    replica=replica,
                    ok=False,
                    code="LISTEN_FAILED",
                    message=str(exc),
                    status=self.status(),
                )
        elif verb == "stop":
            deadline = float(body.get("deadline", self.settings.drain_timeout))
            if not 0 <= deadline <= 3600:
                raise ValueError("deadline must be between 0 and 3600 seconds")
            data["aborted"] = await self.server.stop(deadline)
        elif verb == "kill":
            flow_id = str(body.get("flow_id", ""))
            found = self.ctx.kill(flow_id)
            data["found"] = found
            if found:
                await self.event(events.FLOW_KILLED, {"flow_id": flow_id})
            if not found:
                return CommandReply(
                    replica=replica,
                    ok=False,
                    code="FLOW_NOT_ACTIVE",
                    message=f"flow {flow_id} is not active here",
                    data=data,
                )
        elif verb == INTERCEPTS_VERB:
            data["pending"] = self.ctx.intercepts.listing()
        elif verb == DECIDE_VERB:
            decision = Decision.model_validate(body)
            try:
                data["approval"] = self.ctx.intercepts.decide(decision)
            except DecisionRefused as exc:
                return CommandReply(replica=replica, ok=False, code=exc.code, message=exc.message)
        elif verb == REPLAY_VERB:
            request = ReplayRequest.model_validate(body)
            try:
                data["flow_id"] = await replay(self.ctx, request)
            except (ReplayFailed, OSError) as exc:
                return CommandReply(
                    replica=replica, ok=False, code="REPLAY_FAILED", message=str(exc)
                )
            await self.event(
                events.FLOW_REPLAYED, {"flow_id": data["flow_id"], "replay_of": request.replay_of}
            )
        elif verb != "status":
            return CommandReply(
                replica=replica,
                ok=False,
                code="UNKNOWN_COMMAND",
                message=f"unknown command {verb!r}",
            )
        await self.heartbeat_once()
        return CommandReply(replica=replica, ok=True, status=self.status(), data=data)

    # -- heartbeat ----------------------------------------------------------------------
    async def heartbeat_once(self) -> None:
        """Put our status in the registry; bounded so a lost reply cannot stall the loop."""
        interval = self.settings.heartbeat_interval
        try:
            async with asyncio.timeout(interval):
                kv = await self.bus.replicas_kv(ttl=interval * 3)
                await kv.put(self.ctx.replica, self.status().model_dump_json().encode())
        except Exception as exc:
            log.debug("heartbeat failed: %r", exc)

    async def heartbeat_loop(self) -> None:
        while True:
            if self.bus.connected:
                await self.heartbeat_once()
            await asyncio.sleep(self.settings.heartbeat_interval)

    async def deregister(self) -> None:
        try:
            kv = await self.bus.replicas_kv(ttl=self.settings.heartbeat_interval * 3)
            await kv.delete(self.ctx.replica)
        except Exception as exc:
            log.debug("deregister failed: %r", exc)

    async def publish_ca(self, pem: bytes) -> None:
        """Share the CA certificate through the config bucket (the API serves it)."""
        try:
            kv = await self.bus.config_kv()
            try:
                current = (await kv.get(subjects.CA_CERT_KEY)).value
            except Exception:
                current = None
            if current != pem:
                await kv.put(subjects.CA_CERT_KEY, pem)
        except Exception as exc:
            log.warning("could not publish the CA certificate: %r", exc)

    # -- config -------------------------------------------------------------------------
    def apply_document(self, raw: bytes, revision: int) -> bool:
        """Validate and apply one config revision; keep the last good one on failure."""
        try:
            doc = RuntimeConfig.model_validate_json(raw)
            cfg = ProxyConfig.build(doc, revision, self.settings.upstream_ca_bundle)
        except (ValidationError, ValueError, OSError) as exc:
            self.config_error = f"revision {revision} rejected: {_reason(exc)}"
            log.warning("config %s", self.config_error)
            self._config_event(
                events.CONFIG_REJECTED,
                "warning",
                revision=revision,
                reason=self.config_error,
                kept_revision=self.ctx.config.revision,
            )
            return False
        previous = self.ctx.config.revision
        self.ctx.apply_config(cfg)
        self.ctx.capture.configure(cfg)  # body limit (queue accounting) and redaction
        self.config_error = None
        log.info("config revision %d applied", revision)
        self._config_event(events.CONFIG_APPLIED, "info", revision=revision, previous=previous)
        return True

    def _config_event(self, type: str, severity: Severity, **data: Any) -> None:
        replica = self.ctx.replica
        events.emit_soon(self.bus, replica, type, data, severity, replica=replica)

    async def watch_config(self) -> None:
        """Follow the config bucket forever (the ordered consumer survives reconnects)."""
        while True:
            try:
                kv = await self.bus.config_kv()
                self._watcher = await kv.watch(subjects.CONFIG_KEY)
                async for entry in self._watcher:
                    if entry is None or entry.value is None or entry.operation:
                        continue
                    if entry.revision != self.ctx.config.revision:
                        self.apply_document(entry.value, entry.revision)
                        await self.heartbeat_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("config watch interrupted: %r", exc)
                await asyncio.sleep(1.0)

    # -- rules policy -----------------------------------------------------------------------
    def apply_policy(self, raw: bytes | None, revision: int) -> bool:
        """Validate, compile and apply one policy revision (``raw`` None: the key was
        deleted, no rules); keep the last good one on failure."""
        try:
            if raw is None:
                compiled = CompiledPolicy.of(revision)
            else:
                compiled = CompiledPolicy.build(Policy.model_validate_json(raw), revision)
        except (ValidationError, ValueError) as exc:
            kept = self.ctx.policy.revision
            self.policy_error = f"revision {revision} rejected: {_reason(exc)}"
            log.warning("policy %s (keeping revision %d)", self.policy_error, kept)
            self._config_event(
                events.POLICY_REJECTED,
                "warning",
                revision=revision,
                reason=self.policy_error,
                kept_revision=kept,
            )
            return False
        previous = self.ctx.policy.revision
        self.ctx.apply_policy(compiled)
        self.policy_error = None
        rules = len(compiled.request) + len(compiled.response)
        log.info("policy revision %d applied (%d rules enabled)", revision, rules)
        self._config_event(
            events.POLICY_APPLIED, "info", revision=revision, previous=previous, rules=rules
        )
        return True

    async def watch_policy(self) -> None:
        """Follow the policy bucket forever, like the config (last good kept on failure)."""
        while True:
            try:
                kv = await self.bus.policy_kv()
                self._policy_watcher = await kv.watch(subjects.POLICY_KEY)
                async for entry in self._policy_watcher:
                    if entry is None or entry.revision == self.ctx.policy.revision:
                        continue
                    self.apply_policy(None if entry.operation else entry.value, entry.revision)
                    await self.heartbeat_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("policy watch interrupted: %r", exc)
                await asyncio.sleep(1.0)

    # -- cached approvals ---------------------------------------------------------------------
    async def watch_approvals(self) -> None:
        """Mirror KV ``fleet_approvals`` (the API writes it) for the intercept rules."""
        intercepts = self.ctx.intercepts
        while True:
            try:
                kv = await self.bus.approvals_kv()
                self._approvals_watcher = await kv.watchall()
                async for entry in self._approvals_watcher:
                    if entry is None:
                        continue
                    if entry.operation or not entry.value:
                        intercepts.cache_drop(entry.key)
                        continue
                    try:
                        cached = CachedApproval.model_validate_json(entry.value)
                    except ValidationError:
                        log.warning("cached approval %s unreadable: ignored", entry.key)
                        continue
                    if cached.key() == entry.key:  # an entry must name what it approves
                        intercepts.cache_put(entry.key, cached.expires_at)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("approvals watch interrupted: %r", exc)
                await asyncio.sleep(1.0)

    # -- API-key digests ------------------------------------------------------------------
    async def watch_keys(self) -> None:
        """Follow KV ``fleet_keys`` (the API's key digests) and hand the set to capture,
        which masks those keys wherever they appear in recorded headers.

        The bucket is created here if no API has started yet, so that a replica started
        first still learns the keys as soon as an API publishes them.
        """
        digests: dict[str, bytes] = {}
        while True:
            try:
                kv = await self.bus.keys_kv()
                self._keys_watcher = await kv.watchall()
                async for entry in self._keys_watcher:
                    if entry is None:  # initial values delivered
                        continue
                    if entry.operation:  # DEL or PURGE
                        digests.pop(entry.key, None)
                    else:
                        digest = key_digest(entry.key)
                        if digest is None:
                            continue
                        digests[entry.key] = digest
                    self.ctx.capture.set_key_digests(frozenset(digests.values()))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("API key digest watch interrupted: %r", exc)
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        watchers = (self._watcher, self._policy_watcher, self._approvals_watcher)
        for watcher in (*watchers, self._keys_watcher):
            if watcher is not None:
                try:
                    await watcher.stop()
                except Exception:
                    pass
