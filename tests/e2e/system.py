"""``proxyfleet up`` as a user runs it, for end-to-end tests: embedded NATS, store on
SQLite, API and one proxy replica, on free ports in a temporary data dir. Shared by the
REST, CLI and browser tests (each test module gets its own system)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.integration.harness import free_port

BIN = Path(sys.executable).parent


@dataclass
class System:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    proxy: str
    api: str
    key: str
    metrics: dict[str, str] = field(default_factory=dict)  # service -> host:port

    def child(self, name: str) -> psutil.Process:
        for c in psutil.Process(self.proc.pid).children():
            if c.cmdline()[-1] == name:
                return c
        raise AssertionError(f"no {name} child")


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@contextmanager
def running_system(data: Path, upstream_ca_bundle: Path, **env_extra: str) -> Iterator[System]:
    """Start ``proxyfleet up`` in ``data``; yield once the proxy runs and flows are served;
    stop it with SIGINT and insist on a clean exit."""
    proxy, api = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    metrics = {"proxy": f"127.0.0.1:{free_port()}", "store": f"127.0.0.1:{free_port()}"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        FLEET_DATA_DIR=str(data),
        FLEET_PROXY_LISTEN=proxy,
        FLEET_API_LISTEN=api,
        FLEET_PROXY_METRICS_LISTEN=metrics["proxy"],  # not up's 9101/9102: tests run in parallel
        FLEET_STORE_METRICS_LISTEN=metrics["store"],
        FLEET_UPSTREAM_CA_BUNDLE=str(upstream_ca_bundle),
        FLEET_HEARTBEAT_INTERVAL="0.5",
    )
    env.update(env_extra)
    log = (data / "up.log").open("wb")
    proc = subprocess.Popen([str(BIN / "proxyfleet"), "up"], env=env, stdout=log, stderr=log)
    try:
        key_file = data / "api-key"

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError((data / "up.log").read_text())
            if not key_file.exists():
                return False
            headers = {"X-API-Key": key_file.read_text().strip()}
            try:
                status = httpx.get(f"http://{api}/api/proxy/status", headers=headers)
                flows = httpx.get(f"http://{api}/api/flows?limit=1", headers=headers)
            except httpx.HTTPError:
                return False
            running = status.status_code == 200 and status.json()["state"] == "running"
            return running and flows.status_code == 200

        wait_for(ready, 30, "proxyfleet up")
        yield System(
            proc,
            data,
            f"http://{proxy}",
            f"http://{api}",
            key_file.read_text().strip(),
            metrics,
        )
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert code == 0, (data / "up.log").read_text()[-3000:]
