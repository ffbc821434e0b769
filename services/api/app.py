"""The FastAPI application factory: routers, auth, problem+json, NATS lifespan.

Nothing is built at import time: ``create_app(settings)`` reads the keys and
the lifespan opens the one NATS connection every request shares (or adopts
one the caller already opened, which is how ``run_api`` reports an unreachable
NATS as a one-line error before serving anything).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import fastapi_swagger
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles

from libs.common import telemetry
from libs.common.bus import Bus
from libs.common.settings import ApiSettings
from services.api.audit import AuditMiddleware
from services.api.auth import KeyRing, authorize
from services.api.config_store import ConfigStore
from services.api.deps import Services
from services.api.documents import POLICY, DocumentStore
from services.api.errors import install_handlers, openapi_problem_content
from services.api.eventlog import EventLog
from services.api.fleet import Fleet
from services.api.keyshare import publish_key_digests
from services.api.metrics import ApiMetrics, MetricsMiddleware
from services.api.metrics import router as metrics_router
from services.api.querycheck import known_query
from services.api.routes import (
    approvals,
    ca,
    config,
    events,
    filters,
    flows,
    har,
    health,
    live,
    logs,
    policy,
    proxy,
    replay,
)
from services.api.routes import (
    keys as keys_routes,
)
from services.api.runtime_keys import RuntimeKeys
from services.api.store import StoreClient
from services.api.streams import FlowHub
from services.api.ui import routes as ui_routes
from services.api.ui.sessions import Sessions, SessionsUnavailable

log = logging.getLogger("proxyfleet.api")

API_VERSION = "0.1.0"
# Swagger UI 5, from the pinned fastapi-swagger wheel (served from the package, no CDN)
SWAGGER_ASSETS = Path(fastapi_swagger.__file__).parent / "resources"
OPENAPI_PATH = "/api/openapi.json"


class ManagementAPI(FastAPI):
    """FastAPI whose OpenAPI document says problem+json wherever errors are returned."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = get_openapi(
                title=self.title,
                version=self.version,
                description=self.description,
                routes=self.routes,
            )
            self.openapi_schema = openapi_problem_content(schema)
        return self.openapi_schema


async def connect_bus(settings: ApiSettings) -> Bus:
    """The API's NATS connection (retried up to ``FLEET_NATS_CONNECT_TIMEOUT``)."""
    return await Bus.connect(
        settings.nats_url,
        f"api {settings.replica_id}",
        settings.nats_connect_timeout,
        replicas=settings.nats_replicas,
    )


def instrument(app: FastAPI) -> None:
    """A SERVER span per API request (OpenTelemetry FastAPI instrumentation); the NATS
    requests a route makes inherit its context (``Bus.request`` injects it)."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(
        app,
        tracer_provider=telemetry.provider(),
        excluded_urls="/healthz,/readyz,/metrics",
        exclude_spans=["receive", "send"],
    )


def create_app(
    settings: ApiSettings, *, bus: Bus | None = None, keyring: KeyRing | None = None
) -> FastAPI:
    """Build the app. ``bus``: an open connection to adopt (the caller closes it)."""
    keys = keyring if keyring is not None else KeyRing.from_settings(settings)
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        active = bus
        if active is None:
            active = await connect_bus(settings)
        app.state.services = Services(
            bus=active,
            fleet=Fleet(active, settings.api_command_timeout),
            store=StoreClient(active, settings.api_store_timeout, metrics),
            config=ConfigStore(active),
            policy=DocumentStore(active, POLICY),
            events=EventLog(active),
            flow_hub=FlowHub(active, settings.api_stream_queue_size),
            keys=RuntimeKeys(active, lambda found: keys.set_runtime([k.spec() for k in found])),
            sessions=Sessions(active, settings.ui_session_ttl),
        )
        runtime = app.state.services.keys
        keys.on_use = runtime.touch
        await runtime.start()
        try:
            await active.ensure_streams()  # the event log and audit records need EVENTS
        except Exception as exc:
            log.warning("cannot create the JetStream streams: %r", exc)
        # proxies mask these keys in recorded traffic (bounded, never fails start-up)
        await publish_key_digests(active, keys.static)
        try:
            yield
        finally:
            keys.on_use = None
            await runtime.stop()
            await app.state.services.flow_hub.stop()
            app.state.services = None
            if bus is None:
                await active.close()

    app = ManagementAPI(
        title="proxyfleet management API",
        version=API_VERSION,
        description="Lifecycle, flows and configuration of a proxyfleet. Every /api route "
        "needs an API key (X-API-Key or Authorization: Bearer); GET needs scope read, "
        "everything else admin. Errors are RFC 9457 application/problem+json.",
        lifespan=lifespan,
        openapi_url=None,  # served below, behind the API key like every /api route
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.keyring = keys
    app.state.services = None
    app.state.metrics = metrics
    install_handlers(app)
    app.add_exception_handler(SessionsUnavailable, ui_routes.sessions_unavailable)
    if telemetry.ENABLED:
        instrument(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(AuditMiddleware)

    # the key first (a bad key is a 401 whatever the query), then the query's names
    api = APIRouter(prefix="/api", dependencies=[Depends(authorize), Depends(known_query)])
    # live and har before flows: /flows/stream and /flows/har are not flow ids
    routers = (
        proxy,
        live,
        har,
        flows,
        replay,
        filters,
        config,
        policy,
        ca,
        events,
        approvals,
        logs,
        keys_routes,
    )
    for module in routers:
        api.include_router(module.router)

    async def openapi_document(request: Request) -> dict[str, Any]:
        schema: dict[str, Any] = request.app.openapi()
        return schema

    api.add_api_route(OPENAPI_PATH.removeprefix("/api"), openapi_document, include_in_schema=False)
    app.include_router(api)
    app.include_router(ui_routes.router)
    app.mount("/ui/static", StaticFiles(directory=ui_routes.STATIC_DIR), name="ui-static")
    app.mount("/api/docs/assets", StaticFiles(directory=SWAGGER_ASSETS), name="api-docs-assets")
    app.include_router(health.router)
    app.include_router(metrics_router)  # /metrics: no API key, like /healthz
    return app


def end_streams(app: FastAPI) -> None:
    """Tell the open SSE streams to end (the server is shutting down gracefully)."""
    services: Services | None = getattr(app.state, "services", None)
    if services is not None:
        services.flow_hub.close()
