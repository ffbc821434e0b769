"""``proxyfleet api``: the management API under uvicorn (uvloop + httptools).

Start-up is ordered so that each failure is one line and a non-zero exit,
before anything is served: the listen address is bound first (port taken),
then the keys are read or generated, then NATS is connected (with retries).
SIGTERM/SIGINT stop accepting, let in-flight requests finish (up to
``FLEET_API_SHUTDOWN_TIMEOUT``), close NATS, and return (exit 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Iterator

import uvicorn

from libs.common.bus import Bus, BusUnavailable
from libs.common.settings import ApiSettings, parse_hostport
from libs.common.tasks import cancel_and_wait, install_signal_handlers, spawn
from services.api.app import connect_bus, create_app, end_streams
from services.api.auth import KeyFileError, KeyRing

log = logging.getLogger("proxyfleet.api")


class StartupError(Exception):
    """The API cannot start; the message is the one line printed before exiting."""


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: ``run_api`` owns SIGTERM/SIGINT.

    (uvicorn would re-raise the captured signal after shutdown, turning a clean
    stop into death by SIGTERM instead of exit status 0.)
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(listen: str) -> socket.socket:
    """A listening socket on ``host:port``, or ``StartupError`` (port taken, bad address)."""
    host, port = parse_hostport(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def run_api(settings: ApiSettings) -> None:
    """Serve the API until SIGTERM/SIGINT, then shut down gracefully and return."""
    sock = bind(settings.api_listen)
    try:
        try:
            keyring = KeyRing.from_settings(settings)
        except KeyFileError as exc:
            raise StartupError(str(exc)) from None
        try:
            bus = await connect_bus(settings)
        except BusUnavailable as exc:
            raise StartupError(str(exc)) from None
        try:
            await _serve(settings, sock, bus, keyring)
        finally:
            await bus.close()
    finally:
        sock.close()


async def _serve(settings: ApiSettings, sock: socket.socket, bus: Bus, keyring: KeyRing) -> None:
    app = create_app(settings, bus=bus, keyring=keyring)
    config = uvicorn.Config(
        app,
        http="httptools",
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=math.ceil(settings.api_shutdown_timeout),
    )
    server = _Server(config)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    serving = spawn(server.serve(sockets=[sock]), name="api-server")
    stopping = spawn(stop.wait(), name="api-stop")
    while not server.started and not serving.done():
        await asyncio.sleep(0.01)
    if server.started:
        print(f"proxyfleet api listening on {_url(sock)}; API key: {keyring.source}", flush=True)
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    end_streams(app)  # open SSE streams end now instead of holding the graceful shutdown
    server.should_exit = True
    await cancel_and_wait(stopping)
    await serving
    if not server.started:
        raise StartupError("the API server did not start (see the log above)")
    log.info("api stopped")
