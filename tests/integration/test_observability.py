"""Metrics and logs with real parts: an in-process proxy scraped on its metrics port
after real requests, an in-process store after real ingest (and a stalled one, for
consumer lag), the API's /metrics after real API calls, and ``proxyfleet proxy``
as a process logging JSON lines."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from libs.common import subjects
from libs.common.bus import Bus
from libs.common.natsserver import EmbeddedNats
from services.proxy.main import StartupError
from services.store.main import Store
from services.store.repository import IngestResult
from tests.integration.conftest import MakeProxy
from tests.integration.harness import RawClient, Upstream, free_port
from tests.integration.test_store import event, new_id, publish, store_settings
from tests.unit.test_api_support import READ, CannedStore, api_client, api_settings, eventually

pytestmark = pytest.mark.timeout(60)

BIN = Path(sys.executable).parent
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition, keyed by (name, labels)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}; have {sorted(k[0] for k in samples)}"
    return samples[key]


async def scrape(address: str) -> Samples:
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        resp = await client.get(f"http://{address}/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(resp.text)


# -- proxy ----------------------------------------------------------------------------------
async def test_proxy_metrics_after_real_requests(make_proxy: MakeProxy, upstream: Upstream) -> None:
    proxy = await make_proxy(proxy_metrics_listen="127.0.0.1:0")
    metrics = proxy.replica.metrics
    assert metrics is not None
    address = metrics.address
    refused = free_port()  # nothing listens there: the proxy answers 502, an error flow
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10, trust_env=False) as client:
        assert (await client.get(f"{upstream.http}/echo/a")).status_code == 200
        assert (await client.get(f"{upstream.http}/status/404")).status_code == 404
        assert (await client.get(f"{upstream.http}/status/500")).status_code == 500
        posted = await client.post(f"{upstream.http}/echo/b", content=b"p" * 1000)
        assert posted.status_code == 200
        assert (await client.get(f"{upstream.http}/bytes/5000")).status_code == 200
        assert (await client.get(f"http://127.0.0.1:{refused}/x")).status_code == 502
        # a long response, killed by an operator while it runs
        async with client.stream("GET", f"{upstream.http}/drip?n=1000&s=0.05") as resp:
            assert resp.status_code == 200
            ctx = proxy.ctx
            (flow_id,) = [i for i, ex in ctx.active.items() if ex.flow.path.startswith(b"/drip")]
            assert ctx.kill(flow_id)
            with pytest.raises(httpx.HTTPError):
                async for _ in resp.aiter_bytes():
                    pass

    # one keep-alive connection held open while scraping
    async with await RawClient.connect(proxy.port) as held:
        await held.send(
            f"GET {upstream.http}/echo/held HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        )
        assert (await held.read_response()).status == 200
        cap = proxy.ctx.capture

        async def all_counted() -> bool:
            return sum(cap.tally.by_class) == 8 and cap.pending == 0

        await eventually(all_counted, 5.0, "8 finished flows counted by the publisher")
        s = await scrape(address)
        assert value(s, "proxyfleet_proxy_active_connections") == 1
        assert value(s, "proxyfleet_proxy_active_flows") == 0

    p = "proxyfleet_proxy_"
    by_class = {
        c: value(s, p + "flows_total", status_class=c)
        for c in ("1xx", "2xx", "3xx", "4xx", "5xx", "error", "killed")
    }
    assert by_class == {
        "1xx": 0,
        "2xx": 4,  # echo/a, echo/b, bytes/5000, echo/held
        "3xx": 0,
        "4xx": 1,
        "5xx": 1,
        "error": 1,
        "killed": 1,
    }
    assert value(s, p + "flows_finished_total") == 8
    assert value(s, p + "body_bytes_total", direction="client_to_server") == 1000
    assert value(s, p + "body_bytes_total", direction="server_to_client") > 5000
    # every flow that got a response head from upstream: all but the refused one
    assert value(s, p + "upstream_latency_seconds_count") == 7
    assert value(s, p + "upstream_latency_seconds_bucket", le="+Inf") == 7
    assert 0 < value(s, p + "upstream_latency_seconds_sum") < 7
    assert value(s, p + "upstream_latency_seconds_bucket", le="30.0") == 7
    assert value(s, p + "flow_events_published_total") == cap.published >= 8
    assert value(s, p + "flow_batches_published_total") >= 1
    assert value(s, p + "flow_events_dropped_total", event="started") == 0
    assert value(s, p + "flow_events_dropped_total", event="final") == 0
    assert value(s, p + "flow_events_queued") == 0
    assert value(s, p + "listening") == 1
    assert value(s, p + "nats_connected") == 1
    assert value(s, p + "replica_info", replica=proxy.id, mode="regular") == 1

    async def closed() -> bool:
        return value(await scrape(address), p + "active_connections") == 0

    await eventually(closed, 5.0, "the held connection gone from the gauge")
    async with httpx.AsyncClient(trust_env=False) as client:
        assert (await client.get(f"http://{address}/other")).status_code == 404
        assert (await client.post(f"http://{address}/metrics")).status_code == 405


async def test_proxy_counts_dropped_final_events(make_proxy: MakeProxy, upstream: Upstream) -> None:
    """Queue overflow: what the publisher never saw is counted as dropped, not as a flow."""
    proxy = await make_proxy(proxy_metrics_listen="127.0.0.1:0", capture_queue_size=2)
    cap = proxy.ctx.capture
    for task in proxy.replica._tasks:  # stop the publisher: the queue fills up
        if task.get_name() == "capture":
            task.cancel()
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10, trust_env=False) as client:
        for i in range(3):
            assert (await client.get(f"{upstream.http}/echo/{i}")).status_code == 200
    metrics = proxy.replica.metrics
    assert metrics is not None
    s = await scrape(metrics.address)
    p = "proxyfleet_proxy_"
    # 3 flows, 6 events: the first flow's two fit in the queue, the other four are dropped
    assert value(s, p + "flow_events_dropped_total", event="started") == 2
    assert value(s, p + "flow_events_dropped_total", event="final") == 2
    assert value(s, p + "flow_events_queued") == 2
    assert value(s, p + "flows_finished_total") == 3
    assert value(s, p + "flows_total", status_class="2xx") == 0  # not published yet
    await cap.flush(5.0)
    s = await scrape(metrics.address)
    assert value(s, p + "flows_total", status_class="2xx") == 1


async def test_proxy_metrics_port_taken_is_a_startup_error(make_proxy: MakeProxy) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=f"127.0.0.1:{port} for metrics"):
            await make_proxy(proxy_metrics_listen=f"127.0.0.1:{port}")


# -- store ----------------------------------------------------------------------------------
@pytest.fixture
def own_nats(restartable_nats: EmbeddedNats) -> str:
    """A NATS of this test's own: the FLOWS stream and the durable consumer start empty."""
    return restartable_nats.url


