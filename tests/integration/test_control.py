"""The control plane of a replica over NATS (status, kill, stop/start, heartbeats, config
hot-reload), its behaviour while NATS is down, and the ``proxyfleet proxy`` process."""

from __future__ import annotations

import asyncio
import base64
import collections
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import KeyDeletedError, KeyNotFoundError

from libs.common import subjects
from libs.common.bus import Bus
from libs.common.models import CommandReply, ReplicaStatus, RuntimeConfig
from libs.common.natsserver import EmbeddedNats
from libs.common.tasks import cancel_and_wait
from tests.integration.conftest import MakeProxy
from tests.integration.harness import (
    PROXYFLEET,
    FlowEvents,
    ProxyUnderTest,
    Upstream,
    cli_env,
    free_port,
    reason_line,
    run_cli_to_exit,
)

pytestmark = pytest.mark.timeout(30)

HEARTBEAT = 0.5  # heartbeat_interval in the harness settings; registry TTL is 3x that


# -- helpers --------------------------------------------------------------------------------
@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_url)
    try:
        yield client
    finally:
        await client.close()


async def command(
    client: NATS, target: str, verb: str, body: dict[str, Any] | None = None, timeout: float = 2.0
) -> CommandReply:
    """One command to ``fleet.cmd.<target>.<verb>``, first reply."""
    subject = subjects.command_subject(target, verb)
    msg = await client.request(subject, orjson.dumps(body or {}), timeout=timeout)
    return CommandReply.model_validate_json(msg.data)


async def command_all(
    client: NATS, verb: str, body: dict[str, Any], replica: str, timeout: float = 2.0
) -> CommandReply:
    """A command to ``fleet.cmd.all.<verb>``; the reply of ``replica`` (others ignored)."""
    inbox = client.new_inbox()
    got: asyncio.Future[CommandReply] = asyncio.get_running_loop().create_future()

    async def on_reply(msg: Any) -> None:
        reply = CommandReply.model_validate_json(msg.data)
        if reply.replica == replica and not got.done():
            got.set_result(reply)

    sub = await client.subscribe(inbox, cb=on_reply)
    try:
        subject = subjects.command_subject(subjects.CMD_ALL, verb)
        await client.publish(subject, orjson.dumps(body), reply=inbox)
        return await asyncio.wait_for(got, timeout)
    finally:
        await sub.unsubscribe()


async def eventually(
    probe: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.02
) -> Any:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    last: Any = None
    while loop.time() < end:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


async def registry_entry(kv: Any, replica: str) -> ReplicaStatus | None:
    try:
        entry = await kv.get(replica)
    except (KeyNotFoundError, KeyDeletedError):
        return None
    if entry.value is None:
        return None
    return ReplicaStatus.model_validate_json(entry.value)


async def wait_active(p: ProxyUnderTest, n: int = 1, timeout: float = 2.0) -> None:
    async def probe() -> bool:
        return len(p.ctx.active) >= n

    await eventually(probe, timeout, f"{n} active flow(s)")


def b64(data: str) -> bytes:
    return base64.b64decode(data)


# -- status ---------------------------------------------------------------------------------
async def test_status_command(proxy: ProxyUnderTest, upstream: Upstream, nc: NATS) -> None:
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        assert (await client.get(f"{upstream.http}/echo/s")).status_code == 200
    reply = await command(nc, proxy.id, "status")
    assert reply.ok is True
    assert reply.replica == proxy.id
    assert reply.code is None
    status = reply.status
    assert status is not None
    assert status.id == proxy.id
    assert status.state == "running"
    assert status.listen == proxy.replica.address
    assert status.mode == "regular"
    assert status.flows_total >= 1
    assert status.active_flows == 0
    assert status.events_dropped == 0
    assert status.config_revision == 0
    assert status.config_error is None
    assert status.started_at <= status.updated_at

    unknown = await command(nc, proxy.id, "frobnicate")
    assert unknown.ok is False
    assert unknown.code == "UNKNOWN_COMMAND"


async def test_scatter_gather_status_reaches_every_replica(make_proxy: MakeProxy, nc: NATS) -> None:
    a = await make_proxy()
    b = await make_proxy()
    replies = await Bus(nc).scatter_gather(
        subjects.command_subject(subjects.CMD_ALL, "status"), b"{}", timeout=0.5
    )
    by_id = {r.replica: r for r in (CommandReply.model_validate_json(m.data) for m in replies)}
    assert {a.id, b.id} <= set(by_id)
    for p in (a, b):
        reply = by_id[p.id]
        assert reply.ok is True
        assert reply.status is not None
        assert reply.status.state == "running"
        assert reply.status.listen == p.replica.address


