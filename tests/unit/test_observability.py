"""Logs and metrics pieces: the JSON formatter (with and without a current span), the
new settings, the publisher's flow tally and the metrics endpoint's edge cases."""

from __future__ import annotations

import asyncio
import logging
import sys

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, Counter

from libs.common.logs import JsonFormatter, formatter
from libs.common.metrics import MetricsServer
from libs.common.settings import ProxySettings, SettingsError, StoreSettings, load
from services.proxy.capture import LATENCY_BUCKETS, STATUS_CLASSES, Capture
from services.proxy.flow import COMPLETED, ERROR, KILLED, Flow


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("proxyfleet.test", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_json_line_without_a_span_has_no_trace_fields() -> None:
    line = JsonFormatter("proxy").format(_record("listener on %s", "127.0.0.1:8080"))
    doc = orjson.loads(line)
    assert doc.keys() == {"time", "level", "service", "logger", "message"}
    assert doc["message"] == "listener on 127.0.0.1:8080"
    assert doc["level"] == "WARNING" and doc["service"] == "proxy"
    assert doc["logger"] == "proxyfleet.test"
    assert doc["time"].endswith("Z") and "T" in doc["time"]
    assert "\n" not in line


def test_json_line_inside_a_span_carries_its_ids() -> None:
    # a provider of the test's own: the global one can be set once per process
    tracer = TracerProvider().get_tracer("test")
    span = tracer.start_span("flow")
    with trace.use_span(span, end_on_exit=True):
        doc = orjson.loads(JsonFormatter("store").format(_record("ingested")))
    ctx = span.get_span_context()
    assert doc["trace_id"] == format(ctx.trace_id, "032x") and len(doc["trace_id"]) == 32
    assert doc["span_id"] == format(ctx.span_id, "016x") and len(doc["span_id"]) == 16
    after = orjson.loads(JsonFormatter("store").format(_record("later")))
    assert "trace_id" not in after  # the span is no longer current


def test_json_line_keeps_the_traceback_in_one_line() -> None:
    line = JsonFormatter("api").format(_record("crashed", exc=True))
    assert "\n" not in line
    assert "ValueError: boom" in orjson.loads(line)["exception"]


def test_text_format_is_unchanged() -> None:
    fmt = formatter("proxy", "text")
    assert fmt.format(_record("hello")).endswith(" WARNING proxy proxyfleet.test: hello")


def test_log_format_and_metrics_listen_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_LOG_FORMAT", "JSON")
    monkeypatch.setenv("FLEET_PROXY_METRICS_LISTEN", "0.0.0.0:9101")
    s = load(ProxySettings)
    assert s.log_format == "json" and s.proxy_metrics_listen == "0.0.0.0:9101"
    for off in ("", "off", "OFF", "none", "false"):
        monkeypatch.setenv("FLEET_STORE_METRICS_LISTEN", off)
        assert load(StoreSettings).store_metrics_listen == ""
    assert load(ProxySettings, proxy_metrics_listen="").proxy_metrics_listen == ""
    monkeypatch.setenv("FLEET_STORE_METRICS_LISTEN", "nonsense")
    with pytest.raises(SettingsError, match="FLEET_STORE_METRICS_LISTEN"):
        load(StoreSettings)
    monkeypatch.setenv("FLEET_LOG_FORMAT", "xml")
    with pytest.raises(SettingsError, match="FLEET_LOG_FORMAT"):
        load(ProxySettings)


def test_defaults_serve_no_metrics_port(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLEET_PROXY_METRICS_LISTEN", "FLEET_STORE_METRICS_LISTEN", "FLEET_LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    assert load(ProxySettings).proxy_metrics_listen == ""
    assert load(StoreSettings).store_metrics_listen == ""
    assert load(ProxySettings).log_format == "text"


# -- the publisher's tally ------------------------------------------------------------------
class _Bus:
    connected = True
    max_payload = 1 << 20

    async def js_publish(self, subject: str, payload: bytes, msg_id: str | None = None) -> None:
        return None


def _finished(state: str, status: int, sent: float = 0.0, first: float = 0.0) -> Flow:
    f = Flow(("127.0.0.1", 1))
    f.status = status
    f.req_size, f.resp_size = 10, 100
    f.t_request_sent, f.t_first_byte = sent, first
    f.finish(state)
    return f


async def test_tally_counts_each_finished_flow_once_at_drain() -> None:
    cap = Capture("r", _Bus(), linger=0)
    active = Flow(("127.0.0.1", 1))
    cap.emit(active)  # a started event: counts nothing
    flows = [
        _finished(COMPLETED, 200, 1.0, 1.0 + LATENCY_BUCKETS[0]),  # exactly on a bound: le
        _finished(COMPLETED, 404, 1.0, 1.2),
        _finished(COMPLETED, 101, 1.0, 0.5),  # first byte before the body went: 0
        _finished(COMPLETED, 0),
        _finished(ERROR, 502),
        _finished(KILLED, 200, 1.0, 100.0),
    ]
    tunnel = _finished(COMPLETED, 200)
    tunnel.stats = {"bytes_client_to_server": 7, "bytes_server_to_client": 9}
    for f in [*flows, tunnel]:
        cap.emit(f)
        cap.emit(f)  # started and final entries of one flow: one count
    assert sum(cap.tally.by_class) == 0  # nothing counted on the request path
    await cap.flush(1.0)
    t = cap.tally
    counts = dict(zip(STATUS_CLASSES, t.by_class, strict=True))
    assert counts == {
        "other": 1,
        "1xx": 1,
        "2xx": 2,
        "3xx": 0,
        "4xx": 1,
        "5xx": 0,
        "error": 1,
        "killed": 1,
    }
    assert t.bytes_client_to_server == 7 * 10 + 7
    assert t.bytes_server_to_client == 7 * 100 + 9
    assert t.latency_count == 4
    assert t.latency_buckets[0] == 2  # LATENCY_BUCKETS[0] exactly, and the clamped 0
    assert t.latency_buckets[-1] == 1  # 99 s: above the last bound, +Inf only
    assert t.latency_sum == pytest.approx(LATENCY_BUCKETS[0] + 0.2 + 99.0)


def test_dropped_events_are_told_apart() -> None:
    cap = Capture("r", None, queue_size=1)
    cap.emit(Flow(("127.0.0.1", 1)))
    cap.emit(Flow(("127.0.0.1", 1)))  # started, dropped
    cap.emit(_finished(COMPLETED, 200))  # final, dropped
    assert (cap.dropped, cap.dropped_final) == (2, 1)


# -- the metrics endpoint ----------------------------------------------------------------------
async def _raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


async def test_metrics_server_answers_and_refreshes() -> None:
    registry = CollectorRegistry()
    hits = Counter("hits", "test counter", registry=registry)
    refreshed = 0

    async def refresh() -> None:
        nonlocal refreshed
        refreshed += 1
        hits.inc()

    server = MetricsServer(registry, "127.0.0.1:0", refresh=refresh)
    await server.start()
    try:
        port = int(server.address.rsplit(":", 1)[1])
        ok = await _raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and b"\nhits_total 1.0\n" in ok
        om = await _raw(
            port, b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n"
        )
        assert b"application/openmetrics-text" in om and om.endswith(b"# EOF\n")
        head = await _raw(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
        assert (await _raw(port, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await _raw(port, b"DELETE /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        assert (await _raw(port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
        assert refreshed == 3
    finally:
        await server.stop()


async def test_a_failing_refresh_still_serves_the_scrape() -> None:
    async def refresh() -> None:
        raise RuntimeError("NATS is down")

    server = MetricsServer(CollectorRegistry(), "127.0.0.1:0", refresh=refresh)
    await server.start()
    try:
        port = int(server.address.rsplit(":", 1)[1])
        assert (await _raw(port, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200")
    finally:
        await server.stop()
