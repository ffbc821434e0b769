"""Store queries over NATS request/reply: ``fleet.store.list|get|count|export``.

Every store replica subscribes in queue group ``store``, so NATS hands each
query to one of them. Every request gets exactly one reply: the result, or
``{"error": {"code", "message"}}`` with a stable code (BAD_QUERY naming the
field, FLOW_NOT_FOUND, STORE_UNAVAILABLE); nothing a client sends can crash a
handler or leave it without an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from libs.common import subjects
from libs.common.bus import Bus, processing
from libs.common.models import FlowQuery, StoreError
from libs.common.tasks import spawn
from services.store import export
from services.store.repository import FlowRepository, QueryError, RepositoryError

log = logging.getLogger("proxyfleet.store.rpc")

MAX_CONCURRENT = 32  # queries in progress per replica; more wait in NATS's pending queue


class GetRequest(BaseModel):
    """Body of ``fleet.store.get``."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64)


class RequestError(Exception):
    """A query answered with an error reply (``field``: the request field at fault)."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.field = field


def _validation_error(exc: ValidationError) -> RequestError:
    parts = []
    fields = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "body"
        fields.append(field)
        parts.append(f"{field}: {err['msg']}")
    return RequestError("BAD_QUERY", "; ".join(parts), fields[0] if fields else None)


def _parse(model: type[BaseModel], data: bytes) -> Any:
    try:
        body = orjson.loads(data) if data.strip() else {}
    except orjson.JSONDecodeError:
        raise RequestError("BAD_QUERY", "body: not valid JSON", "body") from None
    if not isinstance(body, dict):
        raise RequestError("BAD_QUERY", "body: must be a JSON object", "body")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def error_reply(
    code: str, message: str, field: str | None = None, position: int | None = None
) -> bytes:
    """``{"error": {"code", "message"}}``, plus ``field`` (first one at fault) on BAD_QUERY
    and BAD_FILTER, and ``position`` (in the filter) on BAD_FILTER."""
    error = StoreError(code=code, message=message).model_dump()
    if field is not None:
        error["field"] = field
    if position is not None:
        error["position"] = position
    return orjson.dumps({"error": error})


class StoreRPC:
    """The query endpoints of one store replica."""

    def __init__(self, bus: Bus, repo: FlowRepository) -> None:
        self.bus = bus
        self.repo = repo
        self._read_ahead = export.ReadAhead(repo, lambda: export.budget(bus.max_payload))
        self.served = 0
        self.failed = 0
        self._subs: list[Subscription] = []
        self._inflight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        self._handlers: dict[str, Callable[[bytes], Awaitable[dict[str, Any]]]] = {
            "list": self._list,
            "get": self._get,
            "count": self._count,
            "export": self._export,
            "har": self._har,
        }

    async def start(self) -> None:
        for verb in subjects.STORE_VERBS:
            handler = self._handlers[verb]

            async def on_msg(msg: Msg, handler: Any = handler) -> None:
                task = spawn(self._serve(msg, handler), name="store-query")
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

            sub = await self.bus.nc.subscribe(
                subjects.store_subject(verb), queue=subjects.STORE_QUEUE, cb=on_msg
            )
            self._subs.append(sub)
        await self.bus.barrier()  # queries sent once start() returns find us

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop taking queries and let the ones in progress answer."""
        self._read_ahead.close()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=timeout)

    async def handle(self, verb: str, data: bytes) -> bytes:
        """The reply to one query (used by the subscriptions; callable directly in tests)."""
        handler = self._handlers.get(verb)
        if handler is None:
            return error_reply("BAD_QUERY", f"verb: unknown query {verb!r}", "verb")
        return await self._answer(handler, data)

    async def _serve(self, msg: Msg, handler: Callable[[bytes], Awaitable[dict[str, Any]]]) -> None:
        if not msg.reply:
            return
        async with self._slots:
            with processing(msg):  # continues the API request's trace (tracing on only)
                reply = await self._answer(handler, msg.data)
        with contextlib.suppress(Exception):
            await msg.respond(reply)

    async def _answer(
        self, handler: Callable[[bytes], Awaitable[dict[str, Any]]], data: bytes
    ) -> bytes:
        try:
            result = await handler(data)
        except RequestError as exc:
            self.failed += 1
            return error_reply(exc.code, str(exc), exc.field)
        except QueryError as exc:
            self.failed += 1
            return error_reply(exc.code, str(exc), exc.field, exc.position)
        except RepositoryError as exc:
            self.failed += 1
            log.warning("query failed: %s", exc)
            return error_reply("STORE_UNAVAILABLE", str(exc))
        except Exception as exc:  # a bug must still produce an answer
            self.failed += 1
            log.exception("query crashed")
            return error_reply("STORE_UNAVAILABLE", f"internal error: {type(exc).__name__}")
        self.served += 1
        return orjson.dumps(result)

    async def _list(self, data: bytes) -> dict[str, Any]:
        query: FlowQuery = _parse(FlowQuery, data)
        return (await self.repo.listing(query)).to_wire()

    async def _count(self, data: bytes) -> dict[str, Any]:
        query: FlowQuery = _parse(FlowQuery, data)
        return {"count": await self.repo.count(query)}

    async def _export(self, data: bytes) -> dict[str, Any]:
        query: FlowQuery = _parse(FlowQuery, data)
        return await export.export_page(self.repo, query, export.budget(self.bus.max_payload))

    async def _har(self, data: bytes) -> dict[str, Any]:
        query: FlowQuery = _parse(FlowQuery, data)
        return await self._read_ahead.page(query)

    async def _get(self, data: bytes) -> dict[str, Any]:
        req: GetRequest = _parse(GetRequest, data)
        record = await self.repo.get(req.id)
        if record is None:
            raise RequestError("FLOW_NOT_FOUND", f"no flow with id {req.id!r}")
        return {"flow": record.to_wire()}