@pytest.fixture
async def bus(own_nats: str) -> AsyncIterator[Bus]:
    b = await Bus.connect(own_nats, "metrics-test", timeout=5.0)
    await b.ensure_streams()
    try:
        yield b
    finally:
        await b.close()


async def test_store_metrics_ingest_and_consumer_lag(
    own_nats: str, bus: Bus, tmp_path: Path
) -> None:
    store = Store(
        store_settings(
            own_nats,
            tmp_path / "store",
            store_metrics_listen="127.0.0.1:0",
            store_ingest_workers=0,
            store_fetch_batch=1,
        )
    )
    await store.start()
    try:
        assert store.repo is not None and store.metrics is not None
        address = store.metrics.address
        # Hold ingest: the consumer fetches a few messages, the rest wait in JetStream.
        gate = asyncio.Event()
        ingest: Callable[[Any], Awaitable[IngestResult]] = store.repo.ingest

        async def held(payloads: Any) -> IngestResult:
            await gate.wait()
            return await ingest(payloads)

        store.repo.ingest = held  # type: ignore[method-assign]
        for _ in range(10):
            flow = new_id()
            await publish(bus, [event(flow, "active"), event(flow, "completed")])
        await bus.js_publish(subjects.flows_subject("hand"), b"not json")

        async def lagging() -> Samples | None:
            s = await scrape(address)
            return s if value(s, "proxyfleet_store_consumer_ack_pending_messages") >= 2 else None

        s = await eventually(lagging, 5.0, "messages fetched and held")
        delivered = value(s, "proxyfleet_store_consumer_ack_pending_messages")
        assert delivered <= 3  # two batches being ingested, one fetched ahead
        assert value(s, "proxyfleet_store_consumer_pending_messages") == 11 - delivered
        assert value(s, "proxyfleet_store_messages_ingested_total") == 0

        gate.set()

        async def drained() -> Samples | None:
            s = await scrape(address)
            done = value(s, "proxyfleet_store_messages_ingested_total") == 11
            return (
                s
                if done and value(s, "proxyfleet_store_consumer_ack_pending_messages") == 0
                else None
            )

        s = await eventually(drained, 10.0, "all 11 messages ingested")
        p = "proxyfleet_store_"
        assert value(s, p + "consumer_pending_messages") == 0
        assert value(s, p + "events_ingested_total") == 20
        assert value(s, p + "batches_total") == 11
        assert value(s, p + "decode_errors_total") == 1
        assert value(s, p + "bad_events_total") == 0
        assert value(s, p + "ingest_errors_total") == 0
        assert value(s, p + "db_rows") == 10
        assert value(s, p + "last_ingest_duration_seconds") > 0
        assert value(s, p + "last_ingest_delay_seconds") >= 0
        assert value(s, p + "nats_connected") == 1
        assert value(s, p + "replica_info", replica="store") == 1
    finally:
        await store.stop()


