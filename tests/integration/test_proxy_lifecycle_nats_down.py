"""Stopping a replica while NATS is down: a clean exit, and the flows it could not
deliver counted (issue 7, item 13, the proxy side)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import nats
import orjson
import pytest

from libs.common import events, subjects
from libs.common.natsserver import EmbeddedNats
from tests.integration.conftest import MakeProxy
from tests.integration.harness import PROXYFLEET, Upstream, cli_env, free_port
from tests.integration.test_control import eventually, wait_bus

pytestmark = pytest.mark.timeout(60)


async def test_sigterm_while_nats_is_down_exits_0_and_counts_the_lost_flows(
    restartable_nats: EmbeddedNats, upstream: Upstream, tmp_path: Path
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    env = cli_env(
        tmp_path,
        FLEET_NATS_URL=restartable_nats.url,
        FLEET_PROXY_LISTEN=listen,
        FLEET_HEARTBEAT_INTERVAL="0.5",
        FLEET_REPLICA_ID=f"down-{free_port()}",
    )
    errlog = tmp_path / "stderr.log"
    with errlog.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            str(PROXYFLEET), "proxy", stdout=asyncio.subprocess.PIPE, stderr=err, env=env
        )
    try:
        assert proc.stdout is not None
        assert listen in (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        await asyncio.to_thread(restartable_nats.stop)
        async with httpx.AsyncClient(proxy=f"http://{listen}", timeout=10) as client:

            async def nats_down_seen() -> bool:  # the replica noticed (log line)
                return "nats disconnected" in errlog.read_text()

            await eventually(nats_down_seen, 10.0, "the replica sees NATS down", interval=0.05)
            for i in range(3):
                assert (await client.get(f"{upstream.http}/echo/lost{i}")).status_code == 200
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stderr = errlog.read_text()
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr
    lost = [line for line in stderr.splitlines() if "flows not recorded" in line]
    assert len(lost) == 1, stderr
    assert "3 flows not recorded" in lost[0] and "NATS unreachable" in lost[0], lost[0]


async def test_stop_with_nats_down_reports_undeliverable_flows(
    restartable_nats: EmbeddedNats, make_proxy: MakeProxy, upstream: Upstream
) -> None:
    p = await make_proxy(nats_url=restartable_nats.url)
    await asyncio.to_thread(restartable_nats.stop)
    await wait_bus(p, connected=False)
    async with httpx.AsyncClient(proxy=p.url, timeout=10) as client:
        for i in range(4):
            assert (await client.get(f"{upstream.http}/echo/d{i}")).status_code == 200
    data = await p.replica.stop(drain=0.5)  # returns, does not raise, NATS still down
    assert data["flows_undeliverable"] == 4
    assert data["events_undeliverable"] == 4  # one coalesced event per flow
    assert data["flows_total"] == 4 and data["events_dropped"] == 0
    cap = p.ctx.capture
    assert cap.undeliverable_final == 4 and cap.pending == 0 and cap.queued_bytes == 0
    assert p.replica.bus is not None and p.replica.bus.nc.is_closed
    assert await p.replica.stop() is data  # a second stop is a no-op


async def test_replica_stopped_event_counts_what_was_never_delivered(
    restartable_nats: EmbeddedNats, make_proxy: MakeProxy, upstream: Upstream
) -> None:
    """NATS is up at stop but the stream refuses the flows (they exceed its message size):
    the flows are counted as undeliverable in the replica_stopped event."""
    url = restartable_nats.url
    p = await make_proxy(nats_url=url)
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.FLOWS_STREAM)
        info.config.max_msg_size = 2048
        await js.update_stream(info.config)
        sub = await js.subscribe(
            subjects.events_subject(p.id, events.REPLICA_STOPPED), ordered_consumer=True
        )
        async with httpx.AsyncClient(proxy=p.url, timeout=10) as client:
            resp = await client.get(f"{upstream.http}/bytes/20000")
            assert resp.status_code == 200
        await p.replica.stop(drain=0.5)
        msg = await sub.next_msg(timeout=5)
        data = orjson.loads(msg.data)["data"]
        assert data["events_undeliverable"] >= 1
        assert p.ctx.capture.undeliverable_final == 1
    finally:
        await nc.close()
