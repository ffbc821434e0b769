"""The flow store's query endpoints (``fleet.store.<verb>``), as API errors.

One request per API call over the shared connection: no per-request setup,
so a listing costs the store's work plus one NATS round trip. A listing's
reply is passed on to the client as the bytes the store sent.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import nats.errors
import orjson

from libs.common import subjects
from libs.common.bus import Bus
from services.api.errors import ApiError, FieldError

if TYPE_CHECKING:
    from services.api.metrics import ApiMetrics

_STATUS = {"FLOW_NOT_FOUND": 404, "BAD_QUERY": 422, "BAD_FILTER": 422, "STORE_UNAVAILABLE": 503}


class StoreClient:
    """Request/reply to the store's queue group with the API's timeout."""

    def __init__(self, bus: Bus, timeout: float, metrics: ApiMetrics | None = None) -> None:
        self.bus = bus
        self.timeout = timeout
        self.metrics = metrics

    async def call(self, verb: str, body: dict[str, Any] | bytes) -> tuple[dict[str, Any], bytes]:
        """The decoded reply and its raw bytes; store errors raised as ``ApiError``."""
        data, reply = await self._exchange(verb, body, raw=False)
        assert reply is not None
        return reply, data

    async def call_raw(self, verb: str, body: dict[str, Any] | bytes) -> bytes:
        """The reply's bytes, undecoded unless it is an error (raised as ``ApiError``).

        For large replies (export pages) that the caller decodes off the event loop: the
        store writes an error reply as ``{"error": ...}``, that key first."""
        return (await self._exchange(verb, body, raw=True))[0]

    async def _exchange(
        self, verb: str, body: dict[str, Any] | bytes, raw: bool
    ) -> tuple[bytes, dict[str, Any] | None]:
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        start = time.perf_counter()
        outcome = "error"
        try:
            try:
                msg = await self.bus.request(subjects.store_subject(verb), payload, self.timeout)
            except nats.errors.NoRespondersError:
                outcome = "no_store"
                raise ApiError(503, "STORE_UNAVAILABLE", "no flow store is running") from None
            except TimeoutError:
                outcome = "timeout"
                raise ApiError(
                    503,
                    "STORE_UNAVAILABLE",
                    f"the flow store did not answer within {self.timeout:g}s",
                ) from None
            data = bytes(msg.data)
            reply = None
            if not raw or data.startswith(b'{"error"') or not data.startswith(b"{"):
                reply = self._decode(data)  # raises the store's error, or an unreadable reply
            outcome = "ok"
            return data, reply
        finally:
            if self.metrics is not None:
                self.metrics.observe_store(verb, outcome, time.perf_counter() - start)

    @staticmethod
    def _decode(data: bytes) -> dict[str, Any]:
        try:
            reply = orjson.loads(data)
        except orjson.JSONDecodeError:
            reply = None
        if not isinstance(reply, dict):
            raise ApiError(502, "STORE_ERROR", "the flow store sent an unreadable reply")
        error = reply.get("error")
        if error is not None:
            raise _store_error(error)
        return reply

    async def get_flow(self, flow_id: str) -> dict[str, Any]:
        """The full merged flow (bodies base64), or 404 FLOW_NOT_FOUND."""
        reply, _ = await self.call("get", {"id": flow_id})
        flow = reply.get("flow")
        if not isinstance(flow, dict):
            raise ApiError(404, "FLOW_NOT_FOUND", f"no flow {flow_id}")
        return flow


def _store_error(error: Any) -> ApiError:
    if not isinstance(error, dict):
        return ApiError(502, "STORE_ERROR", f"flow store error: {str(error)[:200]}")
    code = str(error.get("code") or "STORE_ERROR")
    message = str(error.get("message") or code)
    status = _STATUS.get(code, 502)
    errors = None
    if code in ("BAD_QUERY", "BAD_FILTER"):
        name = error.get("field")
        if not name and ": " in message:  # "cursor: not a cursor returned by this store"
            name = message.split(": ", 1)[0]
        if isinstance(name, str) and name.isidentifier():
            errors = [FieldError(field=f"query.{name}", message=message, type="bad_query")]
    return ApiError(status, code if status != 502 else "STORE_ERROR", message, errors=errors)