# -- API ------------------------------------------------------------------------------------
async def test_api_metrics_by_route_template(own_nats: str, tmp_path: Path) -> None:
    async def answer(verb: str, body: dict[str, Any]) -> dict[str, Any]:
        if verb == "list":
            return {"flows": [], "next_cursor": None}
        return {"error": {"code": "FLOW_NOT_FOUND", "message": "no such flow"}}

    canned = await CannedStore(answer).start(own_nats)
    try:
        async with api_client(api_settings(own_nats, tmp_path / "api")) as api:
            assert (await api.get("/api/flows", headers=READ)).status_code == 200
            assert (await api.get("/api/flows", headers=READ)).status_code == 200
            assert (await api.get("/api/flows/0123abcd", headers=READ)).status_code == 404
            assert (await api.get("/api/flows")).status_code == 401
            assert (await api.get("/healthz")).status_code == 200
            assert (await api.get("/no/such/thing")).status_code == 404
            resp = await api.get("/metrics")  # no API key needed
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
            assert "0123abcd" not in resp.text  # route templates, never raw paths
            s = parse(resp.text)
    finally:
        await canned.stop()
    name = "proxyfleet_api_request_duration_seconds_count"
    assert value(s, name, method="GET", route="/api/flows", status_class="2xx") == 2
    assert value(s, name, method="GET", route="/api/flows", status_class="4xx") == 1
    assert value(s, name, method="GET", route="/api/flows/{flow_id}", status_class="4xx") == 1
    assert value(s, name, method="GET", route="/healthz", status_class="2xx") == 1
    assert value(s, name, method="GET", route="unmatched", status_class="4xx") == 1
    bucket = "proxyfleet_api_request_duration_seconds_bucket"
    assert value(s, bucket, method="GET", route="/api/flows", status_class="2xx", le="+Inf") == 2
    assert value(s, "proxyfleet_api_requests_in_flight") == 1  # the scrape itself
    store = "proxyfleet_api_store_request_duration_seconds_count"
    assert value(s, store, verb="list", outcome="ok") == 2
    assert value(s, store, verb="get", outcome="error") == 1
    assert (
        value(s, "proxyfleet_api_store_request_duration_seconds_sum", verb="list", outcome="ok") > 0
    )


# -- logs -----------------------------------------------------------------------------------
def _cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        FLEET_DATA_DIR=str(tmp_path / "data"),
        FLEET_NATS_CONNECT_TIMEOUT="5",
        FLEET_LOG_FORMAT="json",
    )
    env.update(extra)
    return env