# -- heartbeat / registry -------------------------------------------------------------------
async def test_heartbeat_registers_and_stop_deregisters(make_proxy: MakeProxy, nc: NATS) -> None:
    p = await make_proxy()
    kv = await Bus(nc).replicas_kv(ttl=HEARTBEAT * 3)

    async def registered() -> ReplicaStatus | None:
        return await registry_entry(kv, p.id)

    entry = await eventually(registered, 1.0, "registry entry")
    assert entry.state == "running"
    assert entry.listen == p.replica.address

    await p.replica.stop(drain=0.5)
    assert await registry_entry(kv, p.id) is None


async def test_silent_replica_disappears_by_ttl(
    restartable_nats: EmbeddedNats, make_proxy: MakeProxy
) -> None:
    p = await make_proxy(nats_url=restartable_nats.url)
    bus = await Bus.connect(restartable_nats.url, "test", 5)
    try:
        kv = await bus.replicas_kv(ttl=HEARTBEAT * 3)

        async def registered() -> ReplicaStatus | None:
            return await registry_entry(kv, p.id)

        await eventually(registered, 1.0, "registry entry")
        # The process "hangs": no more heartbeats, and no deregistration either.
        beat = [t for t in p.replica._tasks if t.get_name() == "heartbeat"]
        assert len(beat) == 1
        await cancel_and_wait(beat[0])
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def gone() -> bool:
            return await registry_entry(kv, p.id) is None

        await eventually(gone, HEARTBEAT * 3 + 2.0, "registry entry expiry", interval=0.1)
        assert loop.time() - t0 <= HEARTBEAT * 3 + 1.5
    finally:
        await bus.close()


# -- kill -----------------------------------------------------------------------------------
async def test_kill_an_active_flow(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents, nc: NATS
) -> None:
    path = "/drip?s=0.1&n=200"
    received = 0
    loop = asyncio.get_running_loop()

    async def stream() -> None:
        nonlocal received
        async with (
            httpx.AsyncClient(proxy=proxy.url, timeout=15) as client,
            client.stream("GET", f"{upstream.http}{path}") as resp,
        ):
            assert resp.status_code == 200
            async for chunk in resp.aiter_bytes():
                received += len(chunk)

    t0 = loop.time()
    task = asyncio.create_task(stream())
    try:
        started = await flows.wait_for(lambda e: e["event"] == "started" and e["path"] == path)
        visible_after = loop.time() - t0
        assert visible_after < 0.5, f"started event after {visible_after:.3f}s"
        assert started["state"] == "active"
        status = (await command(nc, proxy.id, "status")).status
        assert status is not None
        assert status.active_flows == 1

        reply = await command_all(nc, "kill", {"flow_id": started["id"]}, proxy.id)
        assert reply.ok is True, reply
        assert reply.data["found"] is True
        with pytest.raises(httpx.TransportError):
            await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
    assert received < 200  # cut long before the end

    final = await flows.wait_for(lambda e: e["id"] == started["id"] and e["event"] != "started")
    assert final["event"] == "killed"
    assert final["state"] == "killed"
    assert "killed" in final["error"]
    assert final["timings"]["end"] is not None

    again = await command_all(nc, "kill", {"flow_id": started["id"]}, proxy.id)
    assert again.ok is False
    assert again.code == "FLOW_NOT_ACTIVE"
    assert proxy.ctx.active == {}


async def test_kill_of_an_unknown_flow(proxy: ProxyUnderTest, nc: NATS) -> None:
    reply = await command_all(nc, "kill", {"flow_id": "no-such-flow"}, proxy.id)
    assert reply.ok is False
    assert reply.code == "FLOW_NOT_ACTIVE"
    assert reply.data == {"found": False}
    direct = await command(nc, proxy.id, "kill", {"flow_id": "no-such-flow"})
    assert direct.code == "FLOW_NOT_ACTIVE"


