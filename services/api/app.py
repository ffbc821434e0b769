"""The FastAPI application factory: routers, auth, problem+json, NATS lifespan.

Nothing is built at import time: ``create_app(settings)`` reads the keys and
the lifespan opens the one NATS connection every request shares (or adopts
one the caller already opened, which is how ``run_api`` reports an unreachable
NATS as a one-line error before serving anything).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi

from libs.common.bus import Bus
from libs.common.settings import ApiSettings
from services.api.auth import KeyRing, authorize
from services.api.config_store import ConfigStore
from services.api.deps import Services
from services.api.errors import install_handlers, openapi_problem_content
from services.api.fleet import Fleet
from services.api.routes import ca, config, flows, health, proxy
from services.api.store import StoreClient

API_VERSION = "0.1.0"
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
        settings.nats_url, f"api {settings.replica_id}", settings.nats_connect_timeout
    )


def create_app(
    settings: ApiSettings, *, bus: Bus | None = None, keyring: KeyRing | None = None
) -> FastAPI:
    """Build the app. ``bus``: an open connection to adopt (the caller closes it)."""
    keys = keyring if keyring is not None else KeyRing.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        active = bus
        if active is None:
            active = await connect_bus(settings)
        app.state.services = Services(
            bus=active,
            fleet=Fleet(active, settings.api_command_timeout),
            store=StoreClient(active, settings.api_store_timeout),
            config=ConfigStore(active),
        )
        try:
            yield
        finally:
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
    install_handlers(app)

    api = APIRouter(prefix="/api", dependencies=[Depends(authorize)])
    for module in (proxy, flows, config, ca):
        api.include_router(module.router)

    async def openapi_document(request: Request) -> dict[str, Any]:
        schema: dict[str, Any] = request.app.openapi()
        return schema

    api.add_api_route(OPENAPI_PATH.removeprefix("/api"), openapi_document, include_in_schema=False)
    app.include_router(api)
    app.include_router(health.router)
    return app
