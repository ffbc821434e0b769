"""API keys: parsing into digests, constant-time comparison, the generated key file,
and the 401/403 matrix of scopes against methods."""

from __future__ import annotations

import hashlib
import hmac
import logging
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from libs.common.natsserver import EmbeddedNats
from libs.common.settings import ApiSettings, SettingsError, load, parse_api_key
from services.api import auth
from services.api.auth import KeyFileError, KeyRing, load_or_create_key_file
from tests.unit.test_api_support import ADMIN, ADMIN_KEY, READ, READ_KEY, api_client, api_settings


@pytest.fixture
def nats_url(restartable_nats: EmbeddedNats) -> str:
    return restartable_nats.url


@pytest.fixture
async def client(nats_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(api_settings(nats_url, tmp_path)) as c:
        yield c


# -- parsing and storage ------------------------------------------------------------------
def test_plain_secret_is_kept_only_as_its_digest() -> None:
    settings = load(ApiSettings, api_keys=f"ops:admin:{ADMIN_KEY}", data_dir="/nonexistent")
    (key,) = settings.api_keys
    assert key.id == "ops" and key.scope == "admin"
    assert key.sha256 == hashlib.sha256(ADMIN_KEY.encode()).digest()
    dumped = repr(settings) + str(settings.model_dump())
    assert ADMIN_KEY not in dumped


def test_sha256_form_is_taken_as_the_digest() -> None:
    digest = hashlib.sha256(b"whatever-the-secret-is").hexdigest()
    key = parse_api_key(f"ci:read:sha256:{digest}")
    assert key.sha256 == bytes.fromhex(digest) and key.scope == "read"
    ring = KeyRing([key], "test")
    assert ring.authenticate("whatever-the-secret-is") is not None
    assert ring.authenticate(f"sha256:{digest}") is None  # the digest itself is not a key


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("nocolons", "id:scope:secret"),
        ("a:root:0123456789abcdef", "scope"),
        ("a:admin:short", "at least 16"),
        ("a b:admin:0123456789abcdef", "key id"),
        ("a:admin:sha256:abc", "64 hex"),
        ("a:admin:0123456789abcdef,a:read:fedcba9876543210", "unique"),
        ("a:admin:0123456789abcdef,b:read:0123456789abcdef", "share"),
    ],
)
def test_bad_key_settings_are_one_line_errors_without_the_secret(value: str, needle: str) -> None:
    with pytest.raises(SettingsError) as info:
        load(ApiSettings, api_keys=value)
    message = str(info.value)
    assert "FLEET_API_KEYS" in message and needle in message and "\n" not in message
    assert "0123456789abcdef" not in message and "short" not in message.split(":", 3)[-1]


def test_every_digest_is_compared_for_every_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [parse_api_key(f"k{i}:read:secret-number-{i:04d}-xxxx") for i in range(5)]
    ring = KeyRing(keys, "test")
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    for attempt, expect in [
        ("secret-number-0000-xxxx", "k0"),  # first key: no early exit
        ("secret-number-0004-xxxx", "k4"),
        ("wrong", None),
        ("", None),
    ]:
        calls.clear()
        principal = ring.authenticate(attempt)
        assert (principal.key_id if principal else None) == expect
        assert len(calls) == len(keys)  # the same work whichever key (if any) matches
        assert all(len(a) == len(b) == 32 for a, b in calls)  # digests, never raw keys


# -- the generated key file ---------------------------------------------------------------
def test_key_file_is_generated_once_with_mode_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "data" / "api-key"
    secret, created = load_or_create_key_file(path)
    assert created and len(secret) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again, created_again = load_or_create_key_file(path)
    assert (again, created_again) == (secret, False)
    assert [p.name for p in path.parent.iterdir()] == ["api-key"]  # no temp file left


def test_concurrent_creation_keeps_the_first_key(tmp_path: Path) -> None:
    path = tmp_path / "api-key"
    assert auth._create_exclusive(path, "first-key-0123456789")
    assert not auth._create_exclusive(path, "second-key-0123456789")
    assert load_or_create_key_file(path) == ("first-key-0123456789", False)


