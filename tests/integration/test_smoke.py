"""A first end-to-end check: one GET through the proxy is relayed and recorded."""

from __future__ import annotations

import httpx

from tests.integration.harness import FlowEvents, ProxyUnderTest, Upstream


async def test_get_is_relayed_and_recorded(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        resp = await client.get(f"{upstream.http}/echo/hello?x=1")
    assert resp.status_code == 200
    assert resp.json()["path"] == "/echo/hello?x=1"
    event = await flows.final_for("/echo/hello?x=1")
    assert event["event"] == "completed"
    assert event["state"] == "completed"
    assert event["method"] == "GET"
    assert event["host"] == "127.0.0.1"
    assert event["port"] == upstream.http_port
    assert event["response"]["status"] == 200
    assert event["replica"] == proxy.id
