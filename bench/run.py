"""proxyfleet benchmark: direct nginx vs mitmdump (recording flows) vs our proxy.

One run on one machine, one target after another: HTTP keep-alive through wrk (c=50, c=1),
HTTPS interception keep-alive through bench/tls_load.py (c=50, c=1), and a new CONNECT + TLS
handshake per request (c=10). Prints a markdown table, ratios ours / mitmdump and added
latency at c=1; raw results go to bench/.run/results.jsonl. See bench/README.md.
``--tracing off,1.0,0.01`` also runs our proxy's HTTP rows once per tracing setting
(OTLP/HTTP export to a local sink, bench/otlp_sink.py) and prints each one's cost vs off.

    .venv/bin/python bench/run.py [--only direct,mitm,ours] [--duration 10] [--rounds 1]
                                  [--no-https] [--soak 1000000] [--tracing off,1.0,0.01]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra import (
    BENCH,
    HTTP_PORT,
    HTTPS_PORT,
    ROOT,
    RUN,
    Procs,
    children_cpu,
    curl_check,
    ensure_mitmdump,
    ensure_system_tools,
    free_port,
    log,
    make_test_pki,
    start_nats,
    start_nginx,
    tool_version,
    tree_cpu,
    tree_rss,
    which,
)

TARGETS = ("direct", "mitm", "before", "ours")
LABELS = {  # (HTTP row, HTTPS keep-alive row, HTTPS new-connection row)
    "direct": (
        "a) direct nginx (no proxy)",
        "HTTPS direct nginx :18443 (tls_load, no proxy)",
        "HTTPS direct nginx, new TLS connection per request, c=10",
    ),
    "mitm": (
        "b') mitmdump -q -w flows.mitm",
        "HTTPS mitmdump -w, TLS interception",
        "HTTPS mitmdump -w, new CONNECT+TLS per request, c=10",
    ),
    "before": (
        "c0) proxyfleet proxy, --baseline tree",
        "HTTPS proxyfleet --baseline tree, TLS interception",
        "HTTPS proxyfleet --baseline tree, new CONNECT+TLS per request, c=10",
    ),
    "ours": (
        "c) proxyfleet proxy",
        "HTTPS proxyfleet, TLS interception",
        "HTTPS proxyfleet, new CONNECT+TLS per request, c=10",
    ),
}
BASELINE: list[Path] = []  # the --baseline tree, when given
HTTP_URL = f"http://127.0.0.1:{HTTP_PORT}/"
HTTPS_URL = f"https://127.0.0.1:{HTTPS_PORT}/"
Result = dict[str, Any]
Results = dict[str, Result]  # scenario key -> median result


@dataclass(frozen=True)
class Scenario:
    key: str
    tool: str  # "wrk" or "tls"
    conns: int
    reconnect: bool = False


SCENARIOS = (
    Scenario("http_c50", "wrk", 50),
    Scenario("http_c1", "wrk", 1),
    Scenario("https_c50", "tls", 50),
    Scenario("https_c1", "tls", 1),
    Scenario("https_new_c10", "tls", 10, reconnect=True),
)


@dataclass(frozen=True)
class Target:
    name: str
    pid: int  # root of the process tree whose CPU and RSS we measure
    port: int | None  # proxy port; None for direct
    cafile: Path | None  # CA the HTTPS client trusts; None when HTTPS is unavailable


# --- measuring ----------------------------------------------------------------------------


def parse_wrk(output: str) -> Result:
    line = next((ln for ln in output.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError("wrk printed no RESULT line:\n" + output[-2000:])
    f = {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
    secs = f["duration_us"] / 1e6
    errors = sum(v for k, v in f.items() if k.startswith("err_"))
    return {
        "requests": f["requests"],
        "rps": f["requests"] / secs if secs else 0.0,
        "p50_ms": f["p50_us"] / 1000,
        "p90_ms": f["p90_us"] / 1000,
        "p99_ms": f["p99_us"] / 1000,
        "max_ms": f["max_us"] / 1000,
        "errors": errors,
        "wrk": {k: v for k, v in f.items() if k.startswith("err_") and v},
    }


def run_wrk(t: Target, conns: int, secs: int) -> Result:
    url = HTTP_URL if t.port is None else f"http://127.0.0.1:{t.port}"
    env = {**os.environ, "UPSTREAM": HTTP_URL}
    if t.port is None:
        env["DIRECT"] = "1"
    wrk = which("wrk") or "wrk"
    cmd = [wrk, "-t1", f"-c{conns}", f"-d{secs}s", "--latency", "-s", str(BENCH / "proxy.lua"), url]
    cpu0, client0, t0 = tree_cpu(t.pid), children_cpu(), time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=secs + 60)
    wall = time.perf_counter() - t0
    res = parse_wrk(out.stdout)
    res["target_cpu"] = (tree_cpu(t.pid) - cpu0) / wall
    res["client_cpu"] = (children_cpu() - client0) / wall
    return res


def run_tls(t: Target, sc: Scenario, secs: int) -> Result:
    assert t.cafile is not None
    cmd = [sys.executable, str(BENCH / "tls_load.py"), "--url", HTTPS_URL]
    cmd += ["--cafile", str(t.cafile), "--conns", str(sc.conns), "--duration", str(secs)]
    cmd += ["--expect", "1024"]
    if t.port is not None:
        cmd += ["--proxy", f"127.0.0.1:{t.port}"]
    if sc.reconnect:
        cmd.append("--reconnect")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(secs + 90, proc.kill)
    watchdog.start()
    cpu0, t0, res = tree_cpu(t.pid), time.perf_counter(), None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "START":
                cpu0, t0 = tree_cpu(t.pid), time.perf_counter()
            elif line.startswith("{"):
                wall = time.perf_counter() - t0
                res = json.loads(line)
                res["target_cpu"] = (tree_cpu(t.pid) - cpu0) / wall
        _, err = proc.communicate(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if res is None or not res["requests"]:
        why = res["last_error"] if res else err.strip()[-2000:]
        raise RuntimeError(f"tls_load failed (rc={proc.returncode}): {why}")
    res["client_cpu"] = res["client_cpu_s"] / secs
    return res


def run_scenario(t: Target, sc: Scenario, secs: int) -> Result:
    return run_wrk(t, sc.conns, secs) if sc.tool == "wrk" else run_tls(t, sc, secs)


def bench_target(t: Target, args: argparse.Namespace, sink: Callable[[Result], None]) -> Results:
    rounds: dict[str, list[Result]] = {}
    scenarios = [sc for sc in SCENARIOS if sc.tool == "wrk" or t.cafile is not None]
    for rnd in range(1, args.rounds + 1):
        for sc in scenarios:
            try:
                if args.warmup > 0:
                    run_scenario(t, sc, args.warmup)
                res = run_scenario(t, sc, args.duration)
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                log(f"{t.name} {sc.key} round {rnd} FAILED: {exc}")
                continue
            res.update(target=t.name, scenario=sc.key, round=rnd, conns=sc.conns)
            sink(res)
            rounds.setdefault(sc.key, []).append(res)
            log(
                f"{t.name:6} {sc.key:14} r{rnd}: {res['rps']:>9,.0f}/s  p50 {res['p50_ms']:.3f}"
                f"  p99 {res['p99_ms']:.3f} ms  cpu {res['target_cpu']:.2f}"
                f"  client {res['client_cpu']:.2f}  errors {res['errors']}"
            )
    return {key: median_result(runs) for key, runs in rounds.items()}


NUMERIC = ("rps", "p50_ms", "p90_ms", "p99_ms", "max_ms", "target_cpu", "client_cpu")


def median_result(runs: list[Result]) -> Result:
    med: Result = {k: statistics.median(r[k] for r in runs) for k in NUMERIC}
    med["errors"] = sum(int(r["errors"]) + int(r.get("connect_errors", 0)) for r in runs)
    med["rounds"] = len(runs)
    return med


# --- targets ------------------------------------------------------------------------------


def wait_file(path: Path, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > 0:
            return True
        time.sleep(0.1)
    return False


def start_proxy(procs: Procs, name: str, cmd: list[str], env: dict[str, str], port: int) -> bool:
    log(f"starting {name}: {' '.join(cmd)}")
    try:
        procs.start(name, cmd, env)
    except OSError as exc:
        log(f"{name} FAILED to start: {exc}")
        return False
    if not procs.wait_port(name, port, timeout=30):
        log(f"{name} FAILED: not accepting on 127.0.0.1:{port}\n{procs.log_tail(name)}")
        return False
    return True


def start_mitm(procs: Procs, mitmdump: Path) -> tuple[int, Path] | None:
    port, confdir = free_port(), RUN / "mitmconf"
    cmd = [str(mitmdump), "--listen-host", "127.0.0.1", "--listen-port", str(port), "-q"]
    cmd += ["--ssl-insecure", "--set", f"confdir={confdir}", "-w", str(RUN / "flows.mitm")]
    if not start_proxy(procs, "mitm", cmd, dict(os.environ), port):
        return None
    return port, confdir / "mitmproxy-ca-cert.pem"


_nats: list[str] = []  # the run's NATS URL, once started


def run_nats(procs: Procs) -> str:
    """The run's NATS server (started on first use, shared by every start of ours)."""
    if not _nats or not procs.alive("nats"):
        _nats[:] = [start_nats(procs)]
    return _nats[0]


