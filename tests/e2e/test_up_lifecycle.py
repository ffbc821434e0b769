"""``proxyfleet up`` as a process: its embedded NATS requires the password it generated
(0600, reused on the next start, never printed), and everything it started dies with
it when it is killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import psutil
import pytest
from nats.errors import NoServersError

from tests.integration.harness import free_port

BIN = Path(sys.executable).parent


def _start_up(data: Path, nats_port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        FLEET_DATA_DIR=str(data),
        FLEET_PROXY_LISTEN=f"127.0.0.1:{free_port()}",
        FLEET_API_LISTEN=f"127.0.0.1:{free_port()}",
        FLEET_PROXY_METRICS_LISTEN="off",
        FLEET_STORE_METRICS_LISTEN="off",
        FLEET_UP_NATS_PORT=str(nats_port),
        FLEET_STORE_INGEST_WORKERS="1",
    )
    log = (data / "up.log").open("ab")
    return subprocess.Popen([str(BIN / "proxyfleet"), "up"], env=env, stdout=log, stderr=log)


def _wait(predicate: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _family(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """Every process ``up`` started (services, nats-server, store workers)."""
    return psutil.Process(proc.pid).children(recursive=True)


def _names(procs: list[psutil.Process]) -> set[str]:
    out = set()
    for p in procs:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        out.add("nats-server" if "nats-server" in " ".join(cmd[:1]) else cmd[-1])
    return out


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "up"
    data.mkdir()
    yield data


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _connect_refused(url: str) -> list[str]:
    errors: list[str] = []

    async def record(exc: Exception) -> None:
        errors.append(str(exc))

    with pytest.raises(NoServersError):  # every attempt refused
        await asyncio.wait_for(
            nats.connect(
                url,
                connect_timeout=1,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                error_cb=record,
            ),
            10,
        )
    return errors


def test_up_killed_takes_its_children_and_keeps_its_nats_password(data_dir: Path) -> None:
    port = free_port()
    proc = _start_up(data_dir, port)
    try:
        wanted = {"nats-server", "store", "api", "proxy"}
        _wait(lambda: wanted <= _names(_family(proc)), 30, "nats-server and the three services")
        password_file = data_dir / "nats-password"
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        password = password_file.read_text().strip()
        assert len(password) >= 24

        # the embedded server refuses a client without the credentials, accepts one with
        errors = asyncio.run(_connect_refused(f"nats://127.0.0.1:{port}"))
        assert any("authorization violation" in e.lower() for e in errors), errors

        async def with_password() -> bool:
            nc = await nats.connect(f"nats://fleet:{password}@127.0.0.1:{port}")
            ok = nc.is_connected
            await nc.close()
            return ok

        assert asyncio.run(with_password())

        def store_up() -> bool:
            out = (data_dir / "up.log").read_text()
            return "proxyfleet store" in out and "database" in out

        _wait(store_up, 30, "the store's start line")
        family = _family(proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        gone, alive = psutil.wait_procs(family, timeout=40)
        assert not alive, f"still running after up was killed: {_names(alive)}"
        assert len(gone) >= 4
        out = (data_dir / "up.log").read_text()
        assert password not in out, "the NATS password was printed"
        assert f"NATS:    nats://127.0.0.1:{port} (embedded" in out

        # the next start reuses the password (and the port: it is free again)
        again = _start_up(data_dir, port)
        try:
            _wait(lambda: "nats-server" in _names(_family(again)), 30, "the second nats-server")
            assert password_file.read_text().strip() == password

            def connects() -> bool:
                try:
                    return asyncio.run(with_password())
                except Exception:
                    return False

            _wait(connects, 20, "a client with the kept password")
        finally:
            _stop(again)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in _family(proc) if proc.poll() is None else []:
            p.kill()
