"""Spans of proxied flows; the relay calls into here only while tracing is on.

With tracing off the relay checks ``telemetry.ENABLED`` once per flow (when it
records the flow) and ``Exchange.span is None`` where a flow ends or connects
upstream; nothing in this module runs and request heads are relayed untouched.

With tracing on, a flow is one SERVER span ``proxy <method>`` from its request
head to its end, continuing the client's trace when the request carries a
``traceparent`` (``tracestate`` kept). The upstream request carries a
``traceparent`` naming the flow's span instead of the client's. A fresh upstream
connection adds ``upstream connect`` (TCP) and ``tls handshake`` child spans.
The flow keeps its ``trace_id`` and ``traceparent`` for its event: the publisher
links its batch span to them and the store continues each flow's trace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, StatusCode

from libs.common import telemetry
from services.proxy.flow import COMPLETED

if TYPE_CHECKING:
    import ssl

    from services.proxy.http1 import Exchange, UpstreamConnection

TRACER = "proxyfleet.proxy"
_TRACE_HEADERS = (b"traceparent:", b"tracestate:")


def _client_context(headers: list[tuple[bytes, bytes]]) -> tuple[Context | None, bool]:
    """The client's trace context from its request headers, and whether it sent any."""
    carrier: dict[str, str] = {}
    for name, value in headers:
        if len(name) in (10, 11):
            lname = name.lower()
            if lname == b"traceparent" or lname == b"tracestate":
                carrier[lname.decode()] = value.decode("latin-1")
    if not carrier:
        return None, False
    return telemetry.W3C.extract(carrier), True


def _strip_trace_headers(head: bytes) -> bytes:
    lines = head.split(b"\r\n")
    return b"\r\n".join(ln for ln in lines if not ln.lower().startswith(_TRACE_HEADERS))


def start_flow(ex: Exchange) -> None:
    """Open the flow's span, name it in the flow, and put it in the upstream head."""
    flow = ex.flow
    parent, had_context = _client_context(flow.req_headers)
    method = flow.method.decode("latin-1")
    span = telemetry.tracer(TRACER).start_span(
        f"proxy {method}" if method else "proxy",
        context=parent,
        kind=SpanKind.SERVER,
        start_time=int(flow.t_start * 1e9),
    )
    ex.span = span
    ctx = span.get_span_context()
    trace_id = flow.trace_id = f"{ctx.trace_id:032x}"
    flow.traceparent = f"00-{trace_id}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    if span.is_recording():
        # few attributes: the exporter's cost grows with each one (the flow record has it all)
        span.set_attributes(
            {
                "http.request.method": method,
                "url.scheme": flow.scheme,
                "url.path": flow.path.split(b"?", 1)[0].decode("latin-1"),  # no query: secrets
                "server.address": flow.host,
                "server.port": flow.port,
                "proxyfleet.flow.id": flow.id,
            }
        )
    head = ex.head
    if head[-4:] == b"\r\n\r\n":  # an HTTP request head (not CONNECT, not a refusal)
        if had_context:
            head = _strip_trace_headers(head)
        extra = b"traceparent: " + flow.traceparent.encode() + b"\r\n"
        if ctx.trace_state:
            extra += b"tracestate: " + ctx.trace_state.to_header().encode() + b"\r\n"
        ex.head = head[:-2] + extra + b"\r\n"


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


async def connect(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], UpstreamConnection],
    host: str,
    port: int,
    sslctx: ssl.SSLContext | None,
    flow_span: Span,
) -> UpstreamConnection:
    """``loop.create_connection`` for a traced flow, with the TCP connect and the TLS
    handshake (``start_tls``) as two child spans of the flow's span."""
    tracer = telemetry.tracer(TRACER)
    parent = trace.set_span_in_context(flow_span)
    target: dict[str, Any] = {"server.address": host, "server.port": port}
    with tracer.start_as_current_span(
        "upstream connect", context=parent, kind=SpanKind.CLIENT, attributes=target
    ) as span:
        transport, up = await loop.create_connection(factory, host, port)
        if span.is_recording() and up.server_addr:
            span.set_attribute("network.peer.address", str(up.server_addr[0]))
    if sslctx is None:
        return up
    try:
        with tracer.start_as_current_span(
            "tls handshake", context=parent, kind=SpanKind.CLIENT, attributes=target
        ) as span:
            tls = await loop.start_tls(transport, up, sslctx, server_hostname=host)
            if tls is None:
                raise ConnectionResetError("upstream closed the connection during TLS handshake")
            if span.is_recording():
                ssl_object = tls.get_extra_info("ssl_object")
                if ssl_object is not None:
                    span.set_attribute("tls.protocol.version", str(ssl_object.version()))
                    span.set_attribute("tls.cipher", str(ssl_object.cipher()[0]))
    except BaseException:
        transport.abort()
        raise
    up.transport = tls
    return up