def start_ours(
    procs: Procs,
    nats_url: str,
    upstream_ca: Path,
    extra_env: dict[str, str] | None = None,
    tree: Path | None = None,
    name: str = "ours",
) -> tuple[int, Path] | None:
    """Start ``proxyfleet proxy`` from this tree, or from ``tree`` (another checkout, run
    with this venv: the before/after comparison in one run)."""
    port, data = free_port(), RUN / ("pf" if tree is None else "pf-before")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "OTEL_"))}
    env.update(
        FLEET_NATS_URL=nats_url,
        FLEET_DATA_DIR=str(data),
        FLEET_PROXY_LISTEN=f"127.0.0.1:{port}",
        FLEET_UPSTREAM_CA_BUNDLE=str(upstream_ca),
        FLEET_LOG_LEVEL="WARNING",
        FLEET_DRAIN_TIMEOUT="2",  # quick stop between targets
        **(extra_env or {}),
    )
    cmd = [str(ROOT / ".venv" / "bin" / "proxyfleet"), "proxy"]
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
        launcher = "import sys; from services.cli import main; sys.exit(main())"
        cmd = [str(ROOT / ".venv" / "bin" / "python"), "-c", launcher, "proxy"]
    if not start_proxy(procs, name, cmd, env, port):
        return None
    return port, data / "ca.pem"


