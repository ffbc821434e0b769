"""Web UI sessions on in-process API replicas over a real NATS: what a hostile page, a
stolen or stale cookie, a forged form or a revoked key can and cannot do."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest

from libs.common.bus import Bus
from libs.common.natsserver import EmbeddedNats
from libs.common.settings import ApiSettings, SettingsError, load
from services.api.ui.routes import HOME, safe_next
from services.api.ui.sessions import COOKIE_NAME, CSRF_HEADER, Sessions
from tests.unit.test_api_support import (
    ADMIN,
    ADMIN_KEY,
    READ_KEY,
    api_client,
    api_settings,
    eventually,
)

ORIGIN = {"Origin": "http://api.test"}


@pytest.fixture
async def two_apis(
    nats_url: str, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    a_settings = api_settings(nats_url, tmp_path / "a", replica_id="ui-a")
    b_settings = api_settings(nats_url, tmp_path / "b", replica_id="ui-b")
    async with api_client(a_settings) as a, api_client(b_settings) as b:
        yield a, b


def cookie_of(token: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE_NAME}={token}"}


async def _sign_in(client: httpx.AsyncClient, key: str) -> tuple[str, str]:
    """Sign in through the form; the session token and the page's CSRF token."""
    r = await client.post("/ui/login", data={"key": key, "next": "/ui/keys"}, headers=ORIGIN)
    assert r.status_code == 303 and r.headers["location"] == "/ui/keys", r.text
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert key not in cookie
    token = r.cookies[COOKIE_NAME]
    client.cookies.clear()  # each request below names the session it uses
    page = await client.get("/ui/keys", headers=cookie_of(token))
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    csrf = page.text.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
    return token, csrf


