"""Record the filter-language conformance data with mitmproxy itself as the oracle.

Run by hand (never by pytest) when the corpus in ``expressions.py`` changes::

    make conformance-oracle            # or: .venv/bin/python tests/conformance/oracle.py

What it does, in two stages:

1. **record** (this interpreter, the repo venv): create ``tests/conformance/.venv-mitm``
   (git-ignored) with pyenv's Python 3.12 and ``mitmproxy==12.3.1`` (pip, offline index),
   start our own upstream servers on 127.0.0.1 / 127.0.0.2 (plain HTTP, TLS, a refusing
   port), start a real ``mitmdump -w`` in regular proxy mode, and drive real traffic
   through it with curl and raw sockets: many methods, query strings, Host headers
   that differ from the URL, request bodies (JSON, form, gzip-encoded), responses with
   varied statuses, content types, codings (gzip, deflate, br, zstd, and broken ones),
   repeated and oddly-cased headers, binary bodies, one HTTPS request through the
   proxy, one WebSocket handshake, one request whose upstream refuses the connection.
2. **evaluate** (the 3.12 venv, ``--evaluate FILE``): read the recorded flows with
   ``mitmproxy.io.FlowReader``, convert each HTTP flow into our flow event format
   (ids ``f00``..``fNN`` in recording order), and evaluate every expression of the
   corpus with ``mitmproxy.flowfilter.parse`` on the *mitmproxy* flow objects. As a
   check of the conversion, each expression is also evaluated on mitmproxy flows
   rebuilt from the converted docs alone; a difference is printed as a WARNING (our
   format would then lack something that filter looks at).

Outputs, both committed: ``flows.json`` (header + converted flows) and
``expected.json`` (header with the mitmproxy version + one case per expression:
``{"expr", "matches": [ids], "describe"}`` or ``{"expr", "error": true}``).

Ports are fixed ones chosen at run time in 18000-18999 and written into flows.json;
the corpus does not depend on them. Client ports are ephemeral.

Options: ``--mitm-python PATH`` (interpreter for the venv), ``--keep DIR`` (keep the
raw ``flows.mitm`` and the logs there).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import os
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VENV = HERE / ".venv-mitm"
MITMPROXY_SPEC = "mitmproxy==12.3.1"
FLOWS_JSON = HERE / "flows.json"
EXPECTED_JSON = HERE / "expected.json"


def log(msg: str) -> None:
    print(f"[oracle] {msg}", flush=True)


# --- stage 1: the venv ------------------------------------------------------------------


def ensure_venv(python: str | None) -> Path:
    """The venv's python, created with mitmproxy pinned (once)."""
    vpy = VENV / "bin" / "python"
    if vpy.exists():
        out = subprocess.run(
            [str(vpy), "-c", "import mitmproxy.version as v; print(v.VERSION)"],
            capture_output=True,
            text=True,
        )
        if out.returncode == 0 and out.stdout.strip() == MITMPROXY_SPEC.split("==")[1]:
            return vpy
    if python is None:
        sys.path.insert(0, str(ROOT))
        from bench.infra import pick_mitm_python  # pyenv's newest 3.12, if present

        python, _ = pick_mitm_python()
    log(f"creating {VENV.relative_to(ROOT)} with {python} and pip install {MITMPROXY_SPEC}")
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([python, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(vpy), "-m", "pip", "install", "-q", MITMPROXY_SPEC], check=True)
    return vpy


# --- stage 1: ports ----------------------------------------------------------------------


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def pick_ports(names: list[str], start: int = 18600) -> dict[str, int]:
    """Fixed ports in 18000-18999, the preferred block first, free on both loopbacks."""
    ports: dict[str, int] = {}
    candidate = start
    while len(ports) < len(names):
        if candidate > 18999:
            candidate = 18000
        if (
            candidate not in ports.values()
            and _bindable("127.0.0.1", candidate)
            and _bindable("127.0.0.2", candidate)
        ):
            ports[names[len(ports)]] = candidate
        candidate += 1
    return ports


# --- stage 1: the upstream servers --------------------------------------------------------

Header = tuple[str, str]


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


