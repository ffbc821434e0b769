"""The command-line client against a real ``proxyfleet up``: each command is run as a user
runs it (``proxyfleet ...`` in a subprocess, the key from FLEET_API_KEY or from the key
file ``up`` wrote), with real traffic through the proxy.

The API's own key must never appear in any output; every run checks that.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest

from libs.common import subjects
from services.client.render import FLOW_COLUMNS
from tests.e2e.system import System
from tests.integration.harness import Upstream, free_port

PROXYFLEET = str(Path(sys.executable).parent / "proxyfleet")


@dataclass
class Run:
    code: int
    out: str
    err: str
    raw: bytes

    def json(self) -> Any:
        return json.loads(self.out)


def _env(system: System, via: str = "file", **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env.update(FLEET_API_URL=system.api, COLUMNS="250", TERM="dumb")
    env.pop("FORCE_COLOR", None)
    if via == "file":  # the key file ``up`` wrote
        env["FLEET_DATA_DIR"] = str(system.data_dir)
    else:  # no key file to fall back to
        env["FLEET_DATA_DIR"] = "/nonexistent-proxyfleet"
    if via == "env":
        env["FLEET_API_KEY"] = system.key
    env.update(extra)
    return env


async def cli(
    system: System, *args: str, via: str = "file", stdin: bytes | None = None, **env: str
) -> Run:
    proc = await asyncio.create_subprocess_exec(
        PROXYFLEET,
        *args,
        env=_env(system, via, **env),
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    text, errors = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    assert system.key not in text and system.key not in errors, "the API key was printed"
    assert proc.returncode is not None
    return Run(proc.returncode, text, errors, out)


async def ok(system: System, *args: str, **kw: Any) -> Run:
    run = await cli(system, *args, **kw)
    assert run.code == 0, (args, run.code, run.out, run.err)
    return run


async def eventually(check: Any, timeout: float = 15.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.2)


async def flows_matching(system: System, q: str, n: int = 1) -> list[dict[str, Any]]:
    """Wait until ``flows ls -q q`` lists ``n`` finished flows."""

    async def done() -> list[dict[str, Any]] | None:
        run = await cli(system, "flows", "ls", "-q", q, "--json")
        if run.code != 0:  # the store restarting, say
            return None
        flows = [f for f in run.json()["flows"] if f["state"] != "active"]
        return flows if len(flows) >= n else None

    found: list[dict[str, Any]] = await eventually(done)
    return found


class Lines:
    """A long-running command (tail, watch) whose stdout is read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.seen: list[str] = []

    @classmethod
    async def start(cls, system: System, *args: str) -> Lines:
        proc = await asyncio.create_subprocess_exec(
            PROXYFLEET,
            *args,
            env=_env(system),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def stderr_line(self, timeout: float = 15) -> str:
        assert self.proc.stderr is not None
        line = await asyncio.wait_for(self.proc.stderr.readline(), timeout)
        return line.decode()

    async def until(self, predicate: Any, timeout: float = 20) -> dict[str, Any]:
        assert self.proc.stdout is not None
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching line; saw {self.seen[-5:]}")
            line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            assert line, f"the command ended; saw {self.seen[-5:]}"
            self.seen.append(line.decode())
            doc = json.loads(line)
            if predicate(doc):
                return dict(doc)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
        await asyncio.wait_for(self.proc.wait(), 10)


# -- connection, errors --------------------------------------------------------------------------
async def test_status_table_and_json_with_either_key_source(system: System) -> None:
    table = await ok(system, "status")  # key from $FLEET_DATA_DIR/api-key
    assert "fleet running" in table.out
    doc = (await ok(system, "status", "--json", via="env")).json()  # key from FLEET_API_KEY
    assert doc["state"] == "running" and len(doc["replicas"]) == 1
    replica = doc["replicas"][0]["id"]
    assert replica in table.out and "127.0.0.1" in table.out
    key_file = system.data_dir / "api-key"
    by_flag = await ok(system, "--key-file", str(key_file), "status", "--json", via="none")
    assert by_flag.json()["state"] == "running"


async def test_errors_are_one_problem_and_an_exit_code(system: System, tmp_path: Path) -> None:
    bad = await cli(system, "keys", "ls", via="none", FLEET_API_KEY="not-the-secret-4711")
    assert bad.code == 1 and bad.out == ""
    assert "error: the API key is not valid (AUTH_REQUIRED)" in bad.err
    assert "not-the-secret-4711" not in bad.err

    missing = await cli(system, "flows", "show", "0123456789abcdef01234567")
    assert missing.code == 1 and "(FLOW_NOT_FOUND)" in missing.err

    bad_filter = await cli(system, "flows", "ls", "-q", "~zz")
    assert bad_filter.code == 1 and "(BAD_FILTER)" in bad_filter.err
    assert "query.q" in bad_filter.err and "position 0" in bad_filter.err

    usage = await cli(system, "flows", "ls", "--limit", "0")
    assert usage.code == 2

    no_key = await cli(system, "status", via="none", FLEET_DATA_DIR=str(tmp_path))
    assert no_key.code == 2 and "no API key" in no_key.err

    down = await cli(system, "status", FLEET_API_URL=f"http://127.0.0.1:{free_port()}")
    assert down.code == 1 and down.out == ""
    assert down.err.strip().count("\n") == 0 and "connection refused" in down.err


async def test_stop_then_start(system: System) -> None:
    stopped = await ok(system, "stop", "--deadline", "1")
    assert ": stopped" in stopped.out
    assert (await ok(system, "status", "--json")).json()["state"] == "stopped"
    assert "fleet stopped" in (await ok(system, "status")).out
    started = (await ok(system, "start", "--json")).json()
    assert started["ok"] is True and started["action"] == "start"
    assert (await ok(system, "status", "--json")).json()["state"] == "running"
    unknown = await cli(system, "stop", "--replica", "no-such-replica")
    assert unknown.code == 1 and "REPLICA_NOT_FOUND" in unknown.err, unknown.err


# -- flows -----------------------------------------------------------------------------------
async def test_flows_ls_show_bodies_decode_har_replay(
    system: System, upstream: Upstream, tmp_path: Path
) -> None:
    original = b'{"hello": "gzip through the cli"}' * 20
    packed = gzip.compress(original)
    async with httpx.AsyncClient(proxy=system.proxy, timeout=15) as client:
        r = await client.post(
            f"{upstream.http}/echo/cli-gzip",
            content=packed,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )
        assert r.status_code == 200
        assert (await client.get(f"{upstream.http}/echo/cli-plain")).status_code == 200

    both = await flows_matching(system, "~u /echo/cli-", 2)
    gz = await flows_matching(system, "~u cli-gzip & ~m POST")
    assert len(gz) == 1 and gz[0]["path"] == "/echo/cli-gzip"
    flow_id = gz[0]["id"]

    listing = await ok(system, "flows", "ls", "-q", "~u /echo/cli-")
    assert "/echo/cli-gzip" in listing.out and "/echo/cli-plain" in listing.out
    header = listing.out.splitlines()[0].split()
    assert header == list(FLOW_COLUMNS)
    assert flow_id in listing.out and "POST" in listing.out
    by_host = await ok(system, "flows", "ls", "--host", "127.0.0.1", "--json", "--limit", "1000")
    assert {f["id"] for f in both} <= {f["id"] for f in by_host.json()["flows"]}

    shown = await ok(system, "flows", "show", flow_id)
    assert "POST http://127.0.0.1" in shown.out and "Content-Encoding" in shown.out
    assert "gzip" in shown.out and "── response" in shown.out
    raw = await ok(system, "flows", "show", flow_id, "--body", "request")
    assert raw.raw == packed
    decoded = await ok(system, "flows", "show", flow_id, "--body", "request", "--decode")
    assert decoded.raw == original
    doc = (await ok(system, "flows", "show", flow_id, "--decode", "--json")).json()
    assert doc["id"] == flow_id and doc["request"]["decoded"] is True
    assert doc["request"]["content_encoding"] == "gzip"
    people = await ok(system, "flows", "show", flow_id, "--decode")
    assert "decoded from gzip" in people.out and "gzip through the cli" in people.out

    har = tmp_path / "cli.har"
    exported = await ok(system, "flows", "har", "-q", "~u /echo/cli-", "-o", str(har))
    entries = json.loads(har.read_text())["log"]["entries"]
    assert len(entries) == len(both) == 2
    assert {e["_flow_id"] for e in entries} == {f["id"] for f in both}
    assert "wrote 2 entries" in exported.out

    replayed = await ok(system, "flows", "replay", flow_id, "--json")
    new_id = replayed.json()["flow_id"]
    assert replayed.json()["replay_of"] == flow_id
    again = await flows_matching(system, "~replay & ~u cli-gzip")
    assert new_id in {f["id"] for f in again}

    not_active = await cli(system, "flows", "kill", flow_id)
    assert not_active.code == 1 and "(FLOW_NOT_ACTIVE)" in not_active.err


async def test_flows_kill_an_active_flow(system: System, upstream: Upstream) -> None:
    async with httpx.AsyncClient(proxy=system.proxy, timeout=30) as client:
        async with client.stream("GET", f"{upstream.http}/drip?s=0.05&n=400") as resp:
            chunks = resp.aiter_bytes()
            await chunks.__anext__()

            async def active() -> str | None:
                run = await cli(system, "flows", "ls", "--state", "active", "--json")
                mine = [f for f in run.json()["flows"] if f["path"].startswith("/drip")]
                return mine[0]["id"] if mine else None

            flow_id = await eventually(active)
            killed = await ok(system, "flows", "kill", flow_id)
            assert f"killed flow {flow_id}" in killed.out
            with pytest.raises(httpx.HTTPError):
                async for _ in chunks:
                    pass


async def test_flows_tail_follows_and_resumes_after_the_api_restarts(
    system: System, upstream: Upstream
) -> None:
    tail = await Lines.start(system, "flows", "tail", "--json", "-q", "~u /echo/cli-tail")
    try:
        assert "following flows" in await tail.stderr_line()
        async with httpx.AsyncClient(proxy=system.proxy, timeout=15) as client:
            await client.get(f"{upstream.http}/echo/cli-tail-1")
            first = await tail.until(lambda e: e["path"] == "/echo/cli-tail-1")
            assert first["method"] == "GET" and "body_b64" not in first["request"]

            # the API goes away (``up`` restarts it); a flow happens meanwhile
            system.child("api").send_signal(signal.SIGKILL)
            await client.get(f"{upstream.http}/echo/cli-tail-2")
            second = await tail.until(lambda e: e["path"] == "/echo/cli-tail-2", timeout=30)
            assert second["event"] in ("started", "completed")
        note = await tail.stderr_line()
        assert "reconnecting" in note
        ids = [json.loads(line)["id"] for line in tail.seen]
        assert first["id"] in ids and second["id"] in ids
    finally:
        await tail.stop()

    async def api_back() -> bool:
        return (await cli(system, "status")).code == 0

    await eventually(api_back, 30)


# -- config ----------------------------------------------------------------------------------
async def test_config_set_get_history_diff_rollback(system: System) -> None:
    before = (await ok(system, "config", "get", "--json")).json()
    await ok(system, "config", "set", "client_idle_timeout=61")
    base = (await ok(system, "config", "get", "--json")).json()
    set_run = await ok(
        system, "config", "set", "capture_body_limit=12345", 'ignore_hosts=["cli.invalid"]'
    )
    assert "config revision" in set_run.out and "applied:" in set_run.out
    assert (await ok(system, "config", "get", "capture_body_limit")).out.strip() == "12345"
    after = (await ok(system, "config", "get", "--json")).json()
    assert after["config"]["ignore_hosts"] == ["cli.invalid"]
    assert after["config"]["client_idle_timeout"] == 61
    assert after["revision"] > base["revision"] > before["revision"]

    history = await ok(system, "config", "history")
    row = next(x for x in history.out.splitlines() if x.startswith(str(after["revision"])))
    assert "capture_body_limit, ignore_hosts" in row and "client_idle_timeout" not in row
    revisions = (await ok(system, "config", "history", "--json")).json()["revisions"]
    assert {after["revision"], base["revision"]} <= {r["revision"] for r in revisions}

    async def in_sync() -> bool:
        return bool((await ok(system, "config", "diff", "--json")).json()["in_sync"])

    await eventually(in_sync)
    assert "in sync" in (await ok(system, "config", "diff")).out

    rolled = await ok(system, "config", "rollback", str(base["revision"]))
    assert "config revision" in rolled.out
    assert (await ok(system, "config", "get", "--json")).json()["config"] == base["config"]
    await ok(system, "config", "set", "client_idle_timeout=null")  # back to its default
    assert (await ok(system, "config", "get", "--json")).json()["config"] == before["config"]

    unknown = await cli(system, "config", "rollback", "999999")
    assert unknown.code == 1 and "(CONFIG_REVISION_NOT_FOUND)" in unknown.err


EDITOR = """
import json, os, sys
path = sys.argv[1]
doc = json.load(open(path))
doc["capture_body_limit"] = json.loads(os.environ["EDIT_VALUE"])
open(path, "w").write(json.dumps(doc))
"""


async def test_config_edit_refuses_an_invalid_document(system: System, tmp_path: Path) -> None:
    script = tmp_path / "editor.py"
    script.write_text(EDITOR)
    editor = f"{sys.executable} {script}"
    before = (await ok(system, "config", "get", "--json")).json()

    bad = await cli(system, "config", "edit", EDITOR=editor, EDIT_VALUE='"lots"')
    assert bad.code == 1, (bad.out, bad.err)
    assert "(CONFIG_INVALID)" in bad.err and "body.capture_body_limit" in bad.err
    assert "unchanged" in bad.err
    assert (await ok(system, "config", "get", "--json")).json() == before

    good = await ok(system, "config", "edit", EDITOR=editor, EDIT_VALUE="7777")
    assert "config revision" in good.out
    assert (await ok(system, "config", "get", "capture_body_limit")).out.strip() == "7777"
    await ok(
        system, "config", "set", f"capture_body_limit={before['config']['capture_body_limit']}"
    )


# -- rules -------------------------------------------------------------------------------------
async def test_rules_add_ls_disable_enable_rm(system: System) -> None:
    rule = {
        "id": "cli-block",
        "match": {"filter": "~d blocked.invalid"},
        "action": {"type": "block"},
    }
    added = await ok(system, "rules", "add", json.dumps(rule))
    assert "added rule cli-block" in added.out
    second = {
        "id": "cli-tag",
        "match": {"filter": "~m PUT"},
        "action": {"type": "tag", "tags": ["x"]},
    }
    await ok(
        system,
        "rules",
        "add",
        "-f",
        "-",
        "--before",
        "cli-block",
        stdin=json.dumps(second).encode(),
    )

    listed = (await ok(system, "rules", "ls", "--json")).json()
    ids = [r["id"] for r in listed["rules"]]
    assert ids.index("cli-tag") < ids.index("cli-block")
    table = await ok(system, "rules", "ls")
    assert "cli-block" in table.out and "~d blocked.invalid" in table.out

    dup = await cli(system, "rules", "add", json.dumps(rule))
    assert dup.code == 1 and "(POLICY_RULE_DUPLICATE)" in dup.err
    invalid = await cli(
        system, "rules", "add", '{"match": {"filter": "~b x"}, "action": {"type": "block"}}'
    )
    assert invalid.code == 1 and "(POLICY_INVALID)" in invalid.err and "match.filter" in invalid.err
    not_json = await cli(system, "rules", "add", "{nope")
    assert not_json.code == 2

    async def enabled(rule_id: str) -> bool:
        doc = (await ok(system, "rules", "ls", "--json")).json()
        return bool(next(r for r in doc["rules"] if r["id"] == rule_id)["enabled"])

    assert "disabled" in (await ok(system, "rules", "disable", "cli-block")).out
    assert not await enabled("cli-block")
    assert "enabled" in (await ok(system, "rules", "enable", "cli-block")).out
    assert await enabled("cli-block")

    for rule_id in ("cli-block", "cli-tag"):
        assert f"removed rule {rule_id}" in (await ok(system, "rules", "rm", rule_id)).out
    gone = await cli(system, "rules", "rm", "cli-block")
    assert gone.code == 1 and "(POLICY_RULE_NOT_FOUND)" in gone.err
    left = [r["id"] for r in (await ok(system, "rules", "ls", "--json")).json()["rules"]]
    assert "cli-block" not in left and "cli-tag" not in left


# -- approvals -----------------------------------------------------------------------------------
async def test_approvals_watch_then_approve_releases_the_request(
    system: System, upstream: Upstream
) -> None:
    rule = {
        "id": "cli-hold",
        "match": {"filter": "~u /echo/cli-hold"},
        "action": {"type": "intercept", "timeout_s": 30, "on_timeout": "deny"},
    }
    await ok(system, "rules", "add", json.dumps(rule))
    watch = await Lines.start(system, "approvals", "watch", "--json")
    try:
        snapshot = await watch.until(lambda e: e["type"] == "snapshot")
        assert snapshot["pending"] == []
        async with httpx.AsyncClient(proxy=system.proxy, timeout=30) as client:
            held = asyncio.create_task(client.get(f"{upstream.http}/echo/cli-hold"))
            created = await watch.until(lambda e: e["type"] == "pending_created")
            approval = created["approval"]
            assert approval["rule"] == "cli-hold"
            assert approval["request"]["url"].endswith("/echo/cli-hold")
            listed = await ok(system, "approvals", "ls")
            assert approval["id"] in listed.out
            decided = await ok(system, "approvals", "approve", approval["id"], "--ttl", "60")
            assert "approve" in decided.out and "cached until" in decided.out
            response = await asyncio.wait_for(held, 15)
            assert response.status_code == 200
        resolved = await watch.until(lambda e: e["type"] == "pending_resolved")
        assert resolved["id"] == approval["id"] and resolved["decision"] == "approve"
        again = await cli(system, "approvals", "deny", approval["id"])
        assert again.code == 1 and "APPROVAL_" in again.err

        # the approval is cached; the decision log has the flow; forget the cache entry
        cached = (await ok(system, "approvals", "cached", "--json")).json()["cached"]
        (entry,) = [c for c in cached if c["rule"] == "cli-hold"]
        assert entry["method"] == "GET" and entry["url"].endswith("/echo/cli-hold")
        assert "cli-hold" in (await ok(system, "approvals", "cached")).out
        log = (await ok(system, "decisions", "--rule", "cli-hold", "--json")).json()
        assert any(e["flow_id"] == approval["flow_id"] for e in log["entries"])
        table = await ok(system, "decisions", "--decision", "intercept", "--range", "1h")
        assert approval["flow_id"] in table.out and "cli-hold" in table.out
        vague = await cli(system, "approvals", "forget", "--rule", "cli-hold")
        assert vague.code == 2 and "--url" in vague.err
        forget = ["--rule", "cli-hold", "--method", "GET", "--url", entry["url"]]
        await ok(system, "approvals", "forget", *forget)
        cached = (await ok(system, "approvals", "cached", "--json")).json()["cached"]
        assert not [c for c in cached if c["rule"] == "cli-hold"]
        missing = await cli(system, "approvals", "forget", *forget)
        assert missing.code == 1 and "(CACHED_APPROVAL_NOT_FOUND)" in missing.err

        async with httpx.AsyncClient(proxy=system.proxy, timeout=30) as client:
            for verb in ("deny", "modify"):
                held = asyncio.create_task(client.get(f"{upstream.http}/echo/cli-hold-{verb}"))
                created = await watch.until(
                    lambda e, v=verb: (
                        e["type"] == "pending_created"
                        and e["approval"]["request"]["url"].endswith(f"cli-hold-{v}")
                    )
                )
                approval_id = created["approval"]["id"]
                if verb == "deny":
                    args = ["--status", "451", "--body", "not today"]
                else:
                    edit = {"request": {"url": f"{upstream.http}/echo/cli-modified"}}
                    args = [json.dumps(edit)]
                await ok(system, "approvals", verb, approval_id, *args)
                response = await asyncio.wait_for(held, 15)
                if verb == "deny":
                    assert response.status_code == 451 and response.text == "not today"
                else:
                    assert response.json()["path"] == "/echo/cli-modified"
    finally:
        await watch.stop()
        await cli(system, "rules", "rm", "cli-hold")


# -- events, keys ------------------------------------------------------------------------------
async def test_events_ls_and_tail(system: System) -> None:
    tail = await Lines.start(system, "events", "tail", "--json", "--type", "audit")
    try:
        assert "following events" in await tail.stderr_line()
        await ok(system, "config", "set", "client_idle_timeout=null")
        audit = await tail.until(lambda e: e["data"].get("action") == "config.patch")
        assert audit["type"] == "audit" and audit["seq"] > 0
    finally:
        await tail.stop()

    doc = (await ok(system, "events", "ls", "--type", "audit", "--json")).json()
    assert doc["events"] and {e["type"] for e in doc["events"]} == {"audit"}
    table = await ok(system, "events", "ls", "--limit", "5")
    assert table.out.splitlines()[0].split() == [
        "time",
        "severity",
        "type",
        "source",
        "data",
        "seq",
    ]
    started = await ok(system, "events", "ls", "--type", "replica_started", "--range", "all")
    assert "replica_started" in started.out


async def test_keys_create_use_revoke(system: System) -> None:
    created = await ok(system, "keys", "create", "--scope", "read", "--name", "cli-test")
    secret = created.out.strip().splitlines()[-1]
    assert len(secret) >= 20 and "shown once" in created.err
    listed = (await ok(system, "keys", "ls", "--json")).json()["keys"]
    mine = next(k for k in listed if k["name"] == "cli-test")
    assert mine["scope"] == "read" and "secret" not in mine
    assert secret not in (await ok(system, "keys", "ls")).out

    works = await ok(system, "status", "--json", via="none", FLEET_API_KEY=secret)
    assert works.json()["state"] == "running"
    refused = await cli(
        system, "keys", "create", "--scope", "admin", via="none", FLEET_API_KEY=secret
    )
    assert refused.code == 1 and "(AUTH_FORBIDDEN)" in refused.err

    assert f"revoked key {mine['id']}" in (await ok(system, "keys", "revoke", mine["id"])).out

    async def refused_now() -> bool:
        run = await cli(system, "status", via="none", FLEET_API_KEY=secret)
        return run.code == 1 and "(AUTH_REQUIRED)" in run.err and secret not in run.err

    await eventually(refused_now, 5)
    static = await cli(system, "keys", "revoke", "local")
    assert static.code == 1 and "(KEY_STATIC)" in static.err


# -- hostile data ------------------------------------------------------------------------------
def _nats_url(system: System) -> str:
    found = re.search(r"NATS:\s+(nats://\S+)", (system.data_dir / "up.log").read_text())
    assert found, "up printed no NATS address"
    return found.group(1)


async def test_hostile_host_and_path_are_shown_inert(system: System) -> None:
    """A flow event from NATS (any publisher) whose host and path carry terminal escapes
    and rich markup: tables and the detail view show them escaped and literal."""
    from tests.integration.test_store import new_id

    flow_id = new_id()
    host = "evil\x1b[2J\x1b]0;pwned\x07.example"
    path = "/[bold red]x[/bold red]\x1b[31m\u202egnp.exe\x9b1m"
    now = time.time()
    event = {
        "event": "completed",
        "id": flow_id,
        "replica": "hostile",
        "kind": "http",
        "state": "completed",
        "scheme": "http",
        "method": "GET",
        "host": host,
        "port": 80,
        "path": path,
        "request": {
            "headers": [["X-Evil", "\x1b[5mblink"]],
            "size": 0,
            "truncated": False,
            "body_b64": "",
        },
        "response": {
            "status": 200,
            "reason": "OK",
            "http_version": "1.1",
            "headers": [],
            "size": 0,
            "truncated": False,
            "body_b64": "",
        },
        "timings": {"start": now, "end": now},
        "error": None,
    }
    password = (system.data_dir / "nats-password").read_text().strip()
    nc = await nats.connect(_nats_url(system), user="fleet", password=password)
    try:
        await nc.jetstream().publish(subjects.flows_subject("hostile"), orjson.dumps([event]))
    finally:
        await nc.close()

    await flows_matching(system, "~replica ^hostile$")
    for args in (("flows", "ls", "--replica", "hostile"), ("flows", "show", flow_id)):
        run = await ok(system, *args)
        for bad in ("\x1b", "\x07", "\u202e", "\x9b"):
            assert bad not in run.out, (args, bad)
        assert "[bold red]x[/bold red]" in run.out  # markup shown, not applied
        assert "\\x1b[2J" in run.out and "\\u202e" in run.out
