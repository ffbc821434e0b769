"""Fixtures of the hostile corpus: flow events of any replica a test starts."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.integration.harness import FlowEvents, ProxyUnderTest

Watch = Callable[[ProxyUnderTest], Awaitable[FlowEvents]]


@pytest.fixture
async def watch(nats_url: str) -> AsyncIterator[Watch]:
    """Flow events of a replica started with ``make_proxy`` (on the shared NATS)."""
    readers: list[FlowEvents] = []

    async def _watch(p: ProxyUnderTest) -> FlowEvents:
        events = FlowEvents()
        await events.start(nats_url, p.id)
        readers.append(events)
        return events

    yield _watch
    for events in readers:
        await events.stop()
