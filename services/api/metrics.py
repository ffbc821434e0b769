"""The management API's Prometheus metrics and its ``GET /metrics`` route.

``/metrics`` needs no API key, like ``/healthz``: Prometheus scrapers usually
carry none, and the exposition holds only route templates, counts and timings
(no flow data, no hosts, no keys). A deployment that must hide it keeps the API
port private or filters ``/metrics`` at its ingress.

Each app has a registry of its own (tests build several apps per process). The
middleware is plain ASGI: per request one timer, one gauge up and down, one
histogram observation labelled with the route *template* (``/api/flows/{flow_id}``,
never the raw path, so that ids cannot blow up the label set).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from libs.common.metrics import METRICS_PATH, exposition

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UNMATCHED = "unmatched"


class ApiMetrics:
    """The API's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Histogram(
            "proxyfleet_api_request_duration_seconds",
            "API requests by method, route template and status class: time to the end of "
            "the response (an SSE stream counts when it ends)",
            ["method", "route", "status_class"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "proxyfleet_api_requests_in_flight",
            "API requests being handled now (open SSE streams included)",
            registry=self.registry,
        )
        self.store_requests = Histogram(
            "proxyfleet_api_store_request_duration_seconds",
            "NATS request/reply round trips to the flow store, by verb and outcome "
            "(ok, error: the store answered with an error, timeout, no_store)",
            ["verb", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_store(self, verb: str, outcome: str, seconds: float) -> None:
        self.store_requests.labels(verb, outcome).observe(seconds)


def _route_templates(app: Any) -> dict[int, str]:
    """id(route) -> its full path template, prefixes of included routers included.

    FastAPI sets ``scope["route"]`` to the route as its router declared it
    (``/{flow_id}``); the template with every prefix (``/api/flows/{flow_id}``)
    comes from the app's effective routes.
    """
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # a FastAPI that flattens included routes: their path is complete
        return {}
    if app is None:
        return {}
    return {id(rc.original_route): rc.path for rc in iter_route_contexts(app.routes) if rc.path}


class MetricsMiddleware:
    """Times every HTTP request (pure ASGI: no per-request task or body buffering)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self._templates: dict[int, str] = {}

    def _template(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is None:
            return UNMATCHED
        key = id(route)  # routes live as long as the app: ids are not reused meanwhile
        template = self._templates.get(key)
        if template is None:  # first request to this route (or routes added since)
            self._templates.update(_route_templates(scope.get("app")))
            found = self._templates.get(key) or getattr(route, "path", None)
            template = found if isinstance(found, str) and found else UNMATCHED
            self._templates[key] = template
        return template

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts: an exception the app did not answer

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics = self.metrics
        start = time.perf_counter()
        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            metrics.in_flight.dec()
            method = scope.get("method", "GET")
            metrics.requests.labels(
                method if method in _METHODS else "other",
                self._template(scope),
                f"{status // 100}xx",
            ).observe(time.perf_counter() - start)


router = APIRouter(tags=["metrics"])


@router.get(METRICS_PATH, include_in_schema=False)
async def metrics_endpoint(request: Request) -> Response:
    """Prometheus exposition of this API process (no API key needed)."""
    metrics: ApiMetrics = request.app.state.metrics
    body, content_type = exposition(metrics.registry, request.headers.get("accept", ""))
    return Response(body, media_type=content_type)
