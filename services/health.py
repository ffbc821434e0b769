"""``proxyfleet health <service>``: a container healthcheck that exits 0 when the
service answers, 1 (with one line) when it does not. Reads the same FLEET_* env.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import urllib.request

import nats

from libs.common import natsurl, subjects
from libs.common.settings import ApiSettings, CommonSettings, ProxySettings, load, parse_hostport


async def _quiet(_: Exception) -> None:
    """nats-py's default error callback prints a traceback per failed attempt."""


def _local(address: str) -> tuple[str, int]:
    host, port = parse_hostport(address)
    return ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host), port


def _proxy() -> None:
    with socket.create_connection(_local(load(ProxySettings).proxy_listen), timeout=2):
        pass


def _api() -> None:
    host, port = _local(load(ApiSettings).api_listen)
    with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=2) as resp:
        if resp.status != 200:
            raise RuntimeError(f"readyz answered {resp.status}")


async def _store() -> None:
    target = natsurl.parse(load(CommonSettings).nats_url)
    nc = await nats.connect(
        target.servers,
        connect_timeout=2,
        max_reconnect_attempts=0,
        error_cb=_quiet,
        **target.options(),
    )
    try:
        await nc.request(subjects.store_subject("count"), b"{}", timeout=2)
    finally:
        await nc.close()


def check(service: str) -> int:
    """Run the check for ``service``; 0 healthy, 1 not."""
    try:
        if service == "proxy":
            _proxy()
        elif service == "api":
            _api()
        else:
            asyncio.run(asyncio.wait_for(_store(), 5))
    except Exception as exc:
        reason = str(exc) or type(exc).__name__
        print(f"{service} unhealthy: {reason}", file=sys.stderr)
        return 1
    return 0