def start_target(name: str, procs: Procs, mitmdump: Path | None, ca: Path) -> Target | None:
    """Start one target (nginx is already up for ``direct``); None if it did not start."""
    started: tuple[int, Path] | None
    if name == "direct":
        return Target(name, procs.started["nginx"].pid, None, ca)
    if name == "mitm":
        assert mitmdump is not None
        started = start_mitm(procs, mitmdump)
    elif name == "before":
        started = start_ours(procs, run_nats(procs), ca, tree=BASELINE[0], name="before")
    else:
        started = start_ours(procs, run_nats(procs), ca)
    if started is None:
        procs.stop(name)
        return None
    return Target(name, procs.started[name].pid, *started)


def check_target(t: Target, https: bool) -> tuple[bool, Path | None]:
    """(HTTP ok, CA for HTTPS or None) after ``curl`` checks through the target."""
    problem = curl_check(t.port, HTTP_URL, None)
    if problem:
        log(f"{t.name} FAILED its HTTP check, skipping it: {problem}")
        return False, None
    if not https:
        return True, None
    if t.cafile is None or not wait_file(t.cafile):
        log(f"{t.name}: no CA certificate at {t.cafile}, skipping its HTTPS rows")
        return True, None
    problem = curl_check(t.port, HTTPS_URL, t.cafile)
    if problem:
        log(f"{t.name} FAILED its HTTPS check, skipping its HTTPS rows: {problem}")
        return True, None
    return True, t.cafile


# --- tracing cost -------------------------------------------------------------------------


