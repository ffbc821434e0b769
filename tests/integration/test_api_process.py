"""The ``proxyfleet api`` process: its start line, the generated key, SIGTERM, and the
one-line reasons it refuses to start for."""

from __future__ import annotations

import asyncio
import signal
import socket
import stat
from pathlib import Path

import httpx
import pytest

from libs.common.natsserver import EmbeddedNats
from tests.integration.harness import (
    PROXYFLEET,
    cli_env,
    free_port,
    reason_line,
    run_cli_to_exit,
)

pytestmark = pytest.mark.timeout(60)


async def test_start_line_generated_key_and_sigterm(
    restartable_nats: EmbeddedNats, tmp_path: Path
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    env = cli_env(tmp_path, FLEET_NATS_URL=restartable_nats.url, FLEET_API_LISTEN=listen)
    key_file = tmp_path / "data" / "api-key"
    with (tmp_path / "stderr.log").open("wb") as errlog:
        proc = await asyncio.create_subprocess_exec(
            str(PROXYFLEET), "api", stdout=asyncio.subprocess.PIPE, stderr=errlog, env=env
        )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        assert f"http://{listen}" in line and str(key_file) in line and "generated" in line
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert key not in line
        async with httpx.AsyncClient(base_url=f"http://{listen}", timeout=5) as client:
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
            assert (await client.get("/api/proxy/status")).status_code == 401
            ok = await client.get("/api/proxy/status", headers={"X-API-Key": key})
            assert ok.status_code == 200 and ok.json()["state"] == "no_replicas"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert key not in (tmp_path / "stderr.log").read_text()

    # a second start reuses the key
    listen = f"127.0.0.1:{free_port()}"
    env["FLEET_API_LISTEN"] = listen
    proc = await asyncio.create_subprocess_exec(
        str(PROXYFLEET),
        "api",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        assert "existing" in line and key_file.read_text().strip() == key
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_port_taken(restartable_nats: EmbeddedNats, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        env = cli_env(tmp_path, FLEET_NATS_URL=restartable_nats.url, FLEET_API_LISTEN=address)
        code, err = await run_cli_to_exit("api", env)
    assert code == 1
    assert address in reason_line("api", err) and "cannot listen" in err


async def test_nats_unreachable(tmp_path: Path) -> None:
    env = cli_env(
        tmp_path,
        FLEET_NATS_URL=f"nats://127.0.0.1:{free_port()}",
        FLEET_NATS_CONNECT_TIMEOUT="1",
        FLEET_API_LISTEN=f"127.0.0.1:{free_port()}",
    )
    code, err = await run_cli_to_exit("api", env, timeout=10)
    assert code == 1
    assert "NATS unreachable" in reason_line("api", err)


@pytest.mark.parametrize(
    ("name", "value"),
    [("FLEET_API_KEYS", "ops:admin:tooshort"), ("FLEET_API_LISTEN", "nonsense")],
)
async def test_bad_settings(tmp_path: Path, name: str, value: str) -> None:
    code, err = await run_cli_to_exit("api", cli_env(tmp_path, **{name: value}))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], err
    assert "tooshort" not in lines[0]
