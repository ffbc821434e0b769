"""Fixtures for integration tests: a test CA, upstream servers, proxy replicas."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from libs.common.settings import StoreSettings
from services.proxy.main import Replica
from services.proxy.tls import CertificateAuthority
from services.store.main import Store
from tests.integration.harness import FlowEvents, ProxyUnderTest, Upstream, proxy_settings
from tests.unit.test_api_support import api_client, api_settings


@pytest.fixture(scope="session")
def upstream_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """The CA that signs the upstream servers' certificates (not the proxy's CA)."""
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("upstream-ca"))


@pytest.fixture
async def upstream(upstream_ca: CertificateAuthority) -> AsyncIterator[Upstream]:
    server = Upstream(upstream_ca)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


MakeProxy = Callable[..., Awaitable[ProxyUnderTest]]


@pytest.fixture
async def make_proxy(
    nats_url: str, tmp_path: Path, upstream_ca: CertificateAuthority
) -> AsyncIterator[MakeProxy]:
    """Start in-process replicas (settings overridable); all are stopped at teardown."""
    started: list[Replica] = []

    async def _make(**overrides: Any) -> ProxyUnderTest:
        data_dir = overrides.pop("data_dir", tmp_path / f"proxy{len(started)}")
        url = overrides.pop("nats_url", nats_url)
        replica = Replica(proxy_settings(url, data_dir, upstream_ca.cert_path, **overrides))
        await replica.start()
        started.append(replica)
        return ProxyUnderTest(replica)

    yield _make
    for replica in started:
        if replica.server is not None and replica.bus is not None and not replica.bus.nc.is_closed:
            await replica.stop(drain=0.5)


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> ProxyUnderTest:
    """One replica with default settings."""
    return await make_proxy()


@pytest.fixture
async def api(nats_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A management API app (in-process, lifespan run) on ``nats_url``, with an admin key."""
    settings = api_settings(nats_url, tmp_path / "api", api_config_apply_wait=3.0)
    async with api_client(settings) as client:
        yield client


@pytest.fixture
async def store(nats_url: str, tmp_path: Path) -> AsyncIterator[Store]:
    """A flow store (SQLite under ``tmp_path``) on ``nats_url``, started and stopped."""
    s = Store(
        StoreSettings.model_validate(
            {
                "nats_url": nats_url,
                "data_dir": tmp_path / "store",
                "replica_id": "store0",
                "nats_connect_timeout": 5.0,
            }
        )
    )
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
async def flows(nats_url: str, proxy: ProxyUnderTest) -> AsyncIterator[FlowEvents]:
    """The flow events the ``proxy`` replica publishes."""
    events = FlowEvents()
    await events.start(nats_url, proxy.id)
    try:
        yield events
    finally:
        await events.stop()


Watch = Callable[[ProxyUnderTest], Awaitable[FlowEvents]]


@pytest.fixture
async def watch(nats_url: str) -> AsyncIterator[Watch]:
    """Flow events of any replica started with ``make_proxy`` (on the shared NATS)."""
    readers: list[FlowEvents] = []

    async def _watch(p: ProxyUnderTest) -> FlowEvents:
        events = FlowEvents()
        await events.start(nats_url, p.id)
        readers.append(events)
        return events

    yield _watch
    for events in readers:
        await events.stop()
