"""NATS credentials: in the URL or in settings, handed to the client, never printed; a
real nats-server (EmbeddedNats) refuses a client without them."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import nats
import pytest
from nats.errors import NoServersError

from libs.common import natsurl
from libs.common.bus import Bus, BusUnavailable
from libs.common.natsserver import Credentials, EmbeddedNats, write_auth_files
from libs.common.settings import CommonSettings, SettingsError, StoreSettings, load


def test_url_credentials_round_trip_and_redaction() -> None:
    url = natsurl.with_credentials("nats://a:4222,b:4223", "fleet", "p@ss:w/rd%")
    target = natsurl.parse(url)
    assert target.servers == ["nats://a:4222", "nats://b:4223"]
    assert target.options() == {"user": "fleet", "password": "p@ss:w/rd%"}
    assert natsurl.redact(url) == "nats://fleet:***@a:4222,nats://fleet:***@b:4223"
    assert "p%40ss" not in natsurl.redact(url)
    token = natsurl.parse("nats://s3cret@h:1")
    assert token.options() == {"token": "s3cret"} and token.servers == ["nats://h:1"]
    assert natsurl.redact("nats://s3cret@h:1") == "nats://***@h:1"
    assert natsurl.redact("nats://h:1") == "nats://h:1"
    # credentials already in the URL win over the separate settings
    assert natsurl.with_credentials("nats://u:p@h:1", "x", "y") == "nats://u:p@h:1"


def test_settings_fold_credentials_into_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEET_NATS_URL", "nats://nats:4222")
    monkeypatch.setenv("FLEET_NATS_USER", "fleet")
    secret = tmp_path / "pw"
    secret.write_text("from-a-file\n")
    monkeypatch.setenv("FLEET_NATS_PASSWORD_FILE", str(secret))
    s = load(CommonSettings)
    assert s.nats_url == "nats://fleet:from-a-file@nats:4222"
    assert "from-a-file" not in repr(s)
    monkeypatch.setenv("FLEET_NATS_PASSWORD", "also")
    with pytest.raises(SettingsError, match="not both"):
        load(CommonSettings)
    monkeypatch.delenv("FLEET_NATS_PASSWORD")
    monkeypatch.setenv("FLEET_NATS_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match="cannot read"):
        load(CommonSettings)
    monkeypatch.delenv("FLEET_NATS_PASSWORD_FILE")
    with pytest.raises(SettingsError) as err:
        load(CommonSettings)
    assert str(err.value) == (
        "bad settings: FLEET_NATS_USER needs FLEET_NATS_PASSWORD or _PASSWORD_FILE"
    )


def test_another_database_url_is_refused_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLEET_STORE_DB", "mysql://fleet:hunter2@db:3306/flows")
    with pytest.raises(SettingsError) as err:
        load(StoreSettings)
    message = str(err.value)
    assert "FLEET_STORE_DB" in message and "mysql://" in message
    assert "hunter2" not in message and "db:3306" not in message
    assert "\n" not in message


def test_a_postgres_url_is_taken_and_printed_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_STORE_DB", "postgresql://fleet:hunter2@db:5432/flows")
    settings = load(StoreSettings)
    assert settings.pg_dsn == "postgresql://fleet:hunter2@db:5432/flows"
    assert settings.db_label == "postgresql://fleet:***@db:5432/flows"
    assert "hunter2" not in repr(settings)
    monkeypatch.setenv("FLEET_STORE_DB", "postgres://u@db/flows?password=hunter2&sslmode=require")
    label = load(StoreSettings).db_label
    assert "hunter2" not in label and "sslmode=require" in label
    monkeypatch.setenv("FLEET_STORE_DB", "/var/lib/fleet/flows.db")
    settings = load(StoreSettings)
    assert settings.pg_dsn is None and str(settings.db_path) == "/var/lib/fleet/flows.db"


def test_password_file_is_private_and_reused(tmp_path: Path) -> None:
    first = write_auth_files(tmp_path / "secrets")
    pw = tmp_path / "secrets" / "nats-password"
    assert stat.S_IMODE(pw.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "secrets" / "auth.conf").stat().st_mode) == 0o600
    assert first.password in (tmp_path / "secrets" / "auth.conf").read_text()
    assert Credentials.load_or_create(pw) == first
    assert first.password not in repr(first)


async def test_the_server_refuses_a_client_without_credentials(tmp_path: Path) -> None:
    with EmbeddedNats(tmp_path / "store", log_file=tmp_path / "nats.log") as server:
        errors: list[str] = []

        async def record(exc: Exception) -> None:
            errors.append(str(exc))

        with pytest.raises(NoServersError):
            await asyncio.wait_for(
                nats.connect(
                    server.address,
                    connect_timeout=1,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.1,
                    error_cb=record,
                ),
                10,
            )
        assert any("authorization violation" in e.lower() for e in errors), errors
        conf = (tmp_path / "store" / "nats-server.conf").stat()
        assert stat.S_IMODE(conf.st_mode) == 0o600

        # Bus: no credentials, or wrong ones: one line that says so, no password in it
        # (deadlines long enough for the server's refusal to arrive on a busy machine)
        with pytest.raises(BusUnavailable, match="missing credentials"):
            await Bus.connect(server.address, "test", timeout=4)
        wrong = server.address.replace("://", "://fleet:not-the-password@")
        with pytest.raises(BusUnavailable) as err:
            await Bus.connect(wrong, "test", timeout=4)
        assert "wrong credentials" in str(err.value)
        assert "not-the-password" not in str(err.value) and "fleet:***@" in str(err.value)

        bus = await Bus.connect(server.url, "test", timeout=5)
        try:
            assert bus.connected
        finally:
            await bus.close()


def test_a_database_password_file_is_read_at_start_and_never_shown(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "db-password"
    secret.write_text("s3cret-from-file\n")
    monkeypatch.setenv("FLEET_STORE_DB", "postgresql://fleet@db:5432/flows")
    monkeypatch.setenv("FLEET_STORE_DB_PASSWORD_FILE", str(secret))
    settings = load(StoreSettings)
    assert settings.pg_password == "s3cret-from-file"
    assert "s3cret" not in repr(settings) and "s3cret" not in settings.db_label
    secret.write_text("")
    with pytest.raises(SettingsError, match="is empty"):
        load(StoreSettings)
    monkeypatch.setenv("FLEET_STORE_DB_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match="cannot read"):
        load(StoreSettings)
    monkeypatch.setenv("FLEET_STORE_DB", str(tmp_path / "flows.db"))
    monkeypatch.setenv("FLEET_STORE_DB_PASSWORD_FILE", str(secret))
    with pytest.raises(SettingsError, match="needs a postgresql://"):
        load(StoreSettings)


@pytest.mark.parametrize("value", ["0", "6", "-1", "three", "1.5", ""])
def test_a_bad_replica_count_is_refused_in_one_line(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    from libs.common.settings import ProxySettings

    monkeypatch.setenv("FLEET_NATS_REPLICAS", value)
    with pytest.raises(SettingsError) as err:
        load(ProxySettings)
    message = str(err.value)
    assert "nats_replicas" in message.lower() and "\n" not in message


def test_a_good_replica_count_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    from libs.common.settings import ProxySettings

    monkeypatch.setenv("FLEET_NATS_REPLICAS", "3")
    assert load(ProxySettings).nats_replicas == 3
