"""Tracing end to end, with real parts: one flow is one trace across proxy -> NATS ->
store; a client's trace is joined and passed upstream; API requests continue into the
store and the replicas; spans leave a real ``proxyfleet proxy`` over OTLP/HTTP; and
with tracing off nothing changes on the wire.

Spans are collected by an SDK provider with the in-memory exporter, installed with
``telemetry.install`` for the tests that ask for ``spans``. The process-wide provider is
never set here (it can be set once per process, and the tracing-off test checks that
none is installed).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from libs.common import subjects, telemetry
from libs.common.bus import Bus
from libs.common.natsserver import EmbeddedNats
from libs.common.settings import StoreSettings
from services.store.main import Store
from tests.integration.conftest import MakeProxy
from tests.integration.harness import FlowEvents, Upstream, free_port
from tests.integration.otlp import OtlpReceiver
from tests.unit.test_api_support import ADMIN, READ, api_client, api_settings, eventually

pytestmark = pytest.mark.timeout(60)

BIN = Path(sys.executable).parent


@pytest.fixture
def nats_url(restartable_nats: EmbeddedNats) -> str:
    """A NATS of this test's own: the FLOWS stream and the store's durable start empty."""
    return restartable_nats.url


@pytest.fixture(scope="session")
def sdk() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "proxyfleet-tests"}), shutdown_on_exit=False
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def spans(sdk: tuple[TracerProvider, InMemorySpanExporter]) -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test (all spans sampled), its spans in memory."""
    provider, exporter = sdk
    exporter.clear()
    telemetry.install(provider)
    try:
        yield exporter
    finally:
        telemetry.uninstall()
        exporter.clear()


@pytest.fixture
async def store(nats_url: str, tmp_path: Path) -> AsyncIterator[Store]:
    s = Store(
        StoreSettings.model_validate(
            {
                "nats_url": nats_url,
                "data_dir": tmp_path / "store",
                "replica_id": "store0",
                "nats_connect_timeout": 5.0,
                "store_ingest_workers": 0,
            }
        )
    )
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


def client_traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def seen_upstream(resp: httpx.Response, name: str = "traceparent") -> list[str]:
    """Values of header ``name`` that the upstream echo server received."""
    return [v for k, v in resp.json()["headers"] if k.lower() == name]