def test_loose_key_file_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "api-key"
    path.write_text("an-existing-key-0123456789\n")
    path.chmod(0o644)
    assert load_or_create_key_file(path) == ("an-existing-key-0123456789", False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_empty_key_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "api-key"
    path.write_text("\n")
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="empty"):
        load_or_create_key_file(path)


async def test_generated_key_works_and_is_never_logged(
    nats_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = api_settings(nats_url, tmp_path, api_keys="")
    async with api_client(settings) as client:
        ring: KeyRing = client.app.state.keyring  # type: ignore[attr-defined]
        key = (tmp_path / "api-key").read_text().strip()
        assert str(tmp_path / "api-key") in ring.source and key not in ring.source
        ok = await client.get("/api/proxy/status", headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
        bad = await client.get("/api/proxy/status", headers={"X-API-Key": key + "x"})
        assert bad.status_code == 401
    assert key not in caplog.text
    assert "api-key" in caplog.text  # where it is, yes


# -- the 401/403 matrix ---------------------------------------------------------------------
async def test_missing_and_wrong_keys_are_401_with_www_authenticate(
    client: httpx.AsyncClient,
) -> None:
    for headers in (
        {},
        {"X-API-Key": "nope"},
        {"Authorization": "Bearer nope"},
        {"Authorization": f"Basic {ADMIN_KEY}"},
        {"X-API-Key": ""},
    ):
        resp = await client.get("/api/proxy/status", headers=headers)
        assert resp.status_code == 401, headers
        assert resp.headers["content-type"] == "application/problem+json"
        assert resp.headers["www-authenticate"].startswith("Bearer")
        assert resp.json()["code"] == "AUTH_REQUIRED"


async def test_scopes_against_methods(client: httpx.AsyncClient) -> None:
    # read: GET yes, mutations no
    assert (await client.get("/api/proxy/status", headers=READ)).status_code == 200
    assert (await client.get("/api/config", headers=READ)).status_code == 200
    for method, url in [
        ("POST", "/api/proxy/start"),
        ("POST", "/api/proxy/stop"),
        ("PUT", "/api/config"),
        ("DELETE", "/api/flows/0123abcd"),
    ]:
        resp = await client.request(method, url, headers=READ, json={})
        assert resp.status_code == 403, (method, url)
        assert resp.json()["code"] == "AUTH_FORBIDDEN"
        assert READ_KEY not in resp.text
    # admin: gets past auth (503 NO_REPLICAS: there is no replica here)
    resp = await client.post("/api/proxy/start", headers=ADMIN)
    assert resp.status_code == 503 and resp.json()["code"] == "NO_REPLICAS"
    bearer = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert (await client.get("/api/config", headers=bearer)).status_code == 200


async def test_auth_is_checked_before_input_validation(client: httpx.AsyncClient) -> None:
    resp = await client.get("/api/flows?limit=0")
    assert resp.status_code == 401
    resp = await client.put("/api/config", content=b"{not json", headers=READ)
    assert resp.status_code == 403


async def test_health_needs_no_key_but_openapi_does(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200
    assert (await client.get("/api/openapi.json")).status_code == 401
    assert (await client.get("/api/openapi.json", headers=READ)).status_code == 200


def test_runtime_keys_join_the_ring_and_never_shadow_a_configured_id() -> None:
    from libs.common.settings import ApiKeySpec

    static = parse_api_key("ops:read:static-secret-0123456789")
    ring = KeyRing([static], "test")
    used: list[str] = []
    ring.on_use = used.append

    def spec(key_id: str, secret: str) -> ApiKeySpec:
        return ApiKeySpec(id=key_id, scope="admin", sha256=hashlib.sha256(secret.encode()).digest())

    ring.set_runtime([spec("k1", "runtime-secret-1"), spec("ops", "takeover-secret")])
    who = ring.authenticate("runtime-secret-1")
    assert who is not None and (who.key_id, who.scope) == ("k1", "admin")
    assert ring.authenticate("takeover-secret") is None  # "ops" is the configured key's id
    assert ring.authenticate("static-secret-0123456789") is not None
    assert used == ["k1", "ops"] and len(ring) == 2
    ring.set_runtime([])  # revoked
    assert ring.authenticate("runtime-secret-1") is None
