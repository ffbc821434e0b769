"""Filtered listing and HAR export over 1,000,000 stored flows, through the real API.

    .venv/bin/python bench/queries.py [--flows 1000000] [--samples 300] [--warmup 20]
        [--har-flows 100000] [--har-runs 3] [--only NAME,...] [--regenerate]
        [--no-explain] [--no-profile]

Every request goes the way a user's does: HTTP (httpx, one request at a time, ``X-API-Key``)
to ``proxyfleet api``, a NATS request to ``proxyfleet store``, SQLite in the store's reader
threads, and back. Each process is started on free ports with an embedded nats-server.

1. Data: ``--flows`` realistic flow events (the proxy's event format and id layout: 12 hex
   digits of epoch ms, then the replica's node and a counter; started over three days;
   ~200 hosts with Zipf-like popularity; mostly GET and 200; request and response headers,
   an ``X-Trace`` header on some; small JSON/JS/HTML bodies, a few with the word
   ``needle``) written through the store's own ingest path (``SQLiteRepository.ingest``,
   two worker processes). The database is cached in ``bench/.cache/`` keyed by the
   generator version and the flow count, so reruns skip this step.
2. Listing: ``GET /api/flows`` with ``q`` filters (and a plain listing and ``host=`` for
   reference), ``--warmup`` discarded requests, then ``--samples`` timed ones: p50/p99.
   For rechecked filters (headers, bodies) the reply's ``scanned``/``partial`` are shown.
3. HAR export: ``GET /api/flows/har?since=...`` selecting the newest ``--har-flows`` flows,
   streamed to nowhere (``--har-runs`` times): flows/s, and the API's and the store's RSS
   (start, peak, end) and CPU during the export.
4. Diagnosis: EXPLAIN QUERY PLAN of each SQL statement the store runs for the filtered
   cases (captured by running the store's own ``search.listing`` on the file, timed per
   statement), and a cProfile of the store side of the slowest listing and of one export
   page (store read + serialise, API decode, HAR conversion, per flow).

Prints a table and writes ``bench/results/queries-<UTC date>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import datetime as dt
import io
import json
import os
import pstats
import random
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import orjson  # noqa: E402
import psutil  # noqa: E402

from libs.common import har  # noqa: E402
from libs.common.models import FlowQuery  # noqa: E402
from libs.common.natsserver import EmbeddedNats  # noqa: E402
from services.store import search  # noqa: E402
from services.store.query import plan  # noqa: E402
from services.store.sqlite import SQLiteRepository  # noqa: E402

BENCH = ROOT / "bench"
CACHE = BENCH / ".cache"
RESULTS = BENCH / "results"
BIN = Path(sys.executable).parent
GEN_VERSION = 1  # bump when the generated data changes: the cached database is rebuilt
SPAN_S = 3 * 24 * 3600  # flows start over the last three days (of the generation time)
HAR_RUNS = 3


def log(msg: str) -> None:
    print(f"[queries-bench] {msg}", flush=True)


# -- synthetic traffic ------------------------------------------------------------------------
REPLICAS = [(f"proxy-{i}", 0x1000 * (i + 1) + 0x2A) for i in range(4)]
TLDS = ["example.com", "example.net", "shop.example", "corp.example", "cdn.example.org"]
KINDS = ["api", "www", "cdn", "static", "auth", "img", "search"]
USER_AGENTS = [
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 "
    "Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "curl/8.5.0",
    "python-requests/2.32.3",
    "okhttp/4.12.0",
    "Go-http-client/2.0",
    "PostmanRuntime/7.42.0",
]
METHODS = (["GET"] * 75) + (["POST"] * 15) + (["PUT"] * 5) + (["DELETE"] * 3) + ["PATCH", "HEAD"]
STATUSES = (
    [200] * 78 + [201] * 4 + [204] * 3 + [301] * 2 + [304] * 5 + [404] * 5 + [500] * 2 + [503]
)
REASONS = {200: "OK", 201: "Created", 204: "No Content", 301: "Moved Permanently",
           304: "Not Modified", 404: "Not Found", 500: "Internal Server Error",
           503: "Service Unavailable"}  # fmt: skip
WORDS = (
    "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud "
    "maple cedar amber coral ivory slate"
).split()
RESOURCES = ["users", "orders", "items", "sessions", "accounts", "invoices", "carts", "events"]
CONTENT_TYPES = {
    "json": "application/json",
    "js": "application/javascript",
    "html": "text/html; charset=utf-8",
    "none": "image/png",
}
TRACE_HOT = "abc-7f3e21"  # the X-Trace value `~h "X-Trace: abc"` finds (0.1% of flows)
NEEDLE_RATE = 0.0005  # share of flows with "needle" in a body


def make_hosts(n: int = 200) -> list[str]:
    hosts: list[str] = []
    i = 0
    while len(hosts) < n:
        kind = KINDS[i % len(KINDS)]
        tld = TLDS[(i // len(KINDS)) % len(TLDS)]
        hosts.append(f"{kind}{i // (len(KINDS) * len(TLDS)) or ''}.{tld}")
        i += 1
    return hosts


HOSTS = make_hosts()
# Zipf-like: the k-th host is asked for in proportion to 1 / k**1.1
HOST_WEIGHTS = [1 / (k**1.1) for k in range(1, len(HOSTS) + 1)]


class Traffic:
    """Flow events like the proxy's ``capture.flow_event``, in time order."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.seq = 0
        r = self.rnd
        total = sum(HOST_WEIGHTS)
        acc = 0.0
        self.cum = []
        for w in HOST_WEIGHTS:
            acc += w / total
            self.cum.append(acc)
        # pools of bodies (b64, size): real bodies repeat in shape, not in bytes
        self.json_bodies = [self._b64(self._json(r.randrange(150, 700))) for _ in range(1500)]
        self.js_bodies = [self._b64(self._js(r.randrange(200, 600))) for _ in range(300)]
        self.html_bodies = [self._b64(self._html(r.randrange(300, 800))) for _ in range(300)]
        self.req_bodies = [self._b64(self._json(r.randrange(60, 300))) for _ in range(500)]
        self.needle = [self._b64(self._json(300, needle=True)) for _ in range(20)]

    @staticmethod
    def _b64(data: bytes) -> tuple[str, int]:
        return base64.b64encode(data).decode(), len(data)

    def _json(self, n: int, needle: bool = False) -> bytes:
        r = self.rnd
        items = []
        size = 2
        while size < n:
            word = r.choice(WORDS)
            item = (
                f'{{"id":{r.randrange(10**7)},"name":"{word} {r.choice(WORDS)}",'
                f'"active":{"true" if r.random() < 0.8 else "false"},"score":{r.random():.3f}}}'
            )
            items.append(item)
            size += len(item) + 1
        if needle:
            items.insert(len(items) // 2, '{"note":"a needle in the haystack"}')
        return ("[" + ",".join(items) + "]").encode()

    def _js(self, n: int) -> bytes:
        r = self.rnd
        out = []
        size = 0
        while size < n:
            line = (
                f"function {r.choice(WORDS)}{r.randrange(999)}(a,b){{return a+b*{r.random():.4f}}}"
            )
            out.append(line)
            size += len(line) + 1
        return ("\n".join(out)).encode()

    def _html(self, n: int) -> bytes:
        r = self.rnd
        parts = ["<!doctype html><html><head><title>shop</title></head><body>"]
        size = len(parts[0])
        while size < n:
            p = f'<p class="{r.choice(WORDS)}">{" ".join(r.choices(WORDS, k=8))}</p>'
            parts.append(p)
            size += len(p)
        parts.append("</body></html>")
        return "".join(parts).encode()

    def host(self) -> str:
        x = self.rnd.random()
        lo, hi = 0, len(self.cum) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self.cum[mid] < x:
                lo = mid + 1
            else:
                hi = mid
        return HOSTS[lo]

    def path(self, host: str, method: str) -> tuple[str, str]:
        """(path, response kind: json/js/html/none)"""
        r = self.rnd
        kind = host.split(".", 1)[0].rstrip("0123456789")
        if kind in ("api", "auth"):
            res = r.choice(RESOURCES)
            version = "v1" if r.random() < 0.7 else "v2"
            if method == "POST":
                return f"/api/{version}/{res}", "json"
            roll = r.random()
            if roll < 0.5:
                return f"/api/{version}/{res}/{r.randrange(1, 200000)}", "json"
            if roll < 0.7:
                sub = r.choice(RESOURCES)
                return f"/api/{version}/{res}/{r.randrange(1, 200000)}/{sub}", "json"
            return f"/api/{version}/{res}?page={r.randrange(1, 40)}&limit=50", "json"
        if kind in ("cdn", "static", "img"):
            if r.random() < 0.5:
                return f"/static/{r.choice(WORDS)}.{r.randrange(99)}.js", "js"
            return f"/img/{r.choice(WORDS)}/{r.randrange(5000)}.png", "none"
        if kind == "search":
            return f"/search?q={r.choice(WORDS)}+{r.choice(WORDS)}&page={r.randrange(5)}", "json"
        roll = r.random()
        if roll < 0.3:
            return "/", "html"
        if roll < 0.6:
            return f"/products/{r.choice(WORDS)}-{r.randrange(3000)}", "html"
        return f"/search?q={r.choice(WORDS)}", "html"

    def flow_id(self, ms: int, node: int) -> str:
        self.seq += 1
        return f"{ms:012x}{node:06x}{self.seq & 0xFFFFFF:06x}"

    def event(self, start: float) -> dict[str, Any]:
        r = self.rnd
        replica, node = REPLICAS[r.randrange(len(REPLICAS))]
        host = self.host()
        method = METHODS[r.randrange(len(METHODS))]
        path, body_kind = self.path(host, method)
        status = STATUSES[r.randrange(len(STATUSES))]
        roll = r.random()
        state = "completed" if roll < 0.992 else "error" if roll < 0.996 else "active"
        if state == "active":
            status = 0
        ua = USER_AGENTS[r.randrange(len(USER_AGENTS))]
        req_headers = [
            ["Host", host],
            ["User-Agent", ua],
            ["Accept", "application/json" if body_kind == "json" else "*/*"],
            ["Accept-Encoding", "gzip, deflate, br"],
        ]
        req_body = ("", 0)
        if method in ("POST", "PUT", "PATCH"):
            req_body = self.req_bodies[r.randrange(len(self.req_bodies))]
            req_headers.append(["Content-Type", "application/json"])
            req_headers.append(["Content-Length", str(req_body[1])])
        trace_roll = r.random()
        if trace_roll < 0.001:
            req_headers.append(["X-Trace", f"{TRACE_HOT}-{r.randrange(100):02d}"])
        elif trace_roll < 0.15:
            req_headers.append(["X-Trace", f"{r.getrandbits(64):016x}"])
        if r.random() < 0.3:
            req_headers.append(["Cookie", "<redacted>"])
        duration = r.expovariate(1 / 0.06) + 0.002
        request: dict[str, Any] = {"headers": req_headers, "size": req_body[1], "truncated": False}
        response: dict[str, Any] | None = None
        error = None
        if state == "completed":
            if status in (204, 304, 301) or method == "HEAD" or body_kind == "none":
                body = ("", 0) if body_kind != "none" or status != 200 else ("", 2048)
            elif r.random() < NEEDLE_RATE:
                body = self.needle[r.randrange(len(self.needle))]
            elif body_kind == "js":
                body = self.js_bodies[r.randrange(len(self.js_bodies))]
            elif body_kind == "html":
                body = self.html_bodies[r.randrange(len(self.html_bodies))]
            else:
                body = self.json_bodies[r.randrange(len(self.json_bodies))]
            if r.random() < NEEDLE_RATE:  # a request body with it
                req_body = self.needle[r.randrange(len(self.needle))]
                request["size"] = req_body[1]
            ctype = CONTENT_TYPES[body_kind]
            resp_headers = [
                ["Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(start))],
                ["Server", "nginx/1.26.2" if r.random() < 0.6 else "envoy"],
                ["Content-Type", ctype],
                ["Content-Length", str(body[1])],
            ]
            if body_kind == "js":
                resp_headers.append(["Cache-Control", "public, max-age=31536000, immutable"])
            if status == 301:
                resp_headers.append(["Location", f"https://{host}/"])
            if r.random() < 0.05:
                resp_headers.append(["Set-Cookie", "<redacted>"])
            response = {
                "status": status,
                "reason": REASONS[status],
                "http_version": "HTTP/1.1",
                "headers": resp_headers,
                "size": body[1],
                "truncated": not body[0] and body[1] > 0,  # an image over the capture limit
                "body_b64": body[0],
            }
            request["body_b64"] = req_body[0]
        elif state == "error":
            request["body_b64"] = req_body[0]
            error = "upstream connection reset"
        https = r.random() < 0.85
        end = start + duration if state != "active" else None
        return {
            "event": state if state != "active" else "started",
            "id": self.flow_id(int(start * 1000), node),
            "replica": replica,
            "kind": "http",
            "state": state,
            "client": [f"10.0.{r.randrange(8)}.{r.randrange(2, 250)}", r.randrange(32768, 61000)],
            "server": [f"203.0.113.{r.randrange(1, 250)}", 443 if https else 80],
            "scheme": "https" if https else "http",
            "method": method,
            "host": host,
            "port": 443 if https else 80,
            "path": path,
            "http_version": "HTTP/1.1",
            "request": request,
            "response": response,
            "timings": {
                "start": start,
                "request_sent": start + 0.0004,
                "first_byte": start + duration * 0.8 if response else None,
                "end": end,
            },
            "error": error,
            "stats": None,
            "trace_id": None,
            "traceparent": None,
            "tags": [],
        }


def cache_paths(flows: int) -> tuple[Path, Path]:
    db = CACHE / f"queries-v{GEN_VERSION}-{flows}.db"
    return db, db.with_suffix(".json")


async def generate(db: Path, count: int) -> dict[str, Any]:
    """``count`` flows over ``SPAN_S`` seconds up to now, through ``SQLiteRepository.ingest``."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)  # noqa: ASYNC240
    db.parent.mkdir(parents=True, exist_ok=True)
    repo = SQLiteRepository(db, ingest_workers=2)
    await repo.open()
    traffic = Traffic(seed=GEN_VERSION)
    end = time.time()
    begin = end - SPAN_S
    step = SPAN_S / count
    per_msg, per_call = 100, 20
    slots = asyncio.Semaphore(3)
    tasks: list[asyncio.Task[Any]] = []
    t0 = time.perf_counter()

    async def write(payloads: list[bytes]) -> None:
        try:
            result = await repo.ingest(payloads)
            if result.bad_events:
                raise SystemExit(f"the store refused {result.bad_events} generated events")
        finally:
            slots.release()

    try:
        k = 0
        rnd = traffic.rnd
        while k < count:
            payloads = []
            for _ in range(per_call):
                n = min(per_msg, count - k)
                if n <= 0:
                    break
                events = [
                    traffic.event(begin + (k + i) * step + rnd.random() * step * 0.9)
                    for i in range(n)
                ]
                k += n
                payloads.append(orjson.dumps(events))
            await slots.acquire()
            tasks.append(asyncio.create_task(write(payloads)))
            if len(tasks) % 100 == 0:
                rate = k / (time.perf_counter() - t0)
                log(f"  {k:,} flows written ({rate:,.0f} flows/s)")
        await asyncio.gather(*tasks)
    finally:
        await repo.close()
    took = time.perf_counter() - t0
    size = db.stat().st_size  # noqa: ASYNC240
    log(f"generated {count:,} flows in {took:.0f}s ({size >> 20} MiB)")
    return {
        "version": GEN_VERSION,
        "flows": count,
        "generated_at": end,
        "seconds": took,
        "bytes": size,
    }


# -- processes -----------------------------------------------------------------------------
def start_proc(name: str, cmd: list[str], env: dict[str, str], work: Path) -> subprocess.Popen[str]:
    logf = (work / f"{name}.log").open("a")
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=logf,
        text=True,
        start_new_session=True,
    )


def expect_line(proc: subprocess.Popen[str], word: str, name: str, work: Path) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if word not in line:
        proc.kill()
        tail = (work / f"{name}.log").read_text(errors="replace")[-2000:]
        raise SystemExit(f"{name} did not start ({line!r}):\n{tail}")


def stop_proc(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss(pid: int) -> int:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.NoSuchProcess:
        return 0


def cpu(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except psutil.NoSuchProcess:
        return 0.0


class Sampler:
    """RSS of some processes every 50 ms, in a thread: start, peak, end."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start = {n: rss(p) for n, p in pids.items()}
        self.peak = dict(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss(pid))

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        self._thread.join()
        out = {}
        for name, pid in self.pids.items():
            end = rss(pid)
            out[name] = {
                "start_mib": self.start[name] / 2**20,
                "peak_mib": max(self.peak[name], end) / 2**20,
                "end_mib": end / 2**20,
            }
        return out


# -- measurements ------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s)) - 1))]


async def time_listing(
    client: httpx.AsyncClient, params: dict[str, Any], samples: int, warmup: int, budget: float
) -> dict[str, Any]:
    """``warmup`` discarded requests, then ``samples`` timed ones, fewer (at least 20) when
    the warm-up says they would take more than ``budget`` seconds."""
    times: list[float] = []
    reply: dict[str, Any] = {}
    warm: list[float] = []
    i = 0
    while i < warmup + samples:
        t0 = time.perf_counter()
        r = await client.get("/api/flows", params=params)
        took = (time.perf_counter() - t0) * 1000
        if r.status_code != 200:
            raise SystemExit(f"GET /api/flows {params}: {r.status_code} {r.text[:500]}")
        if i >= warmup:
            times.append(took)
        else:
            warm.append(took)
            if i == warmup - 1:
                fit = int(budget * 1000 / statistics.median(warm))
                samples = max(20, min(samples, fit))
        if i == 0:
            reply = r.json()
        i += 1
    out: dict[str, Any] = {
        "p50_ms": statistics.median(times),
        "p99_ms": pct(times, 0.99),
        "max_ms": max(times),
        "samples": len(times),
        "rows": len(reply.get("flows", [])),
        "filtered_count": reply.get("filtered_count"),
        "count_exact": reply.get("filtered_count_exact"),
    }
    if "scanned" in reply:
        out["scanned"] = reply["scanned"]
        out["partial"] = reply["partial"]
    return out


async def har_export(
    client: httpx.AsyncClient, since: float, pids: dict[str, int]
) -> dict[str, Any]:
    sampler = Sampler(pids)
    cpu0 = {n: cpu(p) for n, p in pids.items()}
    marker = b'"_flow_id"'
    count = 0
    size = 0
    tail = b""
    first_byte = None
    t0 = time.perf_counter()
    async with client.stream("GET", "/api/flows/har", params={"since": since}) as r:
        if r.status_code != 200:
            await r.aread()
            raise SystemExit(f"HAR export: {r.status_code} {r.text[:500]}")
        async for chunk in r.aiter_raw():
            if first_byte is None:
                first_byte = time.perf_counter() - t0
            size += len(chunk)
            joined = tail + chunk
            count += joined.count(marker)
            # a marker cut by a chunk boundary is counted once, in the next round
            tail = joined[-(len(marker) - 1) :]
            count -= tail.count(marker)
    took = time.perf_counter() - t0
    mem = sampler.stop()
    used = {n: cpu(p) - cpu0[n] for n, p in pids.items()}
    return {
        "flows": count,
        "bytes": size,
        "seconds": took,
        "first_byte_s": first_byte,
        "flows_per_s": count / took,
        "rss": mem,
        "cpu_cores": {n: c / took for n, c in used.items()},
    }


# -- diagnosis (store side, in this process, on the same file) ---------------------------------
def explain(db: Path, query: dict[str, Any], scan_limit: int) -> list[dict[str, Any]]:
    """Every statement the store's ``search.listing`` runs for ``query`` (repeats of one
    statement, such as the vocabulary's index seeks, folded into one line), timed, with
    its EXPLAIN QUERY PLAN."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.execute("PRAGMA cache_size = -32768")
    conn.execute("PRAGMA mmap_size = 268435456")
    ran: list[dict[str, Any]] = []

    def execute(statement: str, params: list[object]) -> list[tuple[Any, ...]]:
        t0 = time.perf_counter()
        rows = conn.execute(statement, params).fetchall()
        took = (time.perf_counter() - t0) * 1000
        if ran and ran[-1]["sql"] == statement:
            ran[-1]["calls"] += 1
            ran[-1]["ms"] += took
        else:
            ran.append({"sql": statement, "params": params, "calls": 1, "ms": took})
        return rows

    p = plan(FlowQuery.model_validate(query))
    search.listing(execute, p, scan_limit)
    out = []
    for s in ran:
        plan_rows = conn.execute("EXPLAIN QUERY PLAN " + s["sql"], s["params"]).fetchall()
        out.append(
            {
                "sql": _short(s["sql"]),
                "calls": s["calls"],
                "ms": round(s["ms"], 2),
                "plan": [r[-1] for r in plan_rows],
            }
        )
    conn.close()
    return out


def _short(statement: str) -> str:
    text = statement.replace(search.sql.SUMMARY, "<summary>")
    return text if len(text) < 400 else text[:400] + " ..."


def profile_listing(db: Path, query: dict[str, Any], scan_limit: int) -> str:
    """cProfile of the store's listing code for ``query`` (what a reader thread runs)."""
    repo = SQLiteRepository(db, scan_limit=scan_limit)
    p = plan(FlowQuery.model_validate(query))
    repo._listing(p, True)  # warm: connection, cache
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        repo._listing(p, True)
    prof.disable()
    for conn in repo._reader_conns:
        conn.close()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
    return _trim_stats(buf.getvalue())


def _trim_stats(text: str) -> str:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(line.replace(str(ROOT) + "/", "") for line in lines[start:] if line.strip())


def profile_export(db: Path, since: float, pages: int = 20) -> dict[str, Any]:
    """Per-flow cost of each step of the export, the store's and the API's code run here
    one page (250 flows) at a time: store list + read + serialise, API decode, HAR. The
    steps are timed on ``pages`` pages, then the same pages run again under cProfile."""
    from services.api.routes.har import PAGE_FLOWS
    from services.store.export import budget

    repo = SQLiteRepository(db)
    max_bytes = budget(8 << 20)
    steps = {"store list": 0.0, "store read+serialise": 0.0, "api decode": 0.0, "api har": 0.0}
    flows = 0

    def walk(timed: bool) -> None:
        nonlocal flows
        cursor = None
        for _ in range(pages):
            q = {"since": since, "limit": PAGE_FLOWS, "cursor": cursor}
            p = plan(FlowQuery.model_validate(q))
            t0 = time.perf_counter()
            listing = repo._listing(p, False)  # as ``list`` for an export page: no count
            t1 = time.perf_counter()
            ids = [s["id"] for s in listing.flows]
            exported = repo._export_records(ids, max_bytes)
            reply = orjson.dumps(
                {"flows": [orjson.Fragment(d) for _, d in exported.flows], "next_cursor": None}
            )
            t2 = time.perf_counter()
            page = orjson.loads(reply)
            t3 = time.perf_counter()
            har.entries_chunk(page["flows"], False)
            t4 = time.perf_counter()
            if timed:
                steps["store list"] += t1 - t0
                steps["store read+serialise"] += t2 - t1
                steps["api decode"] += t3 - t2
                steps["api har"] += t4 - t3
                flows += len(ids)
            cursor = listing.next_cursor

    walk(timed=False)  # warm the page cache
    walk(timed=True)
    prof = cProfile.Profile()
    prof.enable()
    walk(timed=False)
    prof.disable()
    for conn in repo._reader_conns:
        conn.close()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
    return {
        "us_per_flow": {k: round(v / flows * 1e6, 1) for k, v in steps.items()},
        "profile": _trim_stats(buf.getvalue()),
    }


# -- main ----------------------------------------------------------------------------------------
def cases(hosts: dict[str, str]) -> list[dict[str, Any]]:
    top, tail = hosts["top"], hosts["tail"]
    return [
        {"name": "plain limit=100", "params": {}, "target_p99_ms": None},
        {"name": f"host={top}", "params": {"host": top}, "target_p99_ms": None},
        {"name": f"host={tail}", "params": {"host": tail}, "target_p99_ms": None},
        {"name": f"~d {top} & ~c 200", "params": {"q": f"~d {top} & ~c 200"},
         "target_p99_ms": 30},
        {"name": f"~d {tail} & ~c 200", "params": {"q": f"~d {tail} & ~c 200"},
         "target_p99_ms": 30},
        {"name": "~m POST & ~c 500", "params": {"q": "~m POST & ~c 500"}, "target_p99_ms": 30},
        {"name": "~u /api/v[0-9]+/users", "params": {"q": "~u /api/v[0-9]+/users"},
         "target_p99_ms": 300},
        {"name": '~h "X-Trace: abc"', "params": {"q": '~h "X-Trace: abc"'},
         "target_p99_ms": None},
        {"name": "~b needle", "params": {"q": "~b needle"}, "target_p99_ms": None},
    ]  # fmt: skip


def pick_hosts(db: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """The most asked-for host and the 101st (from the tail)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    by_host = {
        h: n for h, n in conn.execute("SELECT host, count(*) FROM flows GROUP BY host")
    }  # ~1 s: one pass over the host index
    ranked = sorted(by_host, key=by_host.__getitem__, reverse=True)
    hosts = {"top": ranked[0], "tail": ranked[min(len(ranked) - 1, 100)]}
    stats = {"hosts": len(ranked), "top_share": by_host[hosts["top"]] / sum(by_host.values()),
             "tail_share": by_host[hosts["tail"]] / sum(by_host.values())}  # fmt: skip
    conn.close()
    return hosts, stats


def since_for(db: Path, n: int) -> tuple[float, int]:
    """A ``since`` (epoch s) whose id bound selects the newest ``n`` flows, and how many it
    selects (the bound has millisecond resolution)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    (fid,) = conn.execute(
        "SELECT id FROM flows ORDER BY id DESC LIMIT 1 OFFSET ?", [n - 1]
    ).fetchone()
    ms = int(fid[:12], 16)
    (count,) = conn.execute("SELECT count(*) FROM flows WHERE id >= ?", [f"{ms:012x}"]).fetchone()
    conn.close()
    return ms / 1000 + 0.0001, int(count)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    db, meta_path = cache_paths(args.flows)
    if args.regenerate or not meta_path.exists() or not db.exists():
        meta_path.unlink(missing_ok=True)
        log(f"generating {args.flows:,} flows into {db.relative_to(ROOT)} ...")
        meta = await generate(db, args.flows)
        meta_path.write_text(json.dumps(meta))
    else:
        meta = json.loads(meta_path.read_text())
        log(f"using cached {db.relative_to(ROOT)} ({meta['flows']:,} flows, v{meta['version']})")
    hosts, host_stats = pick_hosts(db)
    since, har_count = since_for(db, args.har_flows)
    log(f"hosts: top {hosts['top']} ({host_stats['top_share']:.1%}), "
        f"tail {hosts['tail']} ({host_stats['tail_share']:.2%}); HAR since={since:.3f} "
        f"selects {har_count:,} flows")  # fmt: skip

    work = Path(tempfile.mkdtemp(prefix="pf-queries-"))
    nats = EmbeddedNats(work / "nats", log_file=work / "nats.log")
    nats.start()
    key = secrets.token_urlsafe(24)
    api_listen = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(
        FLEET_NATS_URL=nats.url,
        FLEET_DATA_DIR=str(work / "data"),
        FLEET_LOG_LEVEL="WARNING",
    )
    store_env = dict(
        env,
        FLEET_STORE_DB=str(db),
        FLEET_REPLICA_ID="bench-store",
        FLEET_STORE_MAX_FLOWS="100000000",
        FLEET_STORE_MAX_AGE=str(10 * 365 * 86400),
        FLEET_STORE_SCAN_LIMIT=str(args.scan_limit),
    )
    api_env = dict(env, FLEET_API_LISTEN=api_listen, FLEET_API_KEYS=f"bench:read:{key}")
    api_env["FLEET_API_STORE_TIMEOUT"] = "30"
    store = start_proc("store", [str(BIN / "proxyfleet"), "store"], store_env, work)
    api = None
    results: dict[str, Any] = {}
    try:
        expect_line(store, "proxyfleet store", "store", work)
        api = start_proc("api", [str(BIN / "proxyfleet"), "api"], api_env, work)
        expect_line(api, "proxyfleet api", "api", work)
        pids = {"api": api.pid, "store": store.pid}
        headers = {"X-API-Key": key}
        limits = httpx.Timeout(60.0)
        async with httpx.AsyncClient(
            base_url=f"http://{api_listen}", headers=headers, timeout=limits
        ) as client:
            for _ in range(100):
                try:
                    if (await client.get("/api/flows", params={"limit": 1})).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            only = set(args.only.split(",")) if args.only else None
            listings: dict[str, Any] = {}
            for case in cases(hosts):
                if only and not any(o in case["name"] for o in only):
                    continue
                params = {"limit": 100, **case["params"]}
                res = await time_listing(
                    client, params, args.samples, args.warmup, args.case_budget
                )
                res["target_p99_ms"] = case["target_p99_ms"]
                if case["target_p99_ms"] is not None:
                    res["met"] = res["p99_ms"] <= case["target_p99_ms"]
                listings[case["name"]] = res
                extra = ""
                if "scanned" in res:
                    extra = f" scanned={res['scanned']} partial={res['partial']}"
                log(f"{case['name']:40s} p50={res['p50_ms']:7.2f} ms p99={res['p99_ms']:7.2f} ms"
                    f" rows={res['rows']} count={res['filtered_count']}{extra}")  # fmt: skip
            results["listing"] = listings
            if args.har_runs:
                runs = []
                for i in range(args.har_runs):
                    res = await har_export(client, since, pids)
                    runs.append(res)
                    log(f"HAR export run {i + 1}: {res['flows']:,} flows, "
                        f"{res['bytes'] / 2**20:.0f} MiB in {res['seconds']:.1f}s = "
                        f"{res['flows_per_s']:,.0f} flows/s; CPU api "
                        f"{res['cpu_cores']['api']:.2f} store {res['cpu_cores']['store']:.2f}; "
                        f"RSS api {_mem(res['rss']['api'])}, "
                        f"store {_mem(res['rss']['store'])}")  # fmt: skip
                results["har"] = {
                    "since": since,
                    "selected": har_count,
                    "runs": runs,
                    "median_flows_per_s": statistics.median(r["flows_per_s"] for r in runs),
                    "target_flows_per_s": 20000,
                }
                results["har"]["met"] = results["har"]["median_flows_per_s"] >= 20000
    finally:
        if api is not None:
            stop_proc(api)
        stop_proc(store)
        nats.stop()
        shutil.rmtree(work, ignore_errors=True)

    results["data"] = {**meta, **host_stats, "hosts_used": hosts}
    if not args.no_explain:
        diag: dict[str, Any] = {}
        for case in cases(hosts):
            if "q" not in case["params"]:
                continue
            if args.only and not any(o in case["name"] for o in args.only.split(",")):
                continue
            diag[case["name"]] = explain(db, {"limit": 100, **case["params"]}, args.scan_limit)
        results["explain"] = diag
    if not args.no_profile:
        filtered = {k: v for k, v in results.get("listing", {}).items() if "~" in k}
        # the slowest filter measured (not the scans, whose cost is their budget), else ~d
        exact = {k: v for k, v in filtered.items() if "scanned" not in v} or filtered
        slowest = max(exact, key=lambda k: exact[k]["p99_ms"]) if exact else None
        case = next((c for c in cases(hosts) if c["name"] == slowest), cases(hosts)[4])
        results["profile_listing"] = {
            "case": case["name"],
            "stats": profile_listing(db, {"limit": 100, **case["params"]}, args.scan_limit),
        }
        if args.har_runs:
            results["profile_export"] = profile_export(db, since)
    return results


def _mem(m: dict[str, float]) -> str:
    return f"{m['start_mib']:.0f}/{m['peak_mib']:.0f}/{m['end_mib']:.0f} MiB"


def report(results: dict[str, Any]) -> None:
    print()
    print("| query (limit=100) | p50 ms | p99 ms | target p99 | met | rows | count | scanned |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.get("listing", {}).items():
        target = f"<= {r['target_p99_ms']} ms" if r["target_p99_ms"] is not None else "-"
        met = "-" if "met" not in r else ("yes" if r["met"] else "**no**")
        count = r["filtered_count"]
        count_s = f"{count}{'' if r.get('count_exact') else '+'}" if count is not None else "-"
        scanned = f"{r['scanned']}{' partial' if r['partial'] else ''}" if "scanned" in r else "-"
        print(f"| `{name}` | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {target} | {met} | "
              f"{r['rows']} | {count_s} | {scanned} |")  # fmt: skip
    h = results.get("har")
    if h:
        print()
        print("| HAR export run | flows | MiB | s | flows/s | API CPU | store CPU | "
              "API RSS start/peak/end | store RSS start/peak/end |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for i, r in enumerate(h["runs"], 1):
            print(f"| {i} | {r['flows']:,} | {r['bytes'] / 2**20:.0f} | {r['seconds']:.2f} | "
                  f"{r['flows_per_s']:,.0f} | {r['cpu_cores']['api']:.2f} | "
                  f"{r['cpu_cores']['store']:.2f} | {_mem(r['rss']['api'])} | "
                  f"{_mem(r['rss']['store'])} |")  # fmt: skip
        met = "yes" if h["met"] else "**no**"
        print(f"\nHAR median {h['median_flows_per_s']:,.0f} flows/s (target >= 20,000: {met})")
    for name, statements in results.get("explain", {}).items():
        print(f"\nEXPLAIN {name}:")
        for s in statements:
            print(f"  {s['calls']}x {s['ms']:.1f} ms  {s['sql'][:160]}")
            for line in s["plan"]:
                print(f"      {line}")
    if "profile_listing" in results:
        print(f"\nstore-side cProfile, {results['profile_listing']['case']} (5 calls):")
        print(results["profile_listing"]["stats"])
    if "profile_export" in results:
        print("\nexport, per flow (this process, one page of 250 at a time):",
              results["profile_export"]["us_per_flow"])  # fmt: skip
        print(results["profile_export"]["profile"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flows", type=int, default=1_000_000, help="flows in the database")
    parser.add_argument("--samples", type=int, default=300, help="timed requests per query")
    parser.add_argument("--warmup", type=int, default=10, help="discarded requests per query")
    parser.add_argument(
        "--case-budget", type=float, default=60, help="seconds of samples per query, at most"
    )
    parser.add_argument("--har-flows", type=int, default=100_000, help="flows the export holds")
    parser.add_argument("--har-runs", type=int, default=HAR_RUNS, help="exports (0: none)")
    parser.add_argument("--scan-limit", type=int, default=20_000, help="FLEET_STORE_SCAN_LIMIT")
    parser.add_argument("--only", help="comma-separated substrings of the query names to run")
    parser.add_argument("--regenerate", action="store_true", help="rebuild the cached database")
    parser.add_argument("--no-explain", action="store_true", help="skip EXPLAIN QUERY PLAN")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile runs")
    parser.add_argument("--output", help="JSON file (default bench/results/queries-<date>.json)")
    args = parser.parse_args()
    log(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    results = asyncio.run(run(args))
    results["machine"] = {
        "cpus": os.cpu_count(),
        "load_average_end": os.getloadavg(),
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
        "utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    results["args"] = vars(args)
    report(results)
    out = Path(args.output) if args.output else RESULTS / f"queries-{dt.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    log(f"results written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