def _brotli(data: bytes) -> bytes:
    import brotli

    return bytes(brotli.compress(data))


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452") + bytes(range(256)) + b"IEND\xaeB`\x82"
HTML = "text/html; charset=utf-8"
CT = "Content-Type"
CE = "Content-Encoding"


def routes() -> dict[str, tuple[int, str, list[Header], bytes]]:
    """path (without query) -> (status, reason, headers, body as sent on the wire)."""

    def words(tag: bytes) -> bytes:
        return b"The quick brown fox; Lorem ipsum needle-%s dolor sit amet. " % tag * 4

    return {
        "/": (200, "OK", [(CT, HTML)], b"<html><body>welcome to the home page</body></html>"),
        "/index.html": (
            200,
            "OK",
            [
                (CT, HTML),
                ("Set-Cookie", "session=abc123; Path=/; HttpOnly"),
                ("Set-Cookie", "theme=dark; Path=/"),
                ("X-Served-By", "upstream-a"),
            ],
            b"<!doctype html><html><head><title>Index</title></head>"
            b"<body><h1>Hello World</h1><p>multi\nline\nbody</p></body></html>",
        ),
        "/api/items": (
            200,
            "OK",
            [(CT, "application/json"), ("Cache-Control", "no-store")],
            b'{"items": [{"id": 42, "name": "widget"}, {"id": 7, "name": "gadget"}], '
            b'"token": "alpha-beta"}',
        ),
        "/api/create": (
            201,
            "Created",
            [(CT, "application/json; charset=utf-8"), ("Location", "/api/items/99")],
            b'{"id": 99, "created": true}',
        ),
        "/static/site.css": (
            200,
            "OK",
            [(CT, "text/css"), ("Cache-Control", "max-age=3600")],
            b"body { color: rebeccapurple; margin: 0 }",
        ),
        "/static/app.js": (
            200,
            "OK",
            [(CT, "application/javascript")],
            b"function hello() { return 'js-bundle'; }",
        ),
        "/static/legacy.js": (
            200,
            "OK",
            [(CT, "text/javascript; charset=iso-8859-1")],
            b"var legacy = true;",
        ),
        "/static/old.js": (
            200,
            "OK",
            [(CT, "application/x-javascript")],
            b"var old = 1;",
        ),
        "/img/logo.png": (200, "OK", [(CT, "image/png")], PNG),
        "/img/shout.png": (200, "OK", [(CT, "IMAGE/PNG")], PNG[:32]),
        "/fonts/a.woff2": (200, "OK", [(CT, "font/woff2")], b"wOF2\x00\x01\x00\x00fontdata"),
        "/fonts/b.woff": (200, "OK", [(CT, "application/font-woff")], b"wOFF\x00\x01legacy"),
        "/download.bin": (
            200,
            "OK",
            [(CT, "application/octet-stream"), ("Content-Disposition", "attachment")],
            b"\x00\x01\x02\xff\xfe binary-marker \x00\x80\x90",
        ),
        "/plain": (200, "OK", [], b"a body without any content type"),
        "/utf8": (200, "OK", [(CT, "text/plain; charset=utf-8")], "café crème brûlée".encode()),
        "/enc/gzip": (
            200,
            "OK",
            [(CT, "text/plain"), (CE, "gzip")],
            _gzip(words(b"gzip")),
        ),
        "/enc/gzip-upper": (
            200,
            "OK",
            [(CT, "text/plain"), (CE, "GZIP")],
            _gzip(b"shouted coding needle-gzipupper"),
        ),
        "/enc/deflate": (
            200,
            "OK",
            [(CT, "text/plain"), (CE, "deflate")],
            zlib.compress(words(b"deflate")),
        ),
        "/enc/deflate-raw": (
            200,
            "OK",
            [(CT, "text/plain"), (CE, "deflate")],
            _raw_deflate(b"raw stream needle-rawdeflate"),
        ),
        "/enc/br": (
            200,
            "OK",
            [(CT, "application/json"), (CE, "br")],
            _brotli(b'{"msg": "needle-brotli", "n": 1}'),
        ),
        "/enc/zstd": (
            200,
            "OK",
            [(CT, "text/html"), (CE, "zstd")],
            _zstd(b"<p>needle-zstd</p>"),
        ),
        "/enc/xgzip": (
            200,
            "OK",
            [(CT, "text/plain"), (CE, "x-gzip")],
            _gzip(b"alias coding needle-xgzip"),
        ),
        "/enc/chain": (
            200,
            "OK",
            [(CT, "text/plain"), (CE, "gzip"), (CE, "br")],
            _brotli(_gzip(b"two codings needle-chain")),
        ),
        "/enc/chain-one": (
            200,
            "OK",
            [(CT, "text/plain"), (CE, "gzip, br")],
            _brotli(_gzip(b"one header two codings needle-chainone")),
        ),
        "/enc/gzip-zlib": (
            200,
            "OK",
            [(CT, "text/plain"), (CE, "gzip")],
            zlib.compress(b"zlib data labelled gzip needle-gzipzlib"),
        ),
        "/enc/base64": (
            200,
            "OK",
            [(CT, "text/plain"), (CE, "base64")],
            base64.b64encode(b"a codec that is no coding needle-b64codec"),
        ),
        "/enc/bad": (
            200,
            "OK",
            [(CT, "text/plain"), (CE, "gzip")],
            b"not actually gzip needle-corrupt",
        ),
        "/enc/truncated": (
            200,
            "OK",
            [(CT, "text/plain"), (CE, "gzip")],
            _gzip(b"needle-truncated " + bytes(range(256)) * 8)[:60],
        ),
        "/enc/identity": (
            200,
            "OK",
            [(CT, "text/plain"), (CE, "identity")],
            b"identity coding needle-identity",
        ),
        "/headers": (
            200,
            "OK",
            [
                (CT, "application/json"),
                ("content-type", "text/plain"),
                ("x-lower-case", "lower"),
                ("X-UPPER-CASE", "UPPER"),
                ("X-Mixed-Case", "MiXeD"),
                ("X-Dup", "first"),
                ("X-Dup", "second"),
                ("X-Utf8", "café"),
                ("X-Empty", ""),
            ],
            b"{}",
        ),
        "/redirect": (301, "Moved Permanently", [("Location", "/index.html"), (CT, HTML)], b""),
        "/empty": (204, "No Content", [("X-Reason", "nothing-here")], b""),
        "/missing": (404, "Not Found", [(CT, HTML)], b"<h1>404 page not found</h1>"),
        "/boom": (500, "Internal Server Error", [(CT, "text/plain")], b"internal error trace"),
        "/busy": (
            503,
            "Service Unavailable",
            [(CT, "application/json"), ("Retry-After", "120")],
            b'{"error": "overloaded"}',
        ),
    }


class _Handler(socketserver.StreamRequestHandler):
    """One HTTP/1.1 exchange per connection: exact bytes, headers as listed, then close."""

    server_name = "a"

    def handle(self) -> None:
        line = self.rfile.readline(65536)
        if not line:
            return
        method, target, _ = line.decode("latin-1").split(" ", 2)
        headers: list[tuple[str, str]] = []
        while True:
            h = self.rfile.readline(65536)
            if h in (b"\r\n", b"\n", b""):
                break
            name, _, value = h.decode("latin-1").partition(":")
            headers.append((name.strip().lower(), value.strip()))
        lookup = dict(headers)
        length = int(lookup.get("content-length", "0") or 0)
        if length:
            self.rfile.read(length)
        path = target.split("?", 1)[0]
        if lookup.get("upgrade", "").lower() == "websocket":
            self._websocket(lookup)
            return
        table = routes()
        if path in table:
            status, reason, extra, body = table[path]
        else:  # echo route for anything else (the methods, the Host tests)
            status, reason = 200, "OK"
            extra = [(CT, "text/plain")]
            body = f"echo {method} {path} from {self.server_name}".encode()
        out = [f"HTTP/1.1 {status} {reason}"]
        out += [f"{n}: {v}" for n, v in extra]
        if status not in (204, 304) and method != "HEAD":
            out.append(f"Content-Length: {len(body)}")
        elif method == "HEAD":
            out.append(f"Content-Length: {len(body)}")
            body = b""
        else:
            body = b""
        out.append("Connection: close")
        self.wfile.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + body)
        self.wfile.flush()

    def _websocket(self, lookup: dict[str, str]) -> None:
        import hashlib

        key = lookup.get("sec-websocket-key", "")
        accept = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        ).decode()
        self.wfile.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            ).encode()
        )
        self.wfile.flush()
        # Wait for the client's close frame (2 header bytes + 4 mask + payload), answer it.
        head = self.rfile.read(2)
        if len(head) == 2:
            self.rfile.read(4 + (head[1] & 0x7F))
        self.wfile.write(b"\x88\x02\x03\xe8")
        self.wfile.flush()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def start_upstream(host: str, port: int, name: str, tls: ssl.SSLContext | None = None) -> Any:
    handler = type(f"Handler_{name}", (_Handler,), {"server_name": name})
    srv = _Server((host, port), handler)
    if tls is not None:
        srv.socket = tls.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


# --- stage 1: the traffic ----------------------------------------------------------------


def _curl(proxy: int, *args: str, data: bytes | None = None) -> None:
    cmd = ["curl", "-s", "-o", "/dev/null", "--max-time", "10", "--proxy", f"127.0.0.1:{proxy}"]
    subprocess.run([*cmd, *args], input=data, check=False)


def _raw(proxy: int, request: bytes) -> None:
    with socket.create_connection(("127.0.0.1", proxy), timeout=10) as s:
        s.sendall(request)
        try:
            while s.recv(65536):
                pass
        except TimeoutError:
            pass


def _websocket(proxy: int, port: int) -> None:
    req = (
        f"GET http://127.0.0.1:{port}/ws/chat?room=1 HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", proxy), timeout=10) as s:
        s.sendall(req)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(4096)
            if not chunk:
                return
            buf += chunk
        mask = b"\x01\x02\x03\x04"
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"\x03\xe8"))
        s.sendall(b"\x88\x82" + mask + payload)
        try:
            while s.recv(4096):
                pass
        except (TimeoutError, ConnectionResetError):
            pass


def drive(proxy: int, ports: dict[str, int]) -> None:
    """The traffic, one request at a time, so the recording order is stable."""
    a = f"http://127.0.0.1:{ports['a']}"
    b = f"http://127.0.0.2:{ports['b']}"
    for path in routes():
        _curl(proxy, f"{a}{path}")
    _curl(proxy, f"{a}/api/items?id=42&sort=desc&q=needle-query")
    _curl(proxy, f"{a}/search?q=hello%20world&lang=en")
    _curl(proxy, "-I", f"{a}/index.html")  # HEAD
    _curl(proxy, "-X", "OPTIONS", f"{a}/api/items")
    _curl(proxy, "-X", "DELETE", f"{a}/api/items/7")
    _curl(
        proxy,
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        '{"name": "new-widget", "price": 12.5}',
        f"{a}/api/create",
    )
    _curl(proxy, "-d", "user=alice&password=s3cret-form", f"{a}/login")  # form POST
    _curl(
        proxy,
        "-X",
        "PUT",
        "-H",
        "Content-Type: text/plain",
        "--data-binary",
        "replaced document body",
        f"{a}/docs/1",
    )
    _curl(
        proxy,
        "-X",
        "PATCH",
        "-H",
        "Content-Type: application/merge-patch+json",
        "--data-binary",
        '{"op": "patch-op"}',
        f"{a}/docs/1",
    )
    _curl(
        proxy,
        "-H",
        "Content-Type: application/json",
        "-H",
        "Content-Encoding: gzip",
        "--data-binary",
        "@-",
        f"{a}/upload",
        data=_gzip(b'{"compressed": "needle-reqgzip"}'),
    )
    _curl(proxy, "-H", "Host: other.example", f"{a}/hosted")
    _curl(proxy, "-H", "Host: API.Internal.Example:8443", f"{a}/hosted/port?x=1")
    _curl(proxy, "-H", "User-Agent: ConformanceBot/1.0", "-H", "X-Request-Id: rid-777", f"{b}/")
    _curl(proxy, "-H", "Cookie: session=abc123; theme=dark", f"{b}/profile")
    # Hand-written requests: no Host header, lowercase and repeated request headers.
    _raw(proxy, f"GET {a}/nohost HTTP/1.0\r\nUser-Agent: raw/1.0\r\n\r\n".encode())
    _raw(
        proxy,
        (
            f"GET {b}/dupes?x=1 HTTP/1.1\r\nhost: 127.0.0.2:{ports['b']}\r\nx-trace: one\r\n"
            "X-Trace: two\r\nACCEPT: */*\r\nX-Tab:\tvalue-with-tab\r\nConnection: close\r\n\r\n"
        ).encode(),
    )
    _raw(
        proxy,
        (
            f"POST {a}/latin HTTP/1.1\r\nHost: 127.0.0.1:{ports['a']}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nX-Name: Jos\xc3\xa9\r\n"
            "Content-Length: 6\r\nConnection: close\r\n\r\nna\xc3\xafve"
        ).encode("latin-1"),
    )
    _websocket(proxy, ports["a"])
    _curl(proxy, "-k", f"https://127.0.0.1:{ports['tls']}/secure/page?token=tls-only")
    _curl(proxy, f"http://127.0.0.1:{ports['refused']}/nobody-home")


def record(vpy: Path, work: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from bench.infra import Procs, make_test_pki

    ports = pick_ports(["mitm", "a", "b", "tls", "refused"])
    log(f"ports: {ports}")
    _, cert, key = make_test_pki(work / "pki")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(str(cert), str(key))
    servers = [
        start_upstream("127.0.0.1", ports["a"], "a"),
        start_upstream("127.0.0.2", ports["b"], "b"),
        start_upstream("127.0.0.1", ports["tls"], "tls", tls),
    ]
    dump = work / "flows.mitm"
    procs = Procs(work / "logs")
    try:
        procs.start(
            "mitmdump",
            [
                str(vpy.parent / "mitmdump"),
                "--listen-host",
                "127.0.0.1",
                "-p",
                str(ports["mitm"]),
                "-w",
                str(dump),
                "--set",
                f"confdir={work / 'mitm-conf'}",
                "--set",
                "ssl_insecure=true",
                "-q",
            ],
        )
        if not procs.wait_port("mitmdump", ports["mitm"]):
            raise SystemExit(f"mitmdump did not start:\n{procs.log_tail('mitmdump')}")
        drive(ports["mitm"], ports)
        time.sleep(0.5)
    finally:
        procs.stop_all()
        for srv in servers:
            srv.shutdown()
            srv.server_close()
    (work / "ports.json").write_text(json.dumps(ports))
    return dump


# --- stage 2 (inside the mitmproxy venv): convert and evaluate ------------------------------


def _fields(headers: Any) -> list[list[str]]:
    return [[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers.fields]


def _b64(data: bytes | None) -> str:
    return base64.b64encode(data or b"").decode("ascii")


def convert(f: Any, fid: str) -> dict[str, Any]:
    """One mitmproxy HTTPFlow as our flow event (services/proxy/capture.py flow_event)."""
    req, resp = f.request, f.response
    server = f.server_conn.peername or f.server_conn.address
    state = "completed" if resp is not None else "error"
    response = None
    if resp is not None:
        response = {
            "status": resp.status_code,
            "reason": resp.data.reason.decode("latin-1"),
            "http_version": resp.http_version,
            "headers": _fields(resp.headers),
            "size": len(resp.raw_content or b""),
            "truncated": False,
            "body_b64": _b64(resp.raw_content),
        }
    return {
        "event": state,
        "id": fid,
        "replica": "oracle",
        "kind": "websocket" if f.websocket is not None else "http",
        "state": state,
        "client": list(f.client_conn.peername[:2]) if f.client_conn.peername else None,
        "server": list(server[:2]) if server else None,
        "scheme": req.scheme,
        "method": req.data.method.decode("latin-1"),
        "host": req.host,
        "port": req.port,
        "path": req.data.path.decode("latin-1"),
        "http_version": req.http_version,
        "request": {
            "headers": _fields(req.headers),
            "size": len(req.raw_content or b""),
            "truncated": False,
            "body_b64": _b64(req.raw_content),
        },
        "response": response,
        "timings": {
            "start": req.timestamp_start,
            "request_sent": req.timestamp_end,
            "first_byte": resp.timestamp_start if resp is not None else None,
            "end": resp.timestamp_end if resp is not None else None,
        },
        "error": f.error.msg if f.error else None,
        "stats": {},
        "trace_id": None,
        "traceparent": None,
        "tags": [],
    }


def rebuild(doc: dict[str, Any]) -> Any:
    """A mitmproxy HTTPFlow made from one of our flow docs alone (the round-trip check)."""
    from mitmproxy import connection, http
    from mitmproxy import flow as mflow
    from mitmproxy.websocket import WebSocketData

    def fields(pairs: list[list[str]]) -> http.Headers:
        return http.Headers([(n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs])

    client = connection.Client(
        peername=tuple(doc["client"]), sockname=("127.0.0.1", 0), timestamp_start=0.0
    )
    server = connection.Server(address=tuple(doc["server"]) if doc["server"] else None)
    f = http.HTTPFlow(client, server)
    rq = doc["request"]
    f.request = http.Request(
        doc["host"],
        doc["port"],
        doc["method"].encode("latin-1"),
        doc["scheme"].encode(),
        b"",
        doc["path"].encode("latin-1"),
        doc["http_version"].encode(),
        fields(rq["headers"]),
        base64.b64decode(rq["body_b64"]),
        None,
        0.0,
        0.0,
    )
    if (rs := doc["response"]) is not None:
        f.response = http.Response(
            rs["http_version"].encode(),
            rs["status"],
            rs["reason"].encode("latin-1"),
            fields(rs["headers"]),
            base64.b64decode(rs["body_b64"]),
            None,
            0.0,
            0.0,
        )
    if doc["kind"] == "websocket":
        f.websocket = WebSocketData()
    if doc["error"]:
        f.error = mflow.Error(doc["error"])
    return f


def evaluate(dump: Path, ports: dict[str, int]) -> None:
    from mitmproxy import flowfilter, http, io
    from mitmproxy import version as mversion

    sys.path.insert(0, str(ROOT))
    from tests.conformance.expressions import CASES

    with dump.open("rb") as fh:
        flows = [f for f in io.FlowReader(fh).stream() if isinstance(f, http.HTTPFlow)]
    ids = [f"f{i:02d}" for i in range(len(flows))]
    docs = [convert(f, fid) for f, fid in zip(flows, ids, strict=True)]
    for f, fid in zip(flows, ids, strict=True):  # facts the corpus relies on: say them
        if f.marked or f.comment or f.metadata or f.is_replay:
            raise SystemExit(f"{fid}: unexpected marked/comment/metadata/replay state")
    header = {
        "mitmproxy_version": mversion.VERSION,
        "python": sys.version.split()[0],
        "generated_by": "tests/conformance/oracle.py",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    FLOWS_JSON.write_text(
        json.dumps({**header, "ports": ports, "flows": docs}, indent=1, ensure_ascii=False) + "\n"
    )
    cases: list[dict[str, Any]] = []
    lossy: list[str] = []
    for expr in CASES:
        try:
            flt = flowfilter.parse(expr)
        except ValueError:
            cases.append({"expr": expr, "error": True})
            continue
        matches = [fid for f, fid in zip(flows, ids, strict=True) if flt(f)]
        again = [d["id"] for d in docs if flt(rebuild(d))]
        if again != matches:  # our format lost something this filter looks at
            lossy.append(f"{expr!r}: recorded {matches}, rebuilt from flows.json {again}")
        cases.append({"expr": expr, "matches": matches, "describe": str(flt)})
    EXPECTED_JSON.write_text(
        json.dumps({**header, "flows": len(docs), "cases": cases}, indent=1, ensure_ascii=False)
        + "\n"
    )
    errors = sum(1 for c in cases if c.get("error"))
    for line in lossy:
        log(f"WARNING round trip differs: {line}")
    log(f"{len(docs)} flows, {len(cases)} cases ({errors} refused) written")


# --- entry point ---------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mitm-python", help="interpreter (3.12+) for the mitmproxy venv")
    ap.add_argument("--keep", type=Path, help="keep flows.mitm and the logs in this folder")
    ap.add_argument("--evaluate", type=Path, help=argparse.SUPPRESS)  # stage 2, in the venv
    ap.add_argument("--ports", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.evaluate:
        evaluate(args.evaluate, json.loads(args.ports))
        return
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed: apt-get install -y curl")
    vpy = ensure_venv(args.mitm_python)
    work = args.keep or Path(tempfile.mkdtemp(prefix="conformance-oracle-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        dump = record(vpy, work)
        ports = (work / "ports.json").read_text()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("MITMPROXY_CASE_SENSITIVE_FILTERS", None)  # the default: case-insensitive
        subprocess.run(
            [str(vpy), str(Path(__file__)), "--evaluate", str(dump), "--ports", ports],
            check=True,
            env=env,
        )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
