"""``Annotated`` dependency aliases the routes declare (the FastAPI template's ``deps.py``).

The NATS-facing helpers are built once per process in the lifespan and shared
by every request; a dependency only hands them out, after checking that NATS
is connected (so a request fails fast with 503 instead of waiting out a timeout
while the client reconnects).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from libs.common.bus import Bus
from libs.common.policy import Policy
from libs.common.settings import ApiSettings
from services.api.auth import Principal, authorize
from services.api.config_store import ConfigStore
from services.api.documents import DocumentStore
from services.api.errors import ApiError
from services.api.eventlog import EventLog
from services.api.fleet import Fleet
from services.api.runtime_keys import RuntimeKeys
from services.api.store import StoreClient
from services.api.streams import FlowHub
from services.api.ui.sessions import Sessions


@dataclass(frozen=True, slots=True)
class Services:
    """What the lifespan builds around the one NATS connection."""

    bus: Bus
    fleet: Fleet
    store: StoreClient
    config: ConfigStore
    policy: DocumentStore[Policy]
    events: EventLog
    flow_hub: FlowHub
    keys: RuntimeKeys
    sessions: Sessions


async def get_services(request: Request) -> Services:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None or not services.bus.connected:
        raise ApiError(503, "BUS_UNAVAILABLE", "NATS is not connected; retry shortly")
    return services


async def get_settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


async def _bus(s: Annotated[Services, Depends(get_services)]) -> Bus:
    return s.bus


async def _fleet(s: Annotated[Services, Depends(get_services)]) -> Fleet:
    return s.fleet


async def _store(s: Annotated[Services, Depends(get_services)]) -> StoreClient:
    return s.store


async def _config(s: Annotated[Services, Depends(get_services)]) -> ConfigStore:
    return s.config


async def _policy(s: Annotated[Services, Depends(get_services)]) -> DocumentStore[Policy]:
    return s.policy


async def _events(s: Annotated[Services, Depends(get_services)]) -> EventLog:
    return s.events


async def _flow_hub(s: Annotated[Services, Depends(get_services)]) -> FlowHub:
    return s.flow_hub


async def _keys(s: Annotated[Services, Depends(get_services)]) -> RuntimeKeys:
    return s.keys


BusDep = Annotated[Bus, Depends(_bus)]
KeysDep = Annotated[RuntimeKeys, Depends(_keys)]
FleetDep = Annotated[Fleet, Depends(_fleet)]
StoreDep = Annotated[StoreClient, Depends(_store)]
ConfigDep = Annotated[ConfigStore, Depends(_config)]
PolicyDep = Annotated[DocumentStore[Policy], Depends(_policy)]
EventsDep = Annotated[EventLog, Depends(_events)]
FlowHubDep = Annotated[FlowHub, Depends(_flow_hub)]
SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
# Resolved once per request: the /api router already depends on ``authorize``.
CallerDep = Annotated[Principal, Depends(authorize)]