# -- stop / start ---------------------------------------------------------------------------
async def test_stop_drains_in_flight_requests_then_start_serves_again(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents, nc: NATS
) -> None:
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
        slow = asyncio.create_task(client.get(f"{upstream.http}/slow?s=1"))
        await wait_active(proxy)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        reply = await command(nc, proxy.id, "stop", {"deadline": 5}, timeout=8)
        took = loop.time() - t0
        assert reply.ok is True, reply
        assert reply.data["aborted"] == 0
        assert reply.status is not None
        assert reply.status.state == "stopped"
        assert 0.5 < took < 4  # waited for the in-flight request, not for the deadline
        resp = await slow
        assert resp.status_code == 200
        assert resp.text == "slow done"
        assert resp.headers.get("connection") == "close"

    with pytest.raises(OSError):
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.close()
    status = await command(nc, proxy.id, "status")
    assert status.status is not None
    assert status.status.state == "stopped"
    event = await flows.final_for("/slow?s=1")
    assert event["state"] == "completed"
    assert event["response"]["status"] == 200

    started = await command(nc, proxy.id, "start")
    assert started.ok is True
    assert started.status is not None
    assert started.status.state == "running"
    async with httpx.AsyncClient(proxy=proxy.url) as client:
        again = await client.get(f"{upstream.http}/echo/after-restart")
    assert again.status_code == 200
    await flows.final_for("/echo/after-restart")


async def test_stop_deadline_cuts_the_remaining_flows(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents, nc: NATS
) -> None:
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
        slow = asyncio.create_task(client.get(f"{upstream.http}/slow?s=5"))
        await wait_active(proxy)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        reply = await command(nc, proxy.id, "stop", {"deadline": 0.3}, timeout=5)
        assert loop.time() - t0 < 1.5
        assert reply.ok is True
        assert reply.data["aborted"] == 1
        with pytest.raises(httpx.TransportError):
            await slow
    event = await flows.final_for("/slow?s=5")
    assert event["state"] == "error"
    assert event["event"] == "error"
    assert "stopped" in event["error"]

    bad = await command(nc, proxy.id, "stop", {"deadline": -1})
    assert bad.ok is False
    assert bad.code == "BAD_COMMAND"


# -- config hot-reload ----------------------------------------------------------------------
# These run on a NATS of their own: the config bucket outlives a test, and every replica
# started later on the shared server would pick the document up.


async def status_of(bus: Bus, replica: str) -> ReplicaStatus:
    msg = await bus.request(subjects.command_subject(replica, "status"), b"{}")
    reply = CommandReply.model_validate_json(msg.data)
    assert reply.status is not None
    return reply.status


async def test_config_hot_reload_keeps_open_connections(
    restartable_nats: EmbeddedNats, make_proxy: MakeProxy, upstream: Upstream
) -> None:
    url = restartable_nats.url
    p = await make_proxy(nats_url=url)
    bus = await Bus.connect(url, "test", 5)
    events = FlowEvents()
    await events.start(url, p.id)
    try:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(proxy=p.url, limits=limits) as client:
            resp = await client.post(f"{upstream.http}/echo/before", content=b"a" * 100)
            assert resp.status_code == 200
            before = await events.final_for("/echo/before")
            assert b64(before["request"]["body_b64"]) == b"a" * 100
            assert before["request"]["truncated"] is False
            assert before["response"]["truncated"] is False

            kv = await bus.config_kv()
            doc = RuntimeConfig(capture_body_limit=10)
            revision = await kv.put(subjects.CONFIG_KEY, doc.model_dump_json().encode())

            async def applied() -> bool:
                return (await status_of(bus, p.id)).config_revision == revision

            await eventually(applied, 1.0, "config revision applied", interval=0.05)
            assert p.ctx.config.doc.capture_body_limit == 10
            assert (await status_of(bus, p.id)).config_error is None

            # Same keep-alive connection as before the change, new limit.
            resp = await client.post(f"{upstream.http}/echo/after", content=b"b" * 100)
            assert resp.status_code == 200
            assert resp.json()["body_len"] == 100
        after = await events.final_for("/echo/after")
        assert after["client"] == before["client"]
        assert b64(after["request"]["body_b64"]) == b"b" * 10
        assert after["request"]["truncated"] is True
        assert after["request"]["size"] == 100
        assert len(b64(after["response"]["body_b64"])) == 10
        assert after["response"]["truncated"] is True
        assert after["response"]["size"] == len(resp.content)
    finally:
        await events.stop()
        await bus.close()