def _json_lines(stderr: str, service: str) -> list[dict[str, Any]]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "no log lines"
    docs = []
    for line in lines:
        doc = orjson.loads(line)  # every line is one JSON object
        assert isinstance(doc, dict), line
        assert {"time", "level", "service", "logger", "message"} <= doc.keys(), line
        assert doc["service"] == service and doc["time"].endswith("Z")
        assert "trace_id" not in doc and "span_id" not in doc  # no span was current
        docs.append(doc)
    return docs


def test_proxy_cli_logs_json_lines(nats_url: str, tmp_path: Path) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    env = _cli_env(
        tmp_path,
        FLEET_NATS_URL=nats_url,
        FLEET_PROXY_LISTEN=f"127.0.0.1:{free_port()}",
        FLEET_PROXY_METRICS_LISTEN=metrics,
        FLEET_REPLICA_ID=f"json-{os.getpid()}",
    )
    proc = subprocess.Popen(
        [str(BIN / "proxyfleet"), "proxy"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert f"metrics: http://{metrics}/metrics" in banner, banner
        text = httpx.get(f"http://{metrics}/metrics", trust_env=False, timeout=5).text
        assert "proxyfleet_proxy_active_connections 0.0" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    docs = _json_lines(err, "proxy")
    messages = [d["message"] for d in docs]
    assert any(m.startswith("listener started on") for m in messages), messages
    assert any(m.startswith("metrics on http://") for m in messages), messages
    assert any("stopped" in m for m in messages), messages
    assert {d["level"] for d in docs} <= {"INFO", "WARNING"}


@pytest.mark.parametrize(
    ("extra", "code", "needle"),
    [
        ({"FLEET_PROXY_LISTEN": "nonsense"}, 2, "FLEET_PROXY_LISTEN"),
        ({"FLEET_NATS_CONNECT_TIMEOUT": "1"}, 1, "NATS unreachable"),
    ],
)
def test_proxy_cli_start_failure_is_a_json_line(
    tmp_path: Path, extra: dict[str, str], code: int, needle: str
) -> None:
    settings = {"FLEET_PROXY_LISTEN": f"127.0.0.1:{free_port()}", **extra}
    env = _cli_env(tmp_path, FLEET_NATS_URL=f"nats://127.0.0.1:{free_port()}", **settings)
    res = subprocess.run(
        [str(BIN / "proxyfleet"), "proxy"], env=env, capture_output=True, text=True, timeout=30
    )
    assert res.returncode == code, res.stderr
    docs = _json_lines(res.stderr, "proxy")
    assert docs[-1]["level"] == "ERROR" and needle in docs[-1]["message"], docs


def test_api_cli_logs_json_lines_and_never_a_request_or_key(nats_url: str, tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    key = "obs-admin-secret-0123456789"
    env = _cli_env(
        tmp_path,
        FLEET_NATS_URL=nats_url,
        FLEET_API_LISTEN=listen,
        FLEET_API_KEYS=f"ops:admin:{key}",
    )
    proc = subprocess.Popen(
        [str(BIN / "proxyfleet"), "api"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline()
        assert f"http://{listen}" in banner, proc.communicate(timeout=10)
        with httpx.Client(base_url=f"http://{listen}", trust_env=False, timeout=5) as client:
            for _ in range(5):
                ok = client.get("/api/proxy/status", headers={"X-API-Key": key})
                assert ok.status_code == 200
                bearer = client.get("/api/config", headers={"Authorization": f"Bearer {key}"})
                assert bearer.status_code in (200, 404)
            assert (
                client.get("/api/proxy/status", headers={"X-API-Key": "wrong" * 4}).status_code
                == 401
            )
            text = client.get("/metrics").text
        assert 'route="/api/proxy/status",status_class="2xx"} 5.0' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    docs = _json_lines(err, "api")
    assert key not in err and "wrong" not in err
    assert not [d for d in docs if "/api/" in d["message"]], docs  # no access log lines
    assert len(docs) < 15, docs
