"""OpenTelemetry tracing for every service: one set-up function and a switch.

``setup_tracing(service, replica_id, settings)`` installs an SDK tracer provider
(resource ``service.name`` + ``service.instance.id``, ParentBased(TraceIdRatioBased)
sampling, a BatchSpanProcessor exporting OTLP/HTTP) when an endpoint is
configured (``FLEET_OTLP_ENDPOINT``, else the standard ``OTEL_EXPORTER_OTLP_*``
variables). Otherwise nothing is installed and ``ENABLED`` stays False: the hot
paths (the proxy relay, capture, the bus) check that one module-level boolean
and do no tracing work at all, not even non-recording spans.

Our code takes its tracers from here (``tracer(name)``), never from the global
provider, so tests can ``install()`` an SDK provider with an in-memory exporter
and ``uninstall()`` it again (the global provider can be set once per process).
W3C trace context helpers (``traceparent`` strings) live here too; injecting and
extracting on NATS happens in one place, ``libs.common.bus``.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import re
import threading
import time
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from libs.common.settings import CommonSettings

log = logging.getLogger("proxyfleet.telemetry")

# The switch every hot path checks: True only while an SDK provider is installed.
ENABLED = False

SERVICE_PROXY = "proxyfleet-proxy"
SERVICE_STORE = "proxyfleet-store"
SERVICE_API = "proxyfleet-api"
TRACES_PATH = "/v1/traces"
SHUTDOWN_TIMEOUT = 5.0  # seconds a process waits at exit for its last spans to go out

# SDK loggers that log once per dropped span or failed export: rate-limited (see below).
_NOISY_LOGGERS = (
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
)

_provider: TracerProvider | None = None
_owned = False  # the provider was built by setup_tracing (and is shut down by us)
# Root sampling decided before the SDK is asked (``sample_root``): the TraceIdRatioBased
# bound and the id generator that hands the SDK the trace id decided on. None: the
# provider is not ours (tests), every root goes to the SDK.
_root_bound: int | None = None
_ids: Any = None
_MASK64 = (1 << 64) - 1
_tracers: dict[str, trace.Tracer] = {}
W3C = TraceContextTextMapPropagator()


def exporter_endpoint(settings: CommonSettings) -> str | None:
    """The OTLP/HTTP traces URL to export to, or None (tracing off).

    ``FLEET_OTLP_ENDPOINT`` (a base URL such as ``http://jaeger:4318``) wins; then
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (a full URL, used as is); then
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` (a base URL). ``/v1/traces`` is appended to a
    base URL that does not already end with it.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    base = settings.otlp_endpoint
    if not base:
        full = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        if full:
            return full
        base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not base:
        return None
    base = base.rstrip("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


def setup_tracing(service: str, replica_id: str, settings: CommonSettings) -> bool:
    """Install tracing for this process if an endpoint is configured; True if it did.

    With no endpoint nothing is installed (no SDK provider, ``ENABLED`` False).
    The provider is flushed and shut down at exit (``shutdown_tracing``), bounded
    by ``SHUTDOWN_TIMEOUT`` so an unreachable collector cannot hold a stop up.
    """
    endpoint = exporter_endpoint(settings)
    if endpoint is None:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    ratio = settings.trace_sample_ratio
    root = TraceIdRatioBased(ratio)
    ids = _preset_ids()
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: service, SERVICE_INSTANCE_ID: replica_id}),
        sampler=ParentBased(root),
        id_generator=ids,
        shutdown_on_exit=False,  # ours below is bounded
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).addFilter(_RateLimit())
    trace.set_tracer_provider(provider)  # for third-party instrumentation in this process
    install(provider)
    global _owned, _root_bound, _ids
    _owned = True
    _root_bound, _ids = root.bound, ids
    atexit.register(shutdown_tracing)
    log.info("tracing on: %s to %s, sample ratio %g", service, endpoint, ratio)
    return True


class _RateLimit(logging.Filter):
    """Lets each distinct SDK warning through once per ``interval`` seconds, saying how
    many like it were held back: the batch processor logs a line for every span it drops
    when its queue is full, which under load would be a log line per request."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        now = time.monotonic()
        if now - self._last.get(key, float("-inf")) < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            record.msg = f"{key} ({held} more like this in the last {self.interval:g}s)"
        return True


def install(provider: TracerProvider) -> None:
    """Use ``provider`` for our spans and turn the switch on (``setup_tracing``; tests)."""
    global ENABLED, _provider, _owned, _root_bound, _ids
    _provider = provider
    _owned = False
    _root_bound = _ids = None
    _tracers.clear()
    ENABLED = True


def uninstall() -> None:
    """Turn tracing off again (tests); the provider is left to its owner."""
    global ENABLED, _provider, _owned, _root_bound, _ids
    ENABLED = False
    _provider = None
    _owned = False
    _root_bound = _ids = None
    _tracers.clear()


def provider() -> TracerProvider | None:
    """The SDK provider our spans go to, or None when tracing is off."""
    return _provider


def shutdown_tracing(timeout: float = SHUTDOWN_TIMEOUT) -> None:
    """Flush the spans not yet exported and shut the exporter down (at most ``timeout``)."""
    prov, owned = _provider, _owned
    uninstall()
    if prov is None or not owned:
        return
    worker = threading.Thread(target=prov.shutdown, name="otel-shutdown", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        log.warning("tracing: spans not exported within %gs at shutdown were dropped", timeout)


def tracer(name: str) -> trace.Tracer:
    """A tracer of the installed provider (a no-op tracer when tracing is off)."""
    found = _tracers.get(name)
    if found is None:
        if _provider is None:
            return trace.NoOpTracer()
        found = _tracers[name] = _provider.get_tracer(name)
    return found


def sample_root() -> tuple[int, bool]:
    """Decide on a new trace before creating its root span, the way the installed
    ParentBased(TraceIdRatioBased) sampler would: a random trace id, and whether a root
    span with it is sampled.

    A hot path uses this to skip the SDK for the traces it will not sample (they still
    get ids, to propagate). When the answer is True the id is handed to the SDK: the
    next root span started in this process gets it, so call ``start_span`` right away.
    With a provider that ``setup_tracing`` did not build (tests) the answer is
    ``(0, True)``: leave everything to the SDK.
    """
    bound = _root_bound
    if bound is None:
        return 0, True
    trace_id = random.getrandbits(128) or 1
    if trace_id & _MASK64 < bound:
        _ids.preset = trace_id
        return trace_id, True
    return trace_id, False


def _preset_ids() -> Any:
    """The SDK's random id generator, except that a preset trace id is used once."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class PresetIds(RandomIdGenerator):
        preset = 0

        def generate_trace_id(self) -> int:
            trace_id, self.preset = self.preset, 0
            return trace_id or super().generate_trace_id()

    return PresetIds()


# -- W3C trace context -------------------------------------------------------------------
_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def traceparent(ctx: SpanContext) -> str:
    """The ``traceparent`` header value of ``ctx``."""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def span_context(value: str) -> SpanContext | None:
    """The remote span context of a version-00 ``traceparent`` value (as our services
    write them), or None if it is not one. Cheaper than the propagator: a batch names
    up to hundreds of flows."""
    if not _TRACEPARENT.fullmatch(value):
        return None
    ctx = SpanContext(
        int(value[3:35], 16),
        int(value[36:52], 16),
        is_remote=True,
        trace_flags=TraceFlags(int(value[53:], 16)),
    )
    return ctx if ctx.is_valid else None


def parent_context(value: str) -> Context | None:
    """A context whose current span is the remote parent named by ``traceparent``."""
    ctx = span_context(value)
    return None if ctx is None else trace.set_span_in_context(NonRecordingSpan(ctx))


def link(value: str, attributes: dict[str, Any] | None = None) -> Link | None:
    """A span link to the span named by a ``traceparent`` value (None if not valid)."""
    ctx = span_context(value)
    return None if ctx is None else Link(ctx, attributes)


def is_sampled(value: str) -> bool:
    """Whether a ``traceparent`` value (as our services write them) has the sampled flag."""
    return value[-1:] in _ODD_HEX  # the flags' low bit


_ODD_HEX = frozenset("13579bdf")