def sink_stats(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as resp:
        stats: dict[str, int] = json.load(resp)
        return stats


def dropped_spans(proxy_log: str) -> int:
    """Spans the exporter queue dropped, from the proxy's (rate-limited) SDK warnings."""
    found = re.finditer(r"Queue full, dropping [^\n(]*(?:\((\d+) more)?", proxy_log)
    return sum(1 + int(m.group(1) or 0) for m in found)


def bench_tracing(
    args: argparse.Namespace, procs: Procs, ca: Path, sink: Callable[[Result], None]
) -> dict[str, Results]:
    """Our proxy's HTTP rows once per tracing ratio, exporting to a local OTLP sink."""
    out: dict[str, Results] = {}
    ratios = [r for r in args.tracing if r != "off"]
    if not ratios:
        return out
    sink_port = free_port()
    procs.start(
        "otlp-sink", [sys.executable, str(BENCH / "otlp_sink.py"), "--port", str(sink_port)]
    )
    if not procs.wait_port("otlp-sink", sink_port, timeout=15):
        log("otlp sink FAILED to start, skipping the tracing rows\n" + procs.log_tail("otlp-sink"))
        return out
    for ratio in ratios:
        env = {
            "FLEET_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
            "FLEET_TRACE_SAMPLE_RATIO": ratio,
        }
        log(f"ours with tracing, sample ratio {ratio}")
        started = start_ours(procs, run_nats(procs), ca, env)
        if started is None:
            procs.stop("ours")
            continue
        t = Target("ours", procs.started["ours"].pid, started[0], None)  # HTTP rows only
        ok, _ = check_target(t, https=False)
        if ok:
            before = sink_stats(sink_port)
            res = bench_target(t, args, lambda r, ratio=ratio: sink({**r, "tracing": ratio}))
            procs.stop("ours")  # shutdown flushes the spans still queued
            after = sink_stats(sink_port)
            logged = (procs.logs / "ours.log").read_text(errors="replace")
            res["spans"] = {
                "exported": after["spans"] - before["spans"],
                "export_requests": after["requests"] - before["requests"],
                "dropped": dropped_spans(logged),
            }
            sink({"target": "ours", "scenario": "tracing_spans", "tracing": ratio, **res["spans"]})
            out[ratio] = res
        procs.stop("ours")
    procs.stop("otlp-sink")
    return out


def report_tracing(off: Results, traced: dict[str, Results]) -> None:
    """Cost of each tracing setting vs off: throughput, latency, proxy CPU per request."""
    head = (
        "| tracing | req/s c=50 | p50 ms c=50 | p99 ms c=50 | proxy CPU c=50 | CPU us/req c=50 "
        "| p50 ms c=1 | req/s c=1 | req/s vs off c=50 | CPU/req vs off | p50 c=1 vs off |"
    )
    lines = [head, "|" + "---|" * 11]
    base50, base1 = off.get("http_c50"), off.get("http_c1")

    def cpu_us(r: Result) -> float:
        return float(r["target_cpu"]) / r["rps"] * 1e6 if r["rps"] else 0.0

    def pct(a: float, b: float) -> str:
        return f"{(a / b - 1) * 100:+.1f}%" if b else "-"

    for name, res in [("off", off), *traced.items()]:
        c50, c1 = res.get("http_c50"), res.get("http_c1")
        cells = [name]
        cells += (
            [
                f"{c50['rps']:,.0f}",
                ms(c50["p50_ms"]),
                ms(c50["p99_ms"]),
                f"{c50['target_cpu']:.2f}",
                f"{cpu_us(c50):.1f}",
            ]
            if c50
            else ["-"] * 5
        )
        cells += [ms(c1["p50_ms"]), f"{c1['rps']:,.0f}"] if c1 else ["-"] * 2
        if name == "off":
            cells += ["", "", ""]
        else:
            cells.append(pct(c50["rps"], base50["rps"]) if c50 and base50 else "-")
            cells.append(pct(cpu_us(c50), cpu_us(base50)) if c50 and base50 else "-")
            if c1 and base1:
                cells.append(f"{c1['p50_ms'] - base1['p50_ms']:+.3f} ms")
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    print("\nTracing cost (our proxy, HTTP keep-alive, same run):\n" + "\n".join(lines))
    for name, res in traced.items():
        sp = res.get("spans")
        if sp:
            print(
                f"- tracing {name}: {sp['exported']:,} spans exported in "
                f"{sp['export_requests']:,} OTLP requests; {sp['dropped']:,} spans dropped "
                "(exporter queue full)"
            )
    print()


# --- soak ---------------------------------------------------------------------------------


def soak(t: Target, flows: int, rate: float, sink: Callable[[Result], None]) -> None:
    """Push ``flows`` requests through the proxy with wrk, sampling its RSS every second."""
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sampler() -> None:
        while not stop.is_set():
            samples.append((time.monotonic() - t0, tree_rss(t.pid)))
            stop.wait(1.0)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    done, errors, rate = 0, 0, max(rate, 100.0)
    log(f"soak: {flows:,} flows through {t.name} at about {rate:,.0f}/s")
    try:
        while done < flows:
            secs = max(1, min(20, math.ceil((flows - done) / rate)))
            res = run_wrk(t, 50, secs)
            if not res["requests"]:
                log("soak: no requests completed, stopping")
                break
            done, errors, rate = done + res["requests"], errors + res["errors"], res["rps"]
            mib = tree_rss(t.pid) / 2**20
            log(f"soak: {done:,}/{flows:,} flows, {rate:,.0f}/s, RSS {mib:.1f} MiB")
        time.sleep(3.0)  # idle: let the capture queue drain before the last sample
    finally:
        stop.set()
        thread.join()
    samples.append((time.monotonic() - t0, tree_rss(t.pid)))
    rss = [s[1] / 2**20 for s in samples]
    summary = {"start_mib": rss[0], "max_mib": max(rss), "end_mib": rss[-1]}
    sink({"target": t.name, "scenario": "soak", "flows": done, "errors": errors, **summary})
    print(
        f"\nSoak ({t.name}): {done:,} flows, {errors} errors, {len(samples)} RSS samples: "
        f"RSS start {rss[0]:.1f} MiB, max {max(rss):.1f} MiB, end {rss[-1]:.1f} MiB\n"
    )


# --- report -------------------------------------------------------------------------------


def ms(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def row(
    label: str, c50: Result | None, c1: Result | None, cpu_label: str = "", unit: str = ""
) -> str:
    def mark(r: Result) -> str:
        return f"{unit} ({r['errors']} err)" if r["errors"] else unit

    if c50 is None:
        cells = ["-"] * 5
    else:
        cpu = f"{c50['target_cpu']:.2f}"
        cells = [
            f"{c50['rps']:,.0f}{mark(c50)}",
            ms(c50["p50_ms"]),
            ms(c50["p99_ms"]),
            f"- ({cpu_label} {cpu})" if cpu_label else cpu,
            f"{c50['client_cpu']:.2f}",
        ]
    if c1 is None:
        cells += ["-"] * 3
    else:
        cells += [ms(c1["p50_ms"]), ms(c1["p99_ms"]), f"{c1['rps']:,.0f}{mark(c1)}"]
    return "| " + " | ".join([label, *cells]) + " |"


def report(all_res: dict[str, Results], versions: dict[str, str]) -> None:
    head = (
        "| target | req/s c=50 | p50 ms c=50 | p99 ms c=50 | proxy CPU c=50 | client CPU c=50 "
        "| p50 ms c=1 | p99 ms c=1 | req/s c=1 |"
    )
    lines = [head, "|" + "---|" * 9]

    def nginx(name: str) -> str:
        return "nginx" if name == "direct" else ""

    for name, res in all_res.items():
        lines.append(row(LABELS[name][0], res.get("http_c50"), res.get("http_c1"), nginx(name)))
    for name, res in all_res.items():
        if "https_c50" in res or "https_c1" in res:
            c50, c1 = res.get("https_c50"), res.get("https_c1")
            lines.append(row(LABELS[name][1], c50, c1, nginx(name)))
    for name, res in all_res.items():
        if "https_new_c10" in res:
            new = res["https_new_c10"]
            lines.append(row(LABELS[name][2], new, None, nginx(name), unit=" conn/s"))
    print("\n" + "\n".join(lines) + "\n")
    print_ratios(all_res)
    print("Versions: " + "; ".join(f"{k}: {v}" for k, v in versions.items()))


def print_ratios(all_res: dict[str, Results]) -> None:
    direct, mitm, before, ours = (all_res.get(name, {}) for name in TARGETS)
    out = []
    for sc in SCENARIOS:
        for label, res in (("ours", ours), ("before", before)):
            a, b = res.get(sc.key), mitm.get(sc.key)
            if a and b and b["rps"]:
                out.append(f"- {label} / mitmdump, {sc.key}: {a['rps'] / b['rps']:.1f}x req/s")
        a, b = ours.get(sc.key), before.get(sc.key)
        if a and b and b["rps"]:
            out.append(f"- ours / before, {sc.key}: {a['rps'] / b['rps']:.2f}x req/s")
    for name, res in (("ours", ours), ("before", before), ("mitmdump", mitm)):
        for key in ("http_c1", "https_c1"):
            if key in res and key in direct:
                added = res[key]["p50_ms"] - direct[key]["p50_ms"]
                out.append(f"- added p50 latency at c=1, {name}, {key[:-3]}: {added:+.3f} ms")
    if out:
        print("Ratios (same run, same machine):\n" + "\n".join(out) + "\n")


# --- main ---------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--only",
        default="direct,mitm,ours",
        help="comma list of direct,mitm,ours (and before, with --baseline)",
    )
    p.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    p.add_argument("--rounds", type=int, default=1, help="runs per figure (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="discarded warm-up run, seconds")
    p.add_argument("--no-https", action="store_true", help="skip the HTTPS scenarios")
    p.add_argument("--soak", type=int, default=0, metavar="N", help="push N flows through ours")
    p.add_argument(
        "--tracing",
        default="",
        metavar="LIST",
        help="also run ours' HTTP rows per tracing setting, e.g. off,1.0,0.01 (sample ratios)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="TREE",
        help="also measure proxyfleet from another checkout (e.g. a git worktree of an "
        "earlier commit) as target 'before', in the same run",
    )
    args = p.parse_args()
    args.targets = [t.strip() for t in args.only.split(",") if t.strip()]
    if args.baseline is not None:
        if not (args.baseline / "services" / "cli.py").is_file():
            p.error(f"--baseline {args.baseline}: not a proxyfleet checkout")
        BASELINE[:] = [args.baseline.resolve()]
        if "before" not in args.targets:
            args.targets.append("before")
    elif "before" in args.targets:
        p.error("target 'before' needs --baseline TREE")
    bad = set(args.targets) - set(TARGETS)
    if bad or not args.targets:
        p.error(f"--only takes a comma list of {','.join(TARGETS)}; got {args.only!r}")
    args.targets = [t for t in TARGETS if t in args.targets]
    if args.soak and "ours" not in args.targets:
        p.error("--soak needs the 'ours' target")
    args.tracing = [t.strip() for t in args.tracing.split(",") if t.strip()]
    for setting in args.tracing:
        try:
            ok = setting == "off" or 0.0 <= float(setting) <= 1.0
        except ValueError:
            ok = False
        if not ok:
            p.error(f"--tracing takes 'off' or sample ratios in [0, 1]; got {setting!r}")
    if args.tracing and "ours" not in args.targets:
        p.error("--tracing needs the 'ours' target (its untraced run is the 'off' baseline)")
    return args


def run(args: argparse.Namespace, procs: Procs) -> None:
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir(parents=True)
    ensure_system_tools()
    versions = {"wrk": tool_version([which("wrk") or "wrk", "-v"]).split(" [")[0]}
    versions["nginx"] = tool_version([which("nginx") or "nginx", "-v"])
    mitmdump = ensure_mitmdump() if "mitm" in args.targets else None
    if mitmdump is not None:
        versions["mitmproxy"] = tool_version([str(mitmdump), "--version"])
        log(f"mitmproxy: {versions['mitmproxy']}")
    ca, cert, key = make_test_pki(RUN / "pki")
    start_nginx(procs, cert, key)
    for url, cafile in ((HTTP_URL, None), (HTTPS_URL, ca)):
        problem = curl_check(None, url, cafile)
        if problem:
            raise RuntimeError(f"upstream check failed: {problem}")
    all_res: dict[str, Results] = {}
    with (RUN / "results.jsonl").open("w") as jsonl:

        def sink(res: Result) -> None:
            jsonl.write(json.dumps(res) + "\n")
            jsonl.flush()

        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        meta_args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        sink({"scenario": "meta", "time": now, "args": meta_args, **versions})
        for name in args.targets:
            t = start_target(name, procs, mitmdump, ca)
            if t is None:
                continue
            ok, https_ca = check_target(t, not args.no_https)
            if ok:
                t = Target(name, t.pid, t.port, https_ca)
                log(f"{name}: checks passed, RSS {tree_rss(t.pid) / 2**20:.1f} MiB; measuring")
                all_res[name] = bench_target(t, args, sink)
                if name == "ours" and args.soak:
                    rate = all_res[name].get("http_c50", {}).get("rps", 0.0)
                    soak(t, args.soak, rate, sink)
            if name != "direct":
                procs.stop(name)
        traced = bench_tracing(args, procs, ca, sink) if args.tracing else {}
    report(all_res, versions)
    if args.tracing and "ours" in all_res:
        report_tracing(all_res["ours"], traced)
    log(f"raw results: {(RUN / 'results.jsonl').relative_to(ROOT)}")


def main() -> int:
    args = parse_args()
    procs = Procs(RUN / "logs")

    def on_term(signum: int, _frame: object) -> None:
        log("terminated: stopping everything this run started")
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        run(args, procs)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        log(f"FAILED: {exc}")
        return 1
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