def tid(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def sid(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.span_id:016x}"


def parent_sid(span: ReadableSpan) -> str | None:
    return None if span.parent is None else f"{span.parent.span_id:016x}"


def named(exporter: InMemorySpanExporter, name: str, trace_id: str | None = None) -> list[Any]:
    return [
        s
        for s in exporter.get_finished_spans()
        if s.name == name and (trace_id is None or tid(s) == trace_id)
    ]


def links_to(span: ReadableSpan, target: ReadableSpan) -> bool:
    assert target.context is not None
    return any(
        lk.context.trace_id == target.context.trace_id
        and lk.context.span_id == target.context.span_id
        for lk in span.links
    )


async def wait_spans(
    exporter: InMemorySpanExporter, name: str, trace_id: str | None = None, timeout: float = 10.0
) -> list[Any]:
    async def found() -> list[Any]:
        return named(exporter, name, trace_id)

    result: list[Any] = await eventually(found, timeout, f"span {name!r}")
    return result


async def stored_flow(nats_url: str, flow_id: str) -> dict[str, Any]:
    """The flow as the store keeps it, once its final event is in."""
    import orjson

    bus = await Bus.connect(nats_url, "tracing-test", timeout=5.0)
    try:

        async def get() -> dict[str, Any] | None:
            msg = await bus.request(
                subjects.store_subject("get"), orjson.dumps({"id": flow_id}), timeout=5.0
            )
            flow: dict[str, Any] | None = orjson.loads(msg.data).get("flow")
            return flow if flow and flow["state"] == "completed" else None

        result: dict[str, Any] = await eventually(get, 10.0, f"flow {flow_id} stored")
        return result
    finally:
        await bus.close()


# -- tracing on ------------------------------------------------------------------------------
async def test_one_flow_is_one_trace_across_proxy_nats_and_store(
    spans: InMemorySpanExporter,
    store: Store,
    make_proxy: MakeProxy,
    upstream: Upstream,
    nats_url: str,
) -> None:
    proxy = await make_proxy()
    tp, trace_id, client_span = client_traceparent()
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
        resp = await client.get(
            f"{upstream.http}/echo/traced", headers={"traceparent": tp, "tracestate": "fleet=1"}
        )
    assert resp.status_code == 200

    # the flow's span joined the client's trace, and the upstream got a traceparent naming it
    (flow,) = named(spans, "proxy GET", trace_id)
    assert flow.kind == SpanKind.SERVER
    assert parent_sid(flow) == client_span and flow.parent.is_remote
    assert flow.attributes["http.request.method"] == "GET"
    assert flow.attributes["http.response.status_code"] == 200
    assert flow.attributes["url.path"] == "/echo/traced"
    assert seen_upstream(resp) == [f"00-{trace_id}-{sid(flow)}-01"]  # the client's replaced
    assert seen_upstream(resp, "tracestate") == ["fleet=1"]

    # a fresh upstream connection: its connect is a child of the flow's span
    (connect,) = named(spans, "upstream connect", trace_id)
    assert parent_sid(connect) == sid(flow)
    assert connect.attributes["server.port"] == upstream.http_port
    assert flow.start_time <= connect.start_time <= connect.end_time <= flow.end_time

    # the batch publish span links to the flow; the store continues the flow's trace
    subject = subjects.flows_subject(proxy.id)
    (ingest,) = await wait_spans(spans, f"{subject} process", trace_id)
    publishes = [s for s in named(spans, f"{subject} publish") if links_to(s, flow)]
    assert len(publishes) == 1
    (publish,) = publishes
    assert publish.kind == SpanKind.PRODUCER
    assert publish.attributes["messaging.system"] == "nats"
    assert ingest.kind == SpanKind.CONSUMER
    assert parent_sid(ingest) == sid(flow)  # one flow = one trace
    assert links_to(ingest, publish)
    batch_name = f"{subjects.FLOWS_SUBJECTS} process"
    batches = [s for s in named(spans, batch_name) if links_to(s, publish)]
    assert len(batches) == 1 and links_to(ingest, batches[0])

    # the event and the stored flow keep the trace
    doc = await stored_flow(nats_url, flow.attributes["proxyfleet.flow.id"])
    assert doc["trace_id"] == trace_id
    assert doc["traceparent"] == f"00-{trace_id}-{sid(flow)}-01"


async def test_new_trace_and_upstream_tls_handshake_span(
    spans: InMemorySpanExporter, make_proxy: MakeProxy, upstream: Upstream
) -> None:
    proxy = await make_proxy()
    trusting = ssl.create_default_context(cafile=str(proxy.ca_path))
    async with httpx.AsyncClient(proxy=proxy.url, verify=trusting, timeout=10) as client:
        resp = await client.get(f"{upstream.https}/echo/tls")
        again = await client.get(f"{upstream.https}/echo/tls2")  # pooled upstream connection
    assert resp.status_code == 200 and again.status_code == 200

    (seen,) = seen_upstream(resp)
    _, trace_id, span_id, flags = seen.split("-")
    assert int(flags, 16) & 1  # sampled (the SDK also sets 0x02, "random trace id")
    (flow,) = named(spans, "proxy GET", trace_id)  # a trace of its own (no client context)
    assert flow.parent is None and sid(flow) == span_id
    assert flow.attributes["url.scheme"] == "https"
    (connect,) = named(spans, "upstream connect", trace_id)
    (tls,) = named(spans, "tls handshake", trace_id)
    assert parent_sid(connect) == parent_sid(tls) == sid(flow)
    assert connect.end_time <= tls.start_time
    assert str(tls.attributes["tls.protocol.version"]).startswith("TLS")

    (seen2,) = seen_upstream(again)
    trace2 = seen2.split("-")[1]
    assert trace2 != trace_id
    assert named(spans, "proxy GET", trace2) and not named(spans, "upstream connect", trace2)


async def test_unsampled_flows_propagate_ids_without_spans(
    spans: InMemorySpanExporter,
    make_proxy: MakeProxy,
    upstream: Upstream,
    nats_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At a sample ratio of 0 a flow never reaches the SDK, yet its ids are propagated and
    recorded; a sampled client trace is still followed (parent-based)."""
    monkeypatch.setattr(telemetry, "_root_bound", 0)  # as setup_tracing does for ratio 0
    proxy = await make_proxy()
    events = FlowEvents()
    await events.start(nats_url, proxy.id)
    try:
        unsampled_tp, unsampled_trace, _ = client_traceparent()
        unsampled_tp = unsampled_tp[:-2] + "00"
        sampled_tp, sampled_trace, client_span = client_traceparent()
        async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
            root = await client.get(f"{upstream.http}/echo/root")
            child = await client.get(
                f"{upstream.http}/echo/child", headers={"traceparent": unsampled_tp}
            )
            followed = await client.get(
                f"{upstream.http}/echo/followed", headers={"traceparent": sampled_tp}
            )
        (seen_root,) = seen_upstream(root)
        assert seen_root.endswith("-02")  # not sampled (random trace id flag, as the SDK)
        (seen_child,) = seen_upstream(child)
        assert seen_child.split("-")[1] == unsampled_trace and seen_child.endswith("-00")
        assert seen_child != unsampled_tp  # a span id of the proxy's own
        event = await events.final_for("/echo/root")
        assert event["traceparent"] == seen_root
        assert event["trace_id"] == seen_root.split("-")[1]
        assert not named(spans, "proxy GET", seen_root.split("-")[1])
        assert not named(spans, "proxy GET", unsampled_trace)
        (flow,) = named(spans, "proxy GET", sampled_trace)
        assert parent_sid(flow) == client_span
        assert seen_upstream(followed) == [f"00-{sampled_trace}-{sid(flow)}-01"]
        await events.final_for("/echo/followed")
        for msg in events.messages:  # only the sampled flow is named for the store
            carried = (msg.headers or {}).get(subjects.FLOW_TRACES_HEADER, "")
            assert unsampled_trace not in carried and seen_root not in carried
    finally:
        await events.stop()


async def test_api_requests_continue_into_the_store_and_the_replicas(
    spans: InMemorySpanExporter,
    store: Store,
    make_proxy: MakeProxy,
    upstream: Upstream,
    nats_url: str,
    tmp_path: Path,
) -> None:
    proxy = await make_proxy()
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
        resp = await client.get(f"{upstream.http}/echo/api")
    (seen,) = seen_upstream(resp)
    flow_trace, flow_span = seen.split("-")[1:3]
    (flow,) = named(spans, "proxy GET", flow_trace)
    flow_id = flow.attributes["proxyfleet.flow.id"]

    async with api_client(api_settings(nats_url, tmp_path / "api")) as api:

        async def completed() -> dict[str, Any] | None:
            r = await api.get(f"/api/flows/{flow_id}", headers=READ)
            body: dict[str, Any] = r.json()
            return body if r.status_code == 200 and body["state"] == "completed" else None

        body = await eventually(completed, 10.0, "flow in the API")
        assert body["trace_id"] == flow_trace
        assert body["traceparent"] == seen

        # GET /api/flows/{id}: SERVER span -> NATS request (CLIENT) -> store handler (SERVER)
        gets = named(spans, "GET /api/flows/{flow_id}")
        api_span = next(s for s in reversed(gets) if s.kind == SpanKind.SERVER)
        api_trace = tid(api_span)
        (request,) = named(spans, "fleet.store.get publish", api_trace)
        (handler,) = named(spans, "fleet.store.get process", api_trace)
        assert request.kind == SpanKind.CLIENT and parent_sid(request) == sid(api_span)
        assert handler.kind == SpanKind.SERVER and parent_sid(handler) == sid(request)
        assert links_to(api_span, flow)  # the API request points at the flow's trace

        # a command fans out to the replicas and each handles it in the same trace
        async def registered() -> bool:
            status = (await api.get("/api/proxy/status", headers=READ)).json()
            return proxy.id in {r["id"] for r in status["replicas"]}

        await eventually(registered, 5.0, "replica registered")
        killed = await api.delete(f"/api/flows/{flow_id}", headers=ADMIN)
        assert killed.status_code == 409  # finished already; the replicas were asked anyway
        deletes = named(spans, "DELETE /api/flows/{flow_id}")
        delete_span = next(s for s in deletes if s.kind == SpanKind.SERVER)
        trace2 = tid(delete_span)
        (command,) = named(spans, "fleet.cmd.all.kill publish", trace2)
        (on_replica,) = named(spans, "fleet.cmd.all.kill process", trace2)
        assert parent_sid(command) == sid(delete_span)
        assert on_replica.kind == SpanKind.SERVER and parent_sid(on_replica) == sid(command)
    assert flow_span == sid(flow)


async def test_spans_are_exported_over_otlp_http(
    nats_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    """A real ``proxyfleet proxy`` process with FLEET_OTLP_ENDPOINT: its spans reach a
    local OTLP/HTTP receiver, flushed at shutdown, under its service name and replica id."""
    receiver = OtlpReceiver()
    await receiver.start()
    port = free_port()
    replica = f"otlp-{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "OTEL_"))}
    env.update(
        FLEET_NATS_URL=nats_url,
        FLEET_DATA_DIR=str(tmp_path / "pf"),
        FLEET_PROXY_LISTEN=f"127.0.0.1:{port}",
        FLEET_REPLICA_ID=replica,
        FLEET_OTLP_ENDPOINT=receiver.endpoint,
        FLEET_LOG_LEVEL="WARNING",
    )
    log = (tmp_path / "proxy.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "proxyfleet"), "proxy", env=env, stdout=asyncio.subprocess.PIPE, stderr=log
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert b"listening on" in line, (line, (tmp_path / "proxy.log").read_text())
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{port}", timeout=10) as client:
            resp = await client.get(f"{upstream.http}/echo/otlp")
        assert resp.status_code == 200
        (seen,) = seen_upstream(resp)
        trace_id, span_id = seen.split("-")[1:3]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0

        spans = await receiver.wait_for(
            lambda got: any(s.name == "proxy GET" for s in got), timeout=5.0
        )
        (flow,) = [s for s in spans if s.name == "proxy GET"]
        assert flow.resource["service.name"] == "proxyfleet-proxy"
        assert flow.resource["service.instance.id"] == replica
        assert (flow.trace_id, flow.span_id) == (trace_id, span_id)
        assert flow.kind == 2  # SPAN_KIND_SERVER
        assert flow.attributes["http.response.status_code"] == 200
        publish = [s for s in spans if s.name == f"{subjects.flows_subject(replica)} publish"]
        assert any((trace_id, span_id) in s.links for s in publish)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()
        await receiver.stop()


# -- tracing off -----------------------------------------------------------------------------
async def test_tracing_off_installs_nothing_and_changes_nothing(
    make_proxy: MakeProxy, upstream: Upstream, nats_url: str
) -> None:
    from opentelemetry.sdk.trace import TracerProvider as SdkProvider

    assert telemetry.ENABLED is False and telemetry.provider() is None
    assert not isinstance(trace.get_tracer_provider(), SdkProvider)
    proxy = await make_proxy()
    events = FlowEvents()
    await events.start(nats_url, proxy.id)
    try:
        tp, _, _ = client_traceparent()
        async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
            joined = await client.get(f"{upstream.http}/echo/off-tp", headers={"traceparent": tp})
            plain = await client.get(f"{upstream.http}/echo/off")
        assert seen_upstream(joined) == [tp]  # relayed untouched
        assert seen_upstream(plain) == []  # none added
        for path in ("/echo/off-tp", "/echo/off"):
            event = await events.final_for(path)
            assert event["trace_id"] is None and event["traceparent"] is None
        for msg in events.messages:
            assert set(msg.headers or {}) <= {"Nats-Msg-Id"}
    finally:
        await events.stop()