@pytest.mark.parametrize(
    "bad",
    [b'{"capture_body_limit": -1}', b'{"capture_body_limit": 5, "no_such_field": true}'],
    ids=["negative-limit", "unknown-field"],
)
async def test_invalid_config_is_rejected_and_the_last_good_one_kept(
    restartable_nats: EmbeddedNats, make_proxy: MakeProxy, upstream: Upstream, bad: bytes
) -> None:
    url = restartable_nats.url
    p = await make_proxy(nats_url=url)
    bus = await Bus.connect(url, "test", 5)
    events = FlowEvents()
    await events.start(url, p.id)
    try:
        kv = await bus.config_kv()
        good = await kv.put(
            subjects.CONFIG_KEY, RuntimeConfig(capture_body_limit=10).model_dump_json().encode()
        )

        async def applied() -> bool:
            return (await status_of(bus, p.id)).config_revision == good

        await eventually(applied, 1.0, "good revision applied", interval=0.05)
        rejected = await kv.put(subjects.CONFIG_KEY, bad)

        async def error_reported() -> ReplicaStatus | None:
            status = await status_of(bus, p.id)
            return status if status.config_error else None

        status = await eventually(error_reported, 1.0, "config_error", interval=0.05)
        assert status.config_revision == good
        assert str(rejected) in status.config_error
        assert p.ctx.config.doc.capture_body_limit == 10

        async with httpx.AsyncClient(proxy=p.url) as client:
            resp = await client.get(f"{upstream.http}/echo/still-limited")
        assert resp.status_code == 200
        event = await events.final_for("/echo/still-limited")
        assert len(b64(event["response"]["body_b64"])) == 10

        # A good document afterwards applies and clears the error.
        fixed = await kv.put(
            subjects.CONFIG_KEY, RuntimeConfig(capture_body_limit=20).model_dump_json().encode()
        )

        async def recovered() -> ReplicaStatus | None:
            status = await status_of(bus, p.id)
            return status if status.config_revision == fixed else None

        status = await eventually(recovered, 1.0, "fixed revision applied", interval=0.05)
        assert status.config_error is None
    finally:
        await events.stop()
        await bus.close()


# -- NATS outages ---------------------------------------------------------------------------
async def wait_bus(p: ProxyUnderTest, connected: bool, timeout: float = 5.0) -> None:
    async def probe() -> bool:
        return bool(p.replica.bus.connected) == connected

    await eventually(probe, timeout, f"replica bus connected={connected}", interval=0.05)


async def read_stream(
    url: str, replica: str, done: Callable[[list[dict[str, Any]]], bool], timeout: float
) -> list[dict[str, Any]]:
    """Every event of ``replica`` in the FLOWS stream (ordered consumer from the start),
    read until ``done(events)`` and then until the stream has nothing more."""
    client = await nats.connect(url)
    events: list[dict[str, Any]] = []
    try:
        sub = await client.jetstream().subscribe(
            subjects.flows_subject(replica), ordered_consumer=True
        )
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not done(events):
            left = end - loop.time()
            if left <= 0:
                raise AssertionError(f"stream incomplete after {timeout}s: {len(events)} events")
            try:
                msg = await sub.next_msg(timeout=min(left, 0.5))
            except nats.errors.TimeoutError:
                continue
            events.extend(orjson.loads(msg.data))
        while True:  # anything published twice would follow closely
            try:
                msg = await sub.next_msg(timeout=0.3)
            except nats.errors.TimeoutError:
                break
            events.extend(orjson.loads(msg.data))
    finally:
        await client.close()
    return events


async def test_proxying_continues_while_nats_is_down_and_flows_arrive_once(
    restartable_nats: EmbeddedNats, make_proxy: MakeProxy, upstream: Upstream
) -> None:
    url = restartable_nats.url
    p = await make_proxy(nats_url=url)
    live = FlowEvents()
    await live.start(url, p.id)
    async with httpx.AsyncClient(proxy=p.url) as client:
        for i in range(3):
            assert (await client.get(f"{upstream.http}/echo/up{i}")).status_code == 200
        for i in range(3):
            await live.final_for(f"/echo/up{i}")
        await live.stop()

        await asyncio.to_thread(restartable_nats.stop)
        await wait_bus(p, connected=False)
        for i in range(20):
            resp = await client.get(f"{upstream.http}/echo/down{i}")
            assert resp.status_code == 200
            assert resp.json()["path"] == f"/echo/down{i}"
        assert p.ctx.capture.dropped == 0
        await asyncio.to_thread(restartable_nats.start)

    down_paths = {f"/echo/down{i}" for i in range(20)}

    def all_down_final(events: list[dict[str, Any]]) -> bool:
        return {e["path"] for e in events if e["event"] != "started"} >= down_paths

    events = await read_stream(url, p.id, all_down_final, timeout=10)
    finals = [e for e in events if e["event"] != "started"]
    per_id = collections.Counter(e["id"] for e in finals)
    assert all(n == 1 for n in per_id.values()), per_id.most_common(3)
    down = [e for e in finals if e["path"] in down_paths]
    assert len({e["id"] for e in down}) == 20
    assert all(e["state"] == "completed" and e["response"]["status"] == 200 for e in down)
    assert {e["path"] for e in finals} == down_paths | {f"/echo/up{i}" for i in range(3)}


