"""The ``proxyfleet`` command: ``proxy``, ``store``, ``api`` and ``up``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from libs.common.logs import is_json, setup_logging
from libs.common.settings import ApiSettings, ProxySettings, SettingsError, StoreSettings, load
from libs.common.tasks import run
from libs.common.telemetry import SERVICE_API, SERVICE_PROXY, SERVICE_STORE, setup_tracing


def _fail(command: str, reason: object) -> None:
    """The one line a service prints when it cannot start (a JSON line when logging JSON)."""
    if is_json():
        logging.getLogger(f"proxyfleet.{command}").error("%s", reason)
    else:
        print(f"proxyfleet {command}: {reason}", file=sys.stderr)


def _proxy() -> int:
    from services.proxy.main import StartupError, run_proxy

    settings = load(ProxySettings)
    setup_logging(settings.log_level, "proxy", settings.log_format)
    setup_tracing(SERVICE_PROXY, settings.replica_id, settings)  # flushed at exit
    try:
        run(run_proxy(settings))
    except StartupError as exc:
        _fail("proxy", exc)
        return 1
    return 0


def _store() -> int:
    from services.store.main import StartupError, run_store

    settings = load(StoreSettings)
    setup_logging(settings.log_level, "store", settings.log_format)
    setup_tracing(SERVICE_STORE, settings.replica_id, settings)  # flushed at exit
    try:
        run(run_store(settings))
    except StartupError as exc:
        _fail("store", exc)
        return 1
    return 0


def _api() -> int:
    from services.api.main import StartupError, run_api

    settings = load(ApiSettings)
    setup_logging(settings.log_level, "api", settings.log_format)
    setup_tracing(SERVICE_API, settings.replica_id, settings)  # flushed at exit
    try:
        run(run_api(settings))
    except StartupError as exc:
        _fail("api", exc)
        return 1
    return 0


def _up() -> int:
    from services.up import UpError, UpSettings, run_up

    settings = load(UpSettings)
    setup_logging(settings.log_level, "up", settings.log_format)
    try:
        run(run_up(settings))
    except UpError as exc:
        _fail("up", exc)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="proxyfleet",
        description="A fleet of intercepting HTTP/HTTPS proxies with a management API. "
        "Settings come from FLEET_* environment variables (see README).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("proxy", help="run one proxy replica")
    sub.add_parser("store", help="run the flow store")
    sub.add_parser("api", help="run the management API")
    sub.add_parser("up", help="run everything locally (embedded NATS, SQLite)")
    health = sub.add_parser("health", help="exit 0 if a service answers (container healthcheck)")
    health.add_argument("service", choices=["proxy", "store", "api"])
    args = parser.parse_args(argv)
    try:
        if args.command == "proxy":
            return _proxy()
        if args.command == "store":
            return _store()
        if args.command == "api":
            return _api()
        if args.command == "up":
            return _up()
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