async def test_a_session_works_on_every_replica_and_needs_its_csrf_token(
    two_apis: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    a, b = two_apis
    token, csrf = await _sign_in(a, ADMIN_KEY)
    jar = cookie_of(token)
    assert (await b.get("/api/keys", headers=jar)).status_code == 200  # another replica
    body = {"scope": "read", "name": "from the ui"}
    no_token = await b.post("/api/keys", headers=jar, json=body)
    assert no_token.status_code == 403 and no_token.json()["code"] == "CSRF_FAILED"
    wrong = await b.post("/api/keys", json=body, headers={**jar, CSRF_HEADER: csrf + "x"})
    assert wrong.status_code == 403
    made = await b.post("/api/keys", json=body, headers={**jar, CSRF_HEADER: csrf})
    assert made.status_code == 201 and made.json()["created_by"] == "ops"
    # a presented key wins over the cookie (scripts and the CLI keep working as before)
    assert (await a.get("/api/keys", headers={**jar, "X-API-Key": "nope"})).status_code == 401


async def test_a_read_session_cannot_act_and_a_revoked_key_ends_its_sessions(
    two_apis: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    a, b = two_apis
    token, csrf = await _sign_in(a, READ_KEY)
    jar = cookie_of(token)
    hdr = {**jar, CSRF_HEADER: csrf}
    refused = await a.delete("/api/approvals/cached", headers=hdr)
    assert refused.status_code == 403 and refused.json()["code"] == "AUTH_FORBIDDEN"
    page = await a.get("/ui/flows", headers=jar)
    assert 'data-scope="read"' in page.text

    made = await a.post("/api/keys", headers=ADMIN, json={"scope": "admin", "name": "temp"})
    secret, key_id = made.json()["secret"], made.json()["id"]
    token, _ = await _sign_in(a, secret)
    assert (await b.get("/api/keys", headers=cookie_of(token))).status_code == 200
    assert (await a.delete(f"/api/keys/{key_id}", headers=ADMIN)).status_code == 204
    gone = await a.get("/api/keys", headers=cookie_of(token))
    assert gone.status_code == 401  # at once where it was revoked
    page = await a.get("/ui/flows", headers=cookie_of(token))
    assert page.status_code == 303 and page.headers["location"].startswith("/ui/login?next=")


async def test_sign_in_refuses_bad_keys_foreign_origins_and_keeps_no_secret(
    two_apis: tuple[httpx.AsyncClient, httpx.AsyncClient], caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = two_apis
    bad = await a.post("/ui/login", data={"key": "guess"}, headers=ORIGIN)
    assert bad.status_code == 401 and COOKIE_NAME not in bad.headers.get("set-cookie", "")
    assert "guess" not in bad.text
    forged = await a.post(
        "/ui/login", data={"key": ADMIN_KEY}, headers={"Origin": "https://evil.example"}
    )
    assert forged.status_code == 403 and "set-cookie" not in forged.headers
    null_origin = await a.post("/ui/login", data={"key": ADMIN_KEY}, headers={"Origin": "null"})
    assert null_origin.status_code == 403
    huge = await a.post("/ui/login", data={"key": "k" * 5000}, headers=ORIGIN)
    assert huge.status_code == 422
    token, _ = await _sign_in(a, ADMIN_KEY)
    assert ADMIN_KEY not in caplog.text and token not in caplog.text
    for cookie in ("", "x" * 500, "../../etc", token + "x"):
        r = await a.get("/api/keys", headers=cookie_of(cookie))
        assert r.status_code == 401, cookie


async def test_sign_out_ends_the_session_everywhere_and_needs_the_page_token(
    two_apis: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    a, b = two_apis
    token, csrf = await _sign_in(a, ADMIN_KEY)
    jar = cookie_of(token)
    forged = await b.post("/ui/logout", headers=jar, data={"csrf": "guess"})
    assert forged.status_code == 403
    assert (await a.get("/api/keys", headers=jar)).status_code == 200  # still signed in
    out = await b.post("/ui/logout", headers=jar, data={"csrf": csrf})
    assert out.status_code == 303 and f'{COOKIE_NAME}=""' in out.headers["set-cookie"]
    assert (await a.get("/api/keys", headers=jar)).status_code == 401


async def test_an_expired_or_forged_session_entry_is_refused(nats_url: str) -> None:
    bus = await Bus.connect(nats_url, "ui-sessions-test", 5.0)
    try:
        sessions = Sessions(bus, ttl=60)
        token, session = await sessions.open("ops")
        assert await sessions.find(token) == session
        kv = await sessions.kv()
        name = "s." + hashlib.sha256(token.encode()).hexdigest()  # only its digest is stored
        assert orjson.loads((await kv.get(name)).value or b"")["key_id"] == "ops"
        expired = {"key_id": "ops", "csrf": "c", "created": 0, "expires": time.time() - 1}
        await kv.put(name, orjson.dumps(expired))
        assert await sessions.find(token) is None
        await kv.put(name, b"not json")
        assert await sessions.find(token) is None
    finally:
        await bus.close()


@pytest.mark.parametrize(
    "target",
    [
        None,
        "",
        "//evil.example/ui/flows",
        "/\\evil.example",
        "https://evil.example/ui/flows",
        "javascript:alert(1)",
        "/ui/flows\r\nSet-Cookie: x=1",
        "/elsewhere",
        "ui/flows",
    ],
)
def test_sign_in_never_redirects_away(target: str | None) -> None:
    assert safe_next(target) == HOME


def test_sign_in_goes_back_where_it_was_going() -> None:
    assert safe_next("/ui/flows?q=~c%20500") == "/ui/flows?q=~c%20500"
    assert safe_next("/api/docs") == "/api/docs"


@pytest.mark.parametrize(
    ("setting", "base", "secure"),
    [
        (None, "http://api.test", False),
        (None, "https://api.test", True),
        (True, "http://api.test", True),
    ],
)
async def test_the_cookie_is_secure_over_https_or_when_told(
    nats_url: str, tmp_path: Path, setting: bool | None, base: str, secure: bool
) -> None:
    settings = api_settings(nats_url, tmp_path, ui_secure_cookie=setting)
    async with api_client(settings) as client:
        client.base_url = httpx.URL(base)
        r = await client.post("/ui/login", data={"key": ADMIN_KEY}, headers={"Origin": base})
        assert r.status_code == 303
        assert ("Secure" in r.headers["set-cookie"]) is secure


@pytest.mark.parametrize(("raw", "value"), [("", None), ("  ", None), ("true", True), ("0", False)])
def test_secure_cookie_setting_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str, value: bool | None
) -> None:
    monkeypatch.setenv("FLEET_UI_SECURE_COOKIE", raw)
    assert load(ApiSettings).ui_secure_cookie is value
    monkeypatch.setenv("FLEET_UI_SECURE_COOKIE", "sometimes")
    with pytest.raises(SettingsError, match="FLEET_UI_SECURE_COOKIE"):
        load(ApiSettings)


async def test_a_nats_outage_does_not_sign_anyone_out(
    restartable_nats: EmbeddedNats, tmp_path: Path
) -> None:
    settings = api_settings(restartable_nats.url, tmp_path, nats_connect_timeout=10.0)
    async with api_client(settings) as client:
        token, _ = await _sign_in(client, ADMIN_KEY)
        jar = cookie_of(token)
        await asyncio.to_thread(restartable_nats.stop)
        try:
            api = await client.get("/api/keys", headers=jar)
            assert api.status_code == 503 and api.json()["code"] == "BUS_UNAVAILABLE"
            page = await client.get("/ui/flows", headers=jar)
            assert page.status_code == 503 and "Unavailable" in page.text  # not the sign-in
            late = await client.post("/ui/login", data={"key": ADMIN_KEY}, headers=ORIGIN)
            assert late.status_code == 503 and "set-cookie" not in late.headers
        finally:
            await asyncio.to_thread(restartable_nats.start)

        async def back() -> bool:
            return (await client.get("/api/keys", headers=jar)).status_code == 200

        assert await eventually(back, timeout=15.0)  # the same session, still signed in


async def test_sign_in_and_out_are_audited_and_the_key_is_not(
    two_apis: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    a, _ = two_apis
    before = (await a.get("/api/events", headers=ADMIN, params={"type": "audit"})).json()
    since = before["events"][0]["seq"] if before["events"] else 0
    assert (
        await a.post("/ui/login", data={"key": "wrong-guess"}, headers=ORIGIN)
    ).status_code == 401
    token, csrf = await _sign_in(a, READ_KEY)
    out = await a.post("/ui/logout", headers=cookie_of(token), data={"csrf": csrf})
    assert out.status_code == 303

    async def records() -> list[dict[str, object]]:
        page = await a.get("/api/events", headers=ADMIN, params={"type": "audit", "limit": 50})
        found = [e for e in page.json()["events"] if e["seq"] > since]
        ui = [e["data"] for e in found if str(e["data"]["action"]).startswith("ui.")]
        return ui if len(ui) >= 3 else []

    got = await eventually(records, timeout=5.0)
    by_action = sorted((r["action"], r["status"], r["key_id"]) for r in got)
    assert by_action == [
        ("ui.sign_in", 303, "viewer"),
        ("ui.sign_in", 401, None),
        ("ui.sign_out", 303, "viewer"),
    ]
    assert "wrong-guess" not in str(got) and READ_KEY not in str(got) and token not in str(got)
