"""A tiny OTLP/HTTP traces receiver for tests: ``POST /v1/traces`` on 127.0.0.1, the
protobuf body decoded with ``opentelemetry-proto`` (what the exporter itself uses).

Async tests ``await start()`` it on their loop; synchronous fixtures (the compose
test) run it on a loop of its own in a thread with ``start_in_thread()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.integration.harness import free_port


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass
class ExportedSpan:
    """One received span with its resource's attributes."""

    resource: dict[str, Any]
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]]  # (trace id, span id)


class OtlpReceiver:
    """Accepts OTLP/HTTP protobuf trace exports and keeps the decoded spans."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests = 0
        self.spans: list[ExportedSpan] = []
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        """The base URL to give an exporter (``FLEET_OTLP_ENDPOINT``)."""
        return f"http://127.0.0.1:{self.port}"

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        encoding = request.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        spans = []
        for rs in export.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(
                        ExportedSpan(
                            resource=resource,
                            name=s.name,
                            kind=s.kind,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            links=[(lk.trace_id.hex(), lk.span_id.hex()) for lk in s.links],
                        )
                    )
        with self._lock:
            self.requests += 1
            self.spans += spans
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def start(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def snapshot(self) -> list[ExportedSpan]:
        with self._lock:
            return list(self.spans)

    async def wait_for(
        self, predicate: Callable[[list[ExportedSpan]], bool], timeout: float = 10.0
    ) -> list[ExportedSpan]:
        """The spans received so far, once ``predicate`` holds for them."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            spans = self.snapshot()
            if predicate(spans):
                return spans
            if loop.time() > end:
                names = sorted({(s.resource.get("service.name"), s.name) for s in spans})
                raise AssertionError(f"spans not received in {timeout}s; got {names}")
            await asyncio.sleep(0.05)

    # -- for synchronous callers --------------------------------------------------------------
    def start_in_thread(self) -> None:
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start())
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name="otlp-receiver", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("OTLP receiver did not start")

    def stop_thread(self) -> None:
        if self._loop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
