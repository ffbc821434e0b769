"""Tracing set-up: which endpoint is used, the settings, the W3C helpers, and what
``setup_tracing`` installs (in a subprocess: the global provider can be set once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from libs.common import telemetry
from libs.common.settings import CommonSettings, SettingsError, load

ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def _no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("OTEL_", "FLEET_")):
            monkeypatch.delenv(name)


def settings(**values: object) -> CommonSettings:
    return CommonSettings(replica_id="r1", **values)  # type: ignore[arg-type]


def test_no_endpoint_means_tracing_off() -> None:
    assert telemetry.exporter_endpoint(settings()) is None
    assert telemetry.setup_tracing("proxyfleet-proxy", "r1", settings()) is False
    assert telemetry.ENABLED is False and telemetry.provider() is None


def test_endpoint_sources_and_the_traces_path(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        telemetry.exporter_endpoint(settings(otlp_endpoint="http://jaeger:4318"))
        == "http://jaeger:4318/v1/traces"
    )
    assert (
        telemetry.exporter_endpoint(settings(otlp_endpoint="http://c:4318/v1/traces/"))
        == "http://c:4318/v1/traces"
    )
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318/")
    assert telemetry.exporter_endpoint(settings()) == "http://otel:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:1/custom")
    assert telemetry.exporter_endpoint(settings()) == "http://t:1/custom"
    # ours wins over the standard variables
    assert (
        telemetry.exporter_endpoint(settings(otlp_endpoint="http://mine:4318"))
        == "http://mine:4318/v1/traces"
    )
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert telemetry.exporter_endpoint(settings(otlp_endpoint="http://mine:4318")) is None


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_OTLP_ENDPOINT", " ")
    assert load(CommonSettings).otlp_endpoint is None
    monkeypatch.setenv("FLEET_OTLP_ENDPOINT", "http://jaeger:4318")
    monkeypatch.setenv("FLEET_TRACE_SAMPLE_RATIO", "0.01")
    s = load(CommonSettings)
    assert s.otlp_endpoint == "http://jaeger:4318" and s.trace_sample_ratio == 0.01
    monkeypatch.setenv("FLEET_OTLP_ENDPOINT", "jaeger:4318")
    with pytest.raises(SettingsError, match="FLEET_OTLP_ENDPOINT"):
        load(CommonSettings)
    monkeypatch.setenv("FLEET_OTLP_ENDPOINT", "http://jaeger:4318")
    monkeypatch.setenv("FLEET_TRACE_SAMPLE_RATIO", "1.5")
    with pytest.raises(SettingsError, match="FLEET_TRACE_SAMPLE_RATIO"):
        load(CommonSettings)


def test_traceparent_helpers() -> None:
    value = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ctx = telemetry.span_context(value)
    assert ctx is not None and ctx.is_remote
    assert telemetry.traceparent(ctx) == value
    assert telemetry.is_sampled(value)
    assert telemetry.is_sampled(value[:-2] + "03")
    assert not telemetry.is_sampled(value[:-2] + "00")
    assert telemetry.span_context("00-" + "0" * 32 + "-b7ad6b7169203331-01") is None
    assert telemetry.link("garbage") is None and telemetry.parent_context("garbage") is None
    found = telemetry.link(value)
    assert found is not None and found.context.span_id == 0xB7AD6B7169203331


def test_setup_installs_a_sampled_provider_with_the_service_resource() -> None:
    code = """
import json
from opentelemetry import trace
from libs.common import telemetry
from libs.common.settings import CommonSettings

s = CommonSettings(replica_id="r1", otlp_endpoint="http://127.0.0.1:9", trace_sample_ratio=0.25)
on = telemetry.setup_tracing("proxyfleet-store", "r1", s)
p = trace.get_tracer_provider()
out = {
    "on": on,
    "enabled": telemetry.ENABLED,
    "same": p is telemetry.provider(),
    "resource": {k: str(v) for k, v in p.resource.attributes.items()},
    "sampler": p.sampler.get_description(),
}
# roots decided before the SDK is asked: the same decision, the same trace id
from opentelemetry.context import Context
from opentelemetry.sdk.trace.sampling import Decision
tracer = telemetry.tracer("t")
agree = kept = 0
for _ in range(2000):
    trace_id, sampled = telemetry.sample_root()
    if sampled:
        span = tracer.start_span("x", context=Context())
        kept += 1
        agree += span.is_recording() and span.get_span_context().trace_id == trace_id
        span.end()
    else:
        decision = p.sampler.should_sample(Context(), trace_id, "x").decision
        agree += decision == Decision.DROP
out["agree"], out["kept"] = agree, kept
telemetry.shutdown_tracing(2.0)
out["after"] = telemetry.ENABLED
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "FLEET_"))}
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["on"] and out["enabled"] and out["same"] and out["after"] is False
    assert out["resource"]["service.name"] == "proxyfleet-store"
    assert out["resource"]["service.instance.id"] == "r1"
    assert out["sampler"].startswith("ParentBased{root:TraceIdRatioBased{0.25}")
    assert out["agree"] == 2000 and 350 < out["kept"] < 650  # ~25% of 2000


def test_repeated_sdk_warnings_are_rate_limited() -> None:
    import logging

    limit = telemetry._RateLimit(interval=60.0)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("sdk", logging.WARNING, __file__, 1, msg, None, None)

    assert limit.filter(record("Queue full, dropping %s."))
    assert not any(limit.filter(record("Queue full, dropping %s.")) for _ in range(5))
    assert limit.filter(record("another warning"))
    limit.interval = 0.0
    again = record("Queue full, dropping %s.")
    assert limit.filter(again)
    assert "(5 more like this" in str(again.msg)
