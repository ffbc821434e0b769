"""Tracing, the first addon: spans of proxied flows.

With tracing off this addon is not in the chain (``addons.build_chain``) and the
relay only checks ``Exchange.span is None`` where it connects upstream; nothing
in this module runs and request heads are relayed untouched.

With tracing on, a flow is one SERVER span ``proxy <method>`` from its request
head to its end, continuing the client's trace when the request carries a
``traceparent`` (``tracestate`` kept). The upstream request carries a
``traceparent`` naming the flow's span instead of the client's. A fresh upstream
connection adds ``upstream connect`` (TCP) and ``tls handshake`` child spans.
The flow keeps its ``trace_id`` and ``traceparent`` for its event: the publisher
links its batch span to them and the store continues each flow's trace. Sampling
is decided before the SDK is asked: a flow whose trace is not sampled only gets
ids (propagated upstream and recorded), no span.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from random import getrandbits
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanContext, SpanKind, StatusCode, TraceFlags

from libs.common import telemetry
from services.proxy.flow import COMPLETED
from services.proxy.hooks import Addon

if TYPE_CHECKING:
    from services.proxy.exchange import Exchange

TRACER = "proxyfleet.proxy"
_TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})
_ROOT = Context()  # a flow without a client trace starts a new one, whatever is current
_UNSAMPLED_ROOT = TraceFlags(TraceFlags.RANDOM_TRACE_ID)


def _client_context(headers: list[tuple[bytes, bytes]]) -> Context | None:
    """The client's trace context from its request headers (None if it sent none)."""
    carrier: dict[str, str] | None = None
    for name, value in headers:
        if 9 < len(name) < 12:
            lname = name.lower()
            if lname == b"traceparent" or lname == b"tracestate":
                if carrier is None:
                    carrier = {}
                carrier[lname.decode()] = value.decode("latin-1")
    return None if carrier is None else telemetry.W3C.extract(carrier)


_names: dict[bytes, str] = {}  # span name by request method


def _span_name(method: bytes) -> str:
    name = _names.get(method)
    if name is None:
        name = f"proxy {method.decode('latin-1')}" if method else "proxy"
        if len(_names) < 64:  # methods come from a small fixed set (llhttp)
            _names[method] = name
    return name


def _unsampled(parent: Context | None, trace_id: int) -> SpanContext:
    """The ids of a flow whose trace is not sampled (no SDK span: nothing is recorded)."""
    span_id = getrandbits(64) or 1
    if parent is None:  # a new trace; flags as the SDK sets them (random trace id)
        return SpanContext(trace_id, span_id, False, _UNSAMPLED_ROOT)
    pctx = trace.get_current_span(parent).get_span_context()
    return SpanContext(pctx.trace_id, span_id, False, pctx.trace_flags, pctx.trace_state)


def start_flow(ex: Exchange) -> None:
    """Open the flow's span, name it in the flow, and put it in the upstream head.

    Sampling is decided first, so that a flow whose trace is not sampled never reaches
    the SDK (the common case at low ratios): it only gets ids, to propagate upstream.
    """
    flow = ex.flow
    parent = _client_context(flow.req_headers)
    if parent is None:
        trace_id, sampled = telemetry.sample_root()
    else:
        trace_id = 0
        pctx = trace.get_current_span(parent).get_span_context()
        sampled = not pctx.is_valid or pctx.trace_flags.sampled
    if sampled:
        span = telemetry.tracer(TRACER).start_span(
            _span_name(flow.method),
            context=parent if parent is not None else _ROOT,
            kind=SpanKind.SERVER,
            start_time=int(flow.t_start * 1e9),
        )
        ex.span = span
        ctx = span.get_span_context()
    else:
        span = None
        ctx = _unsampled(parent, trace_id)
    trace_hex = flow.trace_id = f"{ctx.trace_id:032x}"
    traceparent = flow.traceparent = f"00-{trace_hex}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    if span is not None and span.is_recording():
        # few attributes: the exporter's cost grows with each one (the flow record has it all)
        span.set_attributes(
            {
                "http.request.method": flow.method.decode("latin-1"),
                "url.scheme": flow.scheme,
                "url.path": flow.path.split(b"?", 1)[0].decode("latin-1"),  # no query: secrets
                "server.address": flow.host,
                "server.port": flow.port,
                "proxyfleet.flow.id": flow.id,
            }
        )
    if flow.method == b"CONNECT":
        return
    headers = flow.req_headers
    if parent is not None:  # the client's trace headers are replaced by ours
        headers[:] = [(n, v) for n, v in headers if n.lower() not in _TRACE_HEADERS]
    headers.append((b"traceparent", traceparent.encode()))
    if parent is not None and ctx.trace_state:
        headers.append((b"tracestate", ctx.trace_state.to_header().encode()))


def end_flow(ex: Exchange) -> None:
    """Close the flow's span with its outcome (the flow has just finished)."""
    span, ex.span = ex.span, None
    if span is None:
        return
    flow = ex.flow
    if span.is_recording():
        if flow.status:
            span.set_attribute("http.response.status_code", flow.status)
        if flow.kind != "http":
            span.set_attribute("proxyfleet.flow.kind", flow.kind)
        if flow.state != COMPLETED:  # error or killed
            span.set_attribute("error.type", flow.state)
            span.set_status(StatusCode.ERROR, flow.error)
        elif flow.status >= 500:
            span.set_attribute("error.type", str(flow.status))
            span.set_status(StatusCode.ERROR)
    span.end(int(flow.t_end * 1e9) if flow.t_end else None)


class Tracing(Addon):
    """One span per flow: opened at the request head, closed when the flow ends."""

    name = "tracing"

    def request_head(self, ex: Exchange) -> None:
        start_flow(ex)

    def response_end(self, ex: Exchange) -> None:
        end_flow(ex)

    def error(self, ex: Exchange) -> None:
        end_flow(ex)


class ConnectSpans:
    """The ``upstream connect`` and ``tls handshake`` child spans of a flow's span."""

    def __init__(self, flow_span: Span, host: str, port: int) -> None:
        self.tracer = telemetry.tracer(TRACER)
        self.parent = trace.set_span_in_context(flow_span)
        self.target: dict[str, Any] = {"server.address": host, "server.port": port}
        self.span: Span | None = None

    @contextlib.contextmanager
    def tcp(self) -> Iterator[None]:
        with self.tracer.start_as_current_span(
            "upstream connect", context=self.parent, kind=SpanKind.CLIENT, attributes=self.target
        ):
            yield

    @contextlib.contextmanager
    def tls(self) -> Iterator[None]:
        with self.tracer.start_as_current_span(
            "tls handshake", context=self.parent, kind=SpanKind.CLIENT, attributes=self.target
        ) as span:
            self.span = span
            yield

    def tls_done(self, transport: Any) -> None:
        span = self.span
        if span is not None and span.is_recording():
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                span.set_attribute("tls.protocol.version", str(ssl_object.version()))
                span.set_attribute("tls.cipher", str(ssl_object.cipher()[0]))


def connect_spans(flow_span: Span, host: str, port: int) -> ConnectSpans:
    return ConnectSpans(flow_span, host, port)
