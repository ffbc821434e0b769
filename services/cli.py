"""The ``proxyfleet`` command: the services (``proxy``, ``store``, ``api``, ``up``,
``health``, ``nats-auth``) here, and the API client's commands (``status``, ``flows``,
``config``, ...; see ``services.client``), routed there by their first word."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libs.common.logs import is_json, setup_logging
from libs.common.settings import SettingsError, load
from libs.common.tasks import run
from libs.common.telemetry import SERVICE_API, SERVICE_PROXY, SERVICE_STORE, setup_tracing
from services.client import COMMANDS as CLIENT_COMMANDS
from services.client import GLOBAL_OPTIONS as CLIENT_OPTIONS

# Set by ``proxyfleet up`` in each child's environment to its own pid. A service started
# with it ends itself (SIGTERM to itself: a graceful stop) once its parent is another
# process, i.e. ``up`` died without stopping it; the portable fallback to PDEATHSIG.
PARENT_PID_ENV = "PROXYFLEET_PARENT_PID"
_PARENT_POLL_S = 0.5
_PARENT_GRACE_S = 30.0  # after the SIGTERM, how long a graceful stop may take


def _watch_parent() -> None:
    """Start the parent watchdog when ``PARENT_PID_ENV`` names our parent."""
    try:
        parent = int(os.environ.get(PARENT_PID_ENV, ""))
    except ValueError:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        logging.getLogger("proxyfleet").warning("parent %d is gone: stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(_PARENT_GRACE_S)
        os._exit(1)  # the graceful stop hung

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _nats_auth(folder: Path, routes: str = "", db_owner: int | None = None) -> int:
    """``proxyfleet nats-auth DIR [--routes HOST:PORT,...] [--db-password-owner UID]``: the
    NATS password of a deployment and the server's ``authorization`` include; with
    ``--routes``, the ``cluster`` include of a JetStream cluster too (see
    ``natsserver.write_auth_files``); with ``--db-password-owner``, a PostgreSQL password
    too (``DIR/db-password``, 0600, owned by that uid: the database server's user, which
    reads it at its first start)."""
    from libs.common.natsserver import (
        CLUSTER_FILE,
        DB_PASSWORD_FILE,
        PASSWORD_FILE,
        write_auth_files,
        write_secret_once,
    )

    nodes = [r.strip() for r in routes.split(",") if r.strip()]
    creds = write_auth_files(folder, routes=nodes)
    cluster = f", cluster include {folder / CLUSTER_FILE}" if nodes else ""
    print(
        f"NATS credentials: user {creds.user}, password in {folder / PASSWORD_FILE}, "
        f"server include {folder / 'auth.conf'}{cluster}"
    )
    if db_owner is not None:
        path = write_secret_once(folder / DB_PASSWORD_FILE, owner=db_owner)
        print(f"PostgreSQL password in {path} (owner uid {db_owner})")
    return 0


def _fail(command: str, reason: object) -> None:
    """The one line a service prints when it cannot start (a JSON line when logging JSON)."""
    if is_json():
        logging.getLogger(f"proxyfleet.{command}").error("%s", reason)
    else:
        print(f"proxyfleet {command}: {reason}", file=sys.stderr)


@dataclass(frozen=True)
class _Service:
    """How one long-running subcommand starts: its settings, runner and start-up error."""

    help: str
    settings: str  # "module:Class"
    module: str  # holds ``runner`` and ``error`` (imported only when the command runs)
    runner: str
    error: str
    trace_name: str | None = None


_SERVICES = {
    "proxy": _Service(
        "run one proxy replica",
        "libs.common.settings:ProxySettings",
        "services.proxy.main",
        "run_proxy",
        "StartupError",
        SERVICE_PROXY,
    ),
    "store": _Service(
        "run the flow store",
        "libs.common.settings:StoreSettings",
        "services.store.main",
        "run_store",
        "StartupError",
        SERVICE_STORE,
    ),
    "api": _Service(
        "run the management API",
        "libs.common.settings:ApiSettings",
        "services.api.main",
        "run_api",
        "StartupError",
        SERVICE_API,
    ),
    "up": _Service(
        "run everything locally (embedded NATS, SQLite)",
        "services.up:UpSettings",
        "services.up",
        "run_up",
        "UpError",
    ),
}


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _serve(name: str) -> int:
    """Load settings, set up logs (and tracing), run until a signal; 1 if it cannot start."""
    svc = _SERVICES[name]
    _watch_parent()
    settings = load(_load(svc.settings))
    setup_logging(settings.log_level, name, settings.log_format)
    if svc.trace_name is not None:
        setup_tracing(svc.trace_name, settings.replica_id, settings)  # flushed at exit
    module = importlib.import_module(svc.module)
    try:
        run(getattr(module, svc.runner)(settings))
    except getattr(module, svc.error) as exc:
        _fail(name, exc)
        return 1
    return 0


def _is_client(argv: list[str]) -> bool:
    first = argv[0] if argv else ""
    return first in CLIENT_COMMANDS or first.split("=", 1)[0] in CLIENT_OPTIONS


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if _is_client(argv):
        from services.client.commands import main as client_main

        return client_main(argv)
    parser = argparse.ArgumentParser(
        prog="proxyfleet",
        description="A fleet of intercepting HTTP/HTTPS proxies with a management API. "
        "Settings come from FLEET_* environment variables (see README).",
        epilog="API client commands (FLEET_API_URL, FLEET_API_KEY): "
        + ", ".join(sorted(CLIENT_COMMANDS))
        + "; proxyfleet COMMAND --help for each.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, svc in _SERVICES.items():
        sub.add_parser(name, help=svc.help)
    health = sub.add_parser("health", help="exit 0 if a service answers (container healthcheck)")
    health.add_argument("service", choices=["proxy", "store", "api"])
    auth = sub.add_parser(
        "nats-auth", help="create a NATS password and server auth include in DIR (compose)"
    )
    auth.add_argument("dir", type=Path)
    auth.add_argument(
        "--routes",
        default="",
        metavar="HOST:PORT,...",
        help="route listeners of every node of a NATS cluster: also write DIR/cluster.conf",
    )
    auth.add_argument(
        "--db-password-owner",
        type=int,
        default=None,
        metavar="UID",
        help="also write DIR/db-password (a PostgreSQL password), owned by UID",
    )
    args = parser.parse_args(argv)
    try:
        if args.command in _SERVICES:
            return _serve(args.command)
        if args.command == "nats-auth":
            return _nats_auth(args.dir, args.routes, args.db_password_owner)
        from services.health import check

        return check(args.service)
    except SettingsError as exc:
        if os.environ.get("FLEET_LOG_FORMAT", "").strip().lower() == "json" and not is_json():
            setup_logging("INFO", args.command, "json")
        _fail(args.command, exc)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
