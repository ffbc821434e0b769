"""HTTPS load client: keep-alive GETs over TLS, directly or through a CONNECT proxy.

A raw asyncio (uvloop) client, so the HTTPS rows of the benchmark do not depend on wrk, which
cannot speak CONNECT. Each of ``--conns`` connections does ``CONNECT host:port`` through
``--proxy`` (or connects straight to the URL's host), performs a TLS handshake that trusts
``--cafile`` (the proxy's CA when intercepting), then loops ``GET`` requests on the same
connection. All connections are opened before the clock starts, so handshakes are not in the
keep-alive figures. With ``--reconnect`` every request gets a fresh connection (CONNECT + TLS
handshake + one request + close) and the latency includes all of it.

The request loop runs in protocol callbacks (no coroutine or future per request), so the
client costs little CPU next to the proxy under test. Responses are framed by
Content-Length only.

Prints a line ``START`` when the clock starts (a driver can measure the server's CPU over the
same window), then one JSON line: requests, req/s, latency percentiles (ms), errors, and the
client's own CPU seconds during the measured window.

    python bench/tls_load.py --url https://127.0.0.1:18443/ --proxy 127.0.0.1:8080 \\
        --cafile ca.pem --conns 50 --duration 10 --expect 1024
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

try:
    import uvloop
except ImportError:  # pragma: no cover - the project venv has it
    uvloop = None  # type: ignore[assignment]

OPEN_TIMEOUT = 15.0
clock = time.perf_counter


@dataclass
class Load:
    """What to request, and the shared tallies of one run."""

    host: str
    port: int
    server_name: str
    proxy: tuple[str, int] | None
    ctx: ssl.SSLContext
    request: bytes
    expect: int | None
    end: float = float("inf")
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    connect_errors: int = 0
    last_error: str = ""

    def fail(self, what: str, connect: bool = False) -> None:
        if connect:
            self.connect_errors += 1
        else:
            self.errors += 1
        self.last_error = what


class Conn(asyncio.Protocol):
    """One client connection. ``send`` starts a request; each complete response records its
    latency and, in keep-alive mode, sends the next request until the clock runs out."""

    def __init__(self, load: Load, keepalive: bool) -> None:
        self.load = load
        self.keepalive = keepalive
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1  # bytes of the whole current response, once its head is parsed
        self.ok = True
        self.opened = False  # set once CONNECT and the handshake are done
        self.t0 = 0.0
        loop = asyncio.get_running_loop()
        self.connect_reply: asyncio.Future[bytes] | None = None
        self.finished: asyncio.Future[bool] = loop.create_future()  # True: clean stop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        why = f"connection lost: {exc!r}"
        if self.connect_reply is not None and not self.connect_reply.done():
            self.connect_reply.set_exception(ConnectionError(why))
        self.finish(False, why)

    def finish(self, clean: bool, why: str = "") -> None:
        """End this connection's run; an unclean end of an opened connection is one error."""
        if self.finished.done():
            return
        if not clean and self.opened:
            self.load.fail(why)
        self.finished.set_result(clean)

    def send(self, t0: float | None = None) -> None:
        assert self.transport is not None
        self.t0 = clock() if t0 is None else t0
        self.transport.write(self.load.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.connect_reply is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0 and not self.connect_reply.done():
                self.connect_reply.set_result(bytes(self.buf[: end + 4]))
                del self.buf[:]
            return
        while self.response_complete():
            self.on_response()

    def response_complete(self) -> bool:
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = bytes(self.buf[:end]).lower()
            i = head.find(b"\r\ncontent-length:")
            j = head.find(b"\r\n", i + 2)
            try:
                length = int(head[i + 17 : j if j >= 0 else len(head)]) if i >= 0 else -1
            except ValueError:
                length = -1
            if length < 0:
                self.fail_and_close("response without a valid Content-Length")
                return False
            self.ok = head[9:12] == b"200" and (self.load.expect in (None, length))
            self.need = end + 4 + length
        return len(self.buf) >= self.need

    def on_response(self) -> None:
        del self.buf[: self.need]
        self.need = -1
        now = clock()
        if not self.ok:
            self.fail_and_close("response was not 200 with the expected body length")
            return
        if now <= self.load.end:
            self.load.latencies.append(now - self.t0)
        if self.keepalive and now < self.load.end:
            self.send(now)
        else:
            self.finish(True)

    def fail_and_close(self, why: str) -> None:
        self.finish(False, why)
        if self.transport is not None:
            self.transport.close()

    async def tunnel(self, authority: str) -> None:
        """Send CONNECT and wait for a 2xx answer (the proxy must not send more before TLS)."""
        assert self.transport is not None
        self.connect_reply = asyncio.get_running_loop().create_future()
        self.transport.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        head = await self.connect_reply
        self.connect_reply = None
        if head[9:10] != b"2":
            raise ConnectionError(f"CONNECT answered {head.splitlines()[0]!r}")


async def open_conn(load: Load, keepalive: bool) -> Conn:
    """A TLS connection to the target, through a CONNECT tunnel when a proxy is set."""
    loop = asyncio.get_running_loop()
    if load.proxy is None:
        _, conn = await loop.create_connection(
            lambda: Conn(load, keepalive),
            load.host,
            load.port,
            ssl=load.ctx,
            server_hostname=load.server_name,
        )
        conn.opened = True
        return conn
    transport, conn = await loop.create_connection(lambda: Conn(load, keepalive), *load.proxy)
    try:
        await conn.tunnel(f"{load.host}:{load.port}")
        tls = await loop.start_tls(transport, conn, load.ctx, server_hostname=load.server_name)
    except BaseException:
        transport.abort()
        raise
    conn.transport = cast(asyncio.Transport, tls)
    conn.opened = True
    return conn


async def keepalive_worker(load: Load, conn: Conn | None, start: asyncio.Event) -> None:
    await start.wait()
    while clock() < load.end:
        if conn is None:
            try:
                conn = await asyncio.wait_for(open_conn(load, True), OPEN_TIMEOUT)
            except (OSError, TimeoutError) as exc:
                load.fail(f"{type(exc).__name__}: {exc}", connect=True)
                await asyncio.sleep(0.05)
                continue
        conn.send()
        if await conn.finished:
            return
        if conn.transport is not None:
            conn.transport.close()
        conn = None


async def reconnect_worker(load: Load, start: asyncio.Event) -> None:
    await start.wait()
    while clock() < load.end:
        t0 = clock()
        try:
            conn = await asyncio.wait_for(open_conn(load, False), OPEN_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            load.fail(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.01)
            continue
        conn.send(t0)
        await conn.finished  # an unclean end was counted as an error
        if conn.transport is not None:
            conn.transport.close()


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def opened(load: Load, conns: int) -> list[Conn | None]:
    """Open the keep-alive connections before the clock starts; failures are counted."""
    tries = [asyncio.wait_for(open_conn(load, True), OPEN_TIMEOUT) for _ in range(conns)]
    out: list[Conn | None] = []
    for item in await asyncio.gather(*tries, return_exceptions=True):
        if isinstance(item, BaseException):
            load.fail(f"{type(item).__name__}: {item}", connect=True)
            out.append(None)
        else:
            out.append(item)
    return out


async def run(load: Load, conns: int, duration: float, reconnect: bool) -> dict[str, object]:
    start = asyncio.Event()
    if reconnect:
        coros = [reconnect_worker(load, start) for _ in range(conns)]
    else:
        coros = [keepalive_worker(load, c, start) for c in await opened(load, conns)]
    tasks = [asyncio.create_task(c) for c in coros]
    cpu0 = time.process_time()
    load.end = clock() + duration
    start.set()
    print("START", flush=True)
    await asyncio.sleep(duration)
    cpu = time.process_time() - cpu0
    _, pending = await asyncio.wait(tasks, timeout=2.0)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    lat = sorted(load.latencies)
    ms = 1000.0
    return {
        "mode": "reconnect" if reconnect else "keepalive",
        "conns": conns,
        "duration_s": duration,
        "requests": len(lat),
        "rps": len(lat) / duration,
        "p50_ms": percentile(lat, 0.50) * ms,
        "p90_ms": percentile(lat, 0.90) * ms,
        "p99_ms": percentile(lat, 0.99) * ms,
        "max_ms": (lat[-1] if lat else 0.0) * ms,
        "errors": load.errors,
        "connect_errors": load.connect_errors,
        "last_error": load.last_error if load.errors or load.connect_errors else "",
        "client_cpu_s": cpu,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="https://127.0.0.1:18443/")
    p.add_argument("--proxy", help="host:port of a CONNECT proxy (omit to connect directly)")
    p.add_argument("--cafile", required=True, help="CA bundle the client trusts")
    p.add_argument("--server-name", help="TLS server name (default: the URL's host)")
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--expect", type=int, help="required response body length")
    p.add_argument("--reconnect", action="store_true", help="new CONNECT + TLS per request")
    return p.parse_args(argv)


def make_load(args: argparse.Namespace) -> Load:
    url = urlsplit(args.url)
    if url.scheme != "https" or not url.hostname:
        raise SystemExit(f"--url must be https://host[:port]/path, got {args.url!r}")
    ctx = ssl.create_default_context(cafile=args.cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    proxy = None
    if args.proxy:
        phost, _, pport = args.proxy.rpartition(":")
        proxy = (phost or "127.0.0.1", int(pport))
    port = url.port or 443
    request = (
        f"GET {url.path or '/'} HTTP/1.1\r\nHost: {url.hostname}:{port}\r\n"
        "User-Agent: tls_load\r\nAccept: */*\r\n\r\n"
    ).encode()
    return Load(
        host=url.hostname,
        port=port,
        server_name=args.server_name or url.hostname,
        proxy=proxy,
        ctx=ctx,
        request=request,
        expect=args.expect,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    coro = run(make_load(args), args.conns, args.duration, args.reconnect)
    result = uvloop.run(coro) if uvloop is not None else asyncio.run(coro)
    print(json.dumps(result), flush=True)
    return 0 if result["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
