"""Benchmark plumbing: prerequisites, test certificates, and the processes a run starts.

Every process is started in its own session (process group) and registered with a
``Procs`` instance, which stops them all (SIGTERM, then SIGKILL) when the run ends, on
errors and on Ctrl-C alike.
"""

from __future__ import annotations

import datetime as dt
import glob
import ipaddress
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RUN = BENCH / ".run"
MITM_VENV = BENCH / ".venv-mitm"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
HTTP_PORT = 18080
HTTPS_PORT = 18443
BODY_SIZE = 1024


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


# --- prerequisites ------------------------------------------------------------------------


def which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def ensure_system_tools() -> None:
    """Install wrk and nginx (nginx-light) with apt-get when either is missing."""
    packages = {"wrk": "wrk", "nginx": "nginx-light", "curl": "curl"}
    missing = [pkg for tool, pkg in packages.items() if which(tool) is None]
    if not missing:
        return
    log(f"installing {' '.join(missing)}: apt-get update && apt-get install -y {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*sudo, "apt-get", "update", "-q"], check=True, env=env)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-q", *missing], check=True, env=env)


def pick_mitm_python() -> tuple[str, str]:
    """(python, pip spec): pyenv's 3.12 with mitmproxy 12 if present, else ours with 11."""
    candidates = sorted(
        glob.glob(os.path.expanduser("~/.pyenv/versions/3.12.*/bin/python3")),
        key=lambda p: [int(x) for x in Path(p).parts[-3].split(".") if x.isdigit()],
    )
    if candidates:
        return candidates[-1], "mitmproxy==12.2.3"
    return sys.executable, "mitmproxy==11.0.2"


def ensure_mitmdump() -> Path:
    """Create bench/.venv-mitm with mitmproxy (once) and return the mitmdump path."""
    mitmdump = MITM_VENV / "bin" / "mitmdump"
    if mitmdump.exists():
        return mitmdump
    python, spec = pick_mitm_python()
    log(f"creating {MITM_VENV.relative_to(ROOT)} with {python} and pip install {spec}")
    shutil.rmtree(MITM_VENV, ignore_errors=True)
    subprocess.run([python, "-m", "venv", str(MITM_VENV)], check=True)
    pip = [str(MITM_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, spec], check=True)
    return mitmdump


def tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (out.stdout + out.stderr).strip()
    return " | ".join(" ".join(line.split()) for line in text.splitlines()[:2])


# --- test certificates --------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_test_pki(out: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server cert for 127.0.0.1/localhost: (ca.pem, cert.pem, key.pem)."""
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("proxyfleet bench test CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = out / "ca.pem", out / "server.pem", out / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, paths[2])
    return paths


# --- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Procs:
    """Processes started by this run; ``stop_all`` ends each one's process group."""

    logs: Path
    started: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )
        self.started[name] = proc
        return proc.pid

    def alive(self, name: str) -> bool:
        return name in self.started and self.started[name].poll() is None

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def wait_port(self, name: str, port: int, timeout: float = 30.0) -> bool:
        """Wait until ``port`` accepts TCP while process ``name`` is still alive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive(name):
                return False
            if port_in_use(port):
                return True
            time.sleep(0.1)
        return False

    def stop(self, name: str, grace: float = 15.0) -> None:
        """SIGTERM the process (it stops its own children), then SIGKILL its whole group."""
        proc = self.started.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log(f"{name} did not stop within {grace:.0f} s of SIGTERM: SIGKILL")
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers in its group, if any
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()

    def stop_all(self) -> None:
        for name in reversed(list(self.started)):
            self.stop(name)


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by the process tree under ``pid``."""
    total = 0.0
    for proc in tree(pid):
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def tree_rss(pid: int) -> int:
    """Resident memory, bytes, of the process tree under ``pid``."""
    total = 0
    for proc in tree(pid):
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def children_cpu() -> float:
    """CPU seconds of this process's children that have exited (and been waited for)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# --- upstream and NATS --------------------------------------------------------------------

NGINX_CONF = """\
daemon off;
worker_processes 1;
{user}
pid {run}/nginx/nginx.pid;
error_log {run}/nginx/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {run}/nginx/tmp_body;
    proxy_temp_path {run}/nginx/tmp_proxy;
    fastcgi_temp_path {run}/nginx/tmp_fastcgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{http_port};
        listen 127.0.0.1:{https_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {run}/www;
        index index.html;
    }}
}}
"""


def start_nginx(procs: Procs, cert: Path, key: Path) -> None:
    for port in (HTTP_PORT, HTTPS_PORT):
        if port_in_use(port):
            raise RuntimeError(f"127.0.0.1:{port} is already in use (a leftover nginx?)")
    (RUN / "www").mkdir(parents=True, exist_ok=True)
    (RUN / "nginx").mkdir(parents=True, exist_ok=True)
    line = b"proxyfleet bench upstream body: 1 KiB of static text\n"
    body = (line * (BODY_SIZE // len(line) + 1))[: BODY_SIZE - 1] + b"\n"
    (RUN / "www" / "index.html").write_bytes(body)
    conf = RUN / "nginx" / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            user="user root;" if os.geteuid() == 0 else "",
            run=RUN,
            http_port=HTTP_PORT,
            https_port=HTTPS_PORT,
            cert=cert,
            key=key,
        )
    )
    nginx = which("nginx") or "nginx"
    cmd = [nginx, "-p", f"{RUN}/nginx/", "-e", f"{RUN}/nginx/error.log", "-c", str(conf)]
    procs.start("nginx", cmd)
    if not (procs.wait_port("nginx", HTTP_PORT) and procs.wait_port("nginx", HTTPS_PORT)):
        raise RuntimeError("nginx did not start:\n" + procs.log_tail("nginx"))


def start_nats(procs: Procs) -> str:
    port = free_port()
    server = ROOT / ".venv" / "bin" / "nats-server"
    store = RUN / "nats"
    cmd = [str(server), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)]
    procs.start("nats", cmd)
    if not procs.wait_port("nats", port):
        raise RuntimeError("nats-server did not start:\n" + procs.log_tail("nats"))
    return f"nats://127.0.0.1:{port}"


def curl_check(port: int | None, url: str, cafile: Path | None) -> str | None:
    """GET ``url`` (through the proxy on ``port`` if given); None if 200 with exactly 1 KiB."""
    out = RUN / "curl.body"
    cmd = ["curl", "-sS", "--max-time", "15", "-o", str(out), "-w", "%{http_code}"]
    if port is not None:
        cmd += ["-x", f"http://127.0.0.1:{port}"]
    if cafile is not None:
        cmd += ["--cacert", str(cafile)]
    res = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=30)
    size = out.stat().st_size if out.exists() else 0
    out.unlink(missing_ok=True)
    if res.returncode != 0 or res.stdout != "200" or size != BODY_SIZE:
        return f"curl {url}: rc={res.returncode} status={res.stdout!r} body={size} B " + (
            res.stderr.strip()
        )
    return None
