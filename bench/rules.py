"""What the rules policy costs the data plane, and what held exchanges cost (make bench-rules).

One proxy replica (``proxyfleet proxy``, flow capture on) in front of nginx, one run:

1. HTTP keep-alive through wrk (c=50 and c=1), with the policy at each of:
   ``none`` (no rules: the addon is not in the chain), ``20-miss`` (20 rules of the usual
   kinds, none of which matches), ``20-hit`` (the same 19 plus a ``set_headers`` that
   matches every request). The three are measured round-robin, ``--rounds`` times, and
   the median is reported, so that drift of a shared machine falls on all three alike.
2. ``--held N`` exchanges held at once by an intercept rule (N raw connections, one
   request each): the replica's RSS per held exchange and its CPU while they wait,
   then how long closing the clients takes to free them all.

    .venv/bin/python bench/rules.py [--duration 10] [--rounds 3] [--held 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import sys
import time
from typing import Any

import nats
import orjson
from infra import (
    HTTP_PORT,
    RUN,
    Procs,
    ensure_system_tools,
    log,
    make_test_pki,
    start_nats,
    start_nginx,
    tree_cpu,
    tree_rss,
)
from run import Target, run_wrk, start_ours

from libs.common import subjects

MISSES = [
    *(
        {"filter": f"~d ads-{i}.tracker.example", "action": {"type": "block", "status": 403}}
        for i in range(5)
    ),
    *(
        {"filter": f"~u /private/{i}/", "action": {"type": "tag", "tags": [f"p{i}"]}}
        for i in range(5)
    ),
    *(
        {"filter": f"~m DELETE & ~d api-{i}.example", "action": {"type": "delay", "ms": 10}}
        for i in range(4)
    ),
    *(
        {
            "filter": f"~hq x-debug-{i}",
            "action": {"type": "set_headers", "headers": [["X-Debugged", "1"]]},
        }
        for i in range(5)
    ),
]
MISS_20 = [*MISSES, {"filter": "~d never.example & ~u /x", "action": {"type": "allow"}}]
HIT = {"filter": "~u /", "action": {"type": "set_headers", "headers": [["X-Policy", "on"]]}}
POLICIES: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "20-miss": MISS_20,
    "20-hit": [*MISSES, HIT],
}


def document(rules: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(
        {
            "rules": [
                {"id": f"r{i}", "match": {"filter": r["filter"]}, "action": r["action"]}
                for i, r in enumerate(rules)
            ]
        }
    )


async def put_policy(nats_url: str, replica: str, raw: bytes) -> int:
    """Write a policy revision and wait until the replica reports it applied."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        kv = await js.key_value(subjects.POLICY_BUCKET)
        revision = await kv.put(subjects.POLICY_KEY, raw)
        reg = await js.key_value(subjects.REPLICAS_BUCKET)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = json.loads((await reg.get(replica)).value or b"{}")
            if status.get("policy_revision") == revision:
                return revision
            if status.get("policy_error"):
                raise RuntimeError(status["policy_error"])
            await asyncio.sleep(0.1)
        raise RuntimeError(f"policy revision {revision} not applied")
    finally:
        await nc.close()


async def replica_status(nats_url: str, replica: str) -> dict[str, Any]:
    nc = await nats.connect(nats_url)
    try:
        reg = await nc.jetstream().key_value(subjects.REPLICAS_BUCKET)
        status: dict[str, Any] = json.loads((await reg.get(replica)).value or b"{}")
        return status
    finally:
        await nc.close()


def measure(t: Target, args: argparse.Namespace, nats_url: str, replica: str) -> dict[str, Any]:
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rnd in range(1, args.rounds + 1):
        for name, rules in POLICIES.items():
            asyncio.run(put_policy(nats_url, replica, document(rules)))
            for conns in (50, 1):
                run_wrk(t, conns, args.warmup)
                res = run_wrk(t, conns, args.duration)
                runs.setdefault(name, {}).setdefault(f"c{conns}", []).append(res)
                log(
                    f"{name:8} c={conns:<2} r{rnd}: {res['rps']:>9,.0f}/s  p50 "
                    f"{res['p50_ms']:.3f}  p99 {res['p99_ms']:.3f} ms  cpu {res['target_cpu']:.2f}"
                    f"  errors {res['errors']}"
                )
    out: dict[str, Any] = {}
    for name, by_conns in runs.items():
        out[name] = {
            key: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50_ms", "p99_ms")}
            | {"cpu_us": statistics.median(r["target_cpu"] / r["rps"] * 1e6 for r in rs)}
            | {"errors": sum(r["errors"] for r in rs)}
            for key, rs in by_conns.items()
        }
    return out


