"""An open live stream ends when its key is revoked, or when the web UI session that opened
it signs out (on any replica): the API on a real uvicorn server and a real NATS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from services.api import sse as sse_module
from services.api.ui.sessions import COOKIE_NAME
from tests.integration.sse import ApiServer, SSEClient, serve_api, sse
from tests.unit.test_api_support import ADMIN, ADMIN_KEY, api_settings

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def server(nats_url: str, tmp_path: Path) -> AsyncIterator[ApiServer]:
    async with serve_api(api_settings(nats_url, tmp_path / "api")) as running:
        yield running


async def _audited(api: httpx.AsyncClient) -> None:
    """One audit event (no replica: 503, audited all the same)."""
    assert (await api.post("/api/proxy/start", headers=ADMIN)).status_code == 503


async def _first_audit(stream: SSEClient) -> dict[str, object]:
    while True:
        event = await stream.next()
        if event.event == "message":
            data: dict[str, object] = event.json()["data"]
            return data


async def test_a_revoked_keys_open_streams_end(server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as api:
        made = await api.post("/api/keys", headers=ADMIN, json={"scope": "read", "name": "tv"})
        secret, key_id = made.json()["secret"], made.json()["id"]
        mine = {"X-API-Key": secret}
        params = {"type": "audit"}
        async with (
            sse(server.url, "/api/events/stream", mine, params) as events,
            sse(server.url, "/api/flows/stream", mine) as flows,
        ):
            assert (await events.next()).event == "connected"
            assert (await flows.next()).event == "connected"
            await _audited(api)
            assert (await _first_audit(events))["path"] == "/api/proxy/start"  # it works
            assert (await api.delete(f"/api/keys/{key_id}", headers=ADMIN)).status_code == 204
            await _audited(api)
            with pytest.raises(EOFError):  # ended, and the new event was not sent to it
                await _first_audit(events)
        again = await api.get("/api/events/stream", headers=mine)
        assert again.status_code == 401


async def test_a_signed_out_sessions_open_streams_end(
    server: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sse_module, "SESSION_RECHECK_S", 0.0)
    origin = {"Origin": server.url}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as api:
        login = await api.post("/ui/login", data={"key": ADMIN_KEY}, headers=origin)
        token = login.cookies[COOKIE_NAME]
        api.cookies.clear()
        cookie = {"Cookie": f"{COOKIE_NAME}={token}"}
        page = await api.get("/ui/events", headers=cookie)
        csrf = page.text.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
        async with sse(server.url, "/api/events/stream", cookie, {"type": "audit"}) as events:
            assert (await events.next()).event == "connected"
            await _audited(api)
            assert (await _first_audit(events))["key_id"] == "ops"
            out = await api.post("/ui/logout", headers=cookie, data={"csrf": csrf})
            assert out.status_code == 303
            await _audited(api)
            with pytest.raises(EOFError):
                await _first_audit(events)