async def test_capture_queue_overflow_drops_and_counts(
    restartable_nats: EmbeddedNats, make_proxy: MakeProxy, upstream: Upstream
) -> None:
    url = restartable_nats.url
    p = await make_proxy(nats_url=url, capture_queue_size=5)
    await asyncio.to_thread(restartable_nats.stop)
    await wait_bus(p, connected=False)
    async with httpx.AsyncClient(proxy=p.url) as client:
        for i in range(30):
            assert (await client.get(f"{upstream.http}/echo/q{i}")).status_code == 200
    dropped = p.ctx.capture.dropped
    assert dropped > 0
    assert p.ctx.capture.pending <= 5
    await asyncio.to_thread(restartable_nats.start)

    bus = await Bus.connect(url, "test", 5)
    try:
        kv = await bus.replicas_kv(ttl=HEARTBEAT * 3)

        async def heartbeat_with_drops() -> ReplicaStatus | None:
            entry = await registry_entry(kv, p.id)
            return entry if entry is not None and entry.events_dropped > 0 else None

        entry = await eventually(heartbeat_with_drops, 8.0, "heartbeat", interval=0.1)
        assert entry.events_dropped == dropped
        status = await status_of(bus, p.id)
        assert status.events_dropped == dropped
        assert status.flows_total == 30
    finally:
        await bus.close()


# -- the proxyfleet proxy process -----------------------------------------------------------
async def test_process_prints_its_address_and_drains_on_sigterm(
    nats_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    replica = f"cli-{free_port()}"
    env = cli_env(
        tmp_path,
        FLEET_NATS_URL=nats_url,
        FLEET_PROXY_LISTEN=listen,
        FLEET_HEARTBEAT_INTERVAL=str(HEARTBEAT),
    )
    env["FLEET_REPLICA_ID"] = replica
    with (tmp_path / "stderr.log").open("wb") as errlog:
        proc = await asyncio.create_subprocess_exec(
            str(PROXYFLEET), "proxy", stdout=asyncio.subprocess.PIPE, stderr=errlog, env=env
        )
    events = FlowEvents()
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        ca = tmp_path / "data" / "ca.pem"
        assert listen in line
        assert replica in line
        assert str(ca) in line
        assert line.endswith("\n") and line.count("\n") == 1
        assert ca.is_file()
        assert (tmp_path / "data" / "ca-key.pem").stat().st_mode & 0o777 == 0o600

        await events.start(nats_url, replica)
        async with httpx.AsyncClient(proxy=f"http://{listen}", timeout=10) as client:
            slow = asyncio.create_task(client.get(f"{upstream.http}/slow?s=1"))
            await events.wait_for(lambda e: e["event"] == "started" and e["path"] == "/slow?s=1")
            proc.send_signal(signal.SIGTERM)
            resp = await slow
        assert resp.status_code == 200
        assert resp.text == "slow done"
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert await proc.stdout.read() == b""  # the start-up line was the only one
        final = await events.final_for("/slow?s=1")  # flushed before exiting
        assert final["state"] == "completed"
    finally:
        await events.stop()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_process_exits_when_its_port_is_taken(nats_url: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        env = cli_env(tmp_path, FLEET_NATS_URL=nats_url, FLEET_PROXY_LISTEN=address)
        code, err = await run_cli_to_exit("proxy", env)
    assert code != 0
    assert address in reason_line("proxy", err)


async def test_process_exits_when_nats_is_unreachable(tmp_path: Path) -> None:
    env = cli_env(
        tmp_path,
        FLEET_NATS_URL=f"nats://127.0.0.1:{free_port()}",
        FLEET_NATS_CONNECT_TIMEOUT="1",
        FLEET_PROXY_LISTEN=f"127.0.0.1:{free_port()}",
    )
    code, err = await run_cli_to_exit("proxy", env, timeout=6)  # 1 s to give up, the rest start-up
    assert code != 0
    assert "NATS" in reason_line("proxy", err)


async def test_process_exits_on_a_bad_setting(tmp_path: Path) -> None:
    env = cli_env(tmp_path, FLEET_PROXY_LISTEN="nonsense")
    code, err = await run_cli_to_exit("proxy", env)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "FLEET_PROXY_LISTEN" in lines[0]