def report(res: dict[str, Any]) -> None:
    base = res["none"]
    lines = [
        "| policy | req/s c=50 | vs none | p50 ms c=50 | p99 ms c=50 | CPU us/req c=50 "
        "| vs none | p50 ms c=1 | errors |",
        "|" + "---|" * 9,
    ]
    for name, r in res.items():
        c50, c1 = r["c50"], r["c1"]
        rel = (c50["rps"] / base["c50"]["rps"] - 1) * 100
        cpu = (c50["cpu_us"] / base["c50"]["cpu_us"] - 1) * 100
        lines.append(
            f"| {name} | {c50['rps']:,.0f} | {rel:+.1f}% | {c50['p50_ms']:.3f} | "
            f"{c50['p99_ms']:.3f} | {c50['cpu_us']:.1f} | {cpu:+.1f}% | {c1['p50_ms']:.3f} | "
            f"{c50['errors'] + c1['errors']} |"
        )
    print("\nRules cost (one replica, HTTP keep-alive through wrk, same run):\n" + "\n".join(lines))


def hold_many(t: Target, n: int, nats_url: str, replica: str) -> dict[str, float]:
    """``n`` exchanges held by an intercept rule at once: memory and CPU while held."""
    hold = [{"filter": "~u /held", "action": {"type": "intercept", "timeout_s": 600}}]
    asyncio.run(put_policy(nats_url, replica, document(hold)))
    time.sleep(1.0)
    rss0 = tree_rss(t.pid)
    assert t.port is not None
    socks = []
    request = f"GET http://127.0.0.1:{HTTP_PORT}/held HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", t.port))
        s.sendall(request)
        socks.append(s)
    deadline = time.monotonic() + 60
    pending = 0
    while time.monotonic() < deadline:
        pending = asyncio.run(replica_status(nats_url, replica)).get("intercepts_pending", 0)
        if pending >= n:
            break
        time.sleep(0.5)
    time.sleep(2.0)  # let the heartbeat and the capture of the started events settle
    rss1 = tree_rss(t.pid)
    cpu0, w0 = tree_cpu(t.pid), time.perf_counter()
    time.sleep(10.0)
    cpu_held = (tree_cpu(t.pid) - cpu0) / (time.perf_counter() - w0)
    t0 = time.perf_counter()
    for s in socks:
        s.close()
    while time.perf_counter() - t0 < 30:
        if asyncio.run(replica_status(nats_url, replica)).get("intercepts_pending", 0) == 0:
            break
        time.sleep(0.1)
    freed = time.perf_counter() - t0
    out = {
        "held": float(pending),
        "rss_before_mib": rss0 / 2**20,
        "rss_held_mib": rss1 / 2**20,
        "bytes_per_held": (rss1 - rss0) / max(pending, 1),
        "cpu_while_held": cpu_held,
        "freed_s": freed,
    }
    return out


def print_held(out: dict[str, float]) -> None:
    print(
        f"\nHeld exchanges: {out['held']:.0f} held at once; replica RSS "
        f"{out['rss_before_mib']:.1f} -> {out['rss_held_mib']:.1f} MiB "
        f"({out['bytes_per_held'] / 1024:.1f} KiB per held exchange, its client connection "
        f"included); CPU while held {out['cpu_while_held'] * 100:.2f}% of a core; all freed "
        f"{out['freed_s']:.1f} s after their clients closed (seen through the heartbeat)"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--held", type=int, default=1000)
    args = p.parse_args()
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir(parents=True)
    ensure_system_tools()
    procs = Procs(RUN / "logs")
    try:
        ca, cert, key = make_test_pki(RUN / "pki")
        start_nginx(procs, cert, key)
        nats_url = start_nats(procs)
        replica = "bench-rules"
        started = start_ours(procs, nats_url, ca, {"FLEET_REPLICA_ID": replica})
        if started is None:
            return 1
        t = Target("ours", procs.started["ours"].pid, started[0], None)
        # held first, on a fresh replica: later traffic leaves freed memory for them to reuse
        held = hold_many(t, args.held, nats_url, replica) if args.held else None
        res = measure(t, args, nats_url, replica)
        report(res)
        if held is not None:
            print_held(held)
            res["held"] = held
        (RUN / "rules.json").write_text(json.dumps(res, indent=1))
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
