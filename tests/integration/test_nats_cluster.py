"""A three-node JetStream cluster losing its FLOWS leader under traffic.

Three nats-server processes from the wheel form one cluster (``NatsCluster``, free
ports); a proxy replica and a flow store run in-process with every node's URL and
``nats_replicas=3``; real HTTP requests go through the proxy to an upstream on
127.0.0.1. Mid-traffic the node leading the FLOWS stream is SIGKILLed. The proxy must
have answered every request, each flow must be in the store once and in the stream
once (a publish retried across the election carries the same ``Nats-Msg-Id``), and
the control plane (commands, scatter-gather, a config write through KV) must still
work on the two nodes left.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from libs.common import subjects
from libs.common.bus import Bus
from libs.common.models import CommandReply, RuntimeConfig
from libs.common.natsserver import NatsCluster
from libs.common.settings import StoreSettings
from services.store.main import Store
from tests.integration.conftest import MakeProxy
from tests.integration.harness import Upstream

pytestmark = pytest.mark.timeout(90)

REPLICAS = 3
WORKERS = 4  # concurrent clients sending requests through the proxy
PACE = 0.02  # seconds each client waits between two requests


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with NatsCluster(tmp_path / "nats", size=REPLICAS) as c:
        yield c


@pytest.fixture
def nats_url(cluster: NatsCluster) -> str:
    """Every service of this module (``make_proxy`` included) talks to the cluster."""
    return cluster.url


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_url, "cluster-test", timeout=5.0, replicas=REPLICAS)
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def store(nats_url: str, tmp_path: Path, bus: Bus) -> AsyncIterator[Store]:
    settings = StoreSettings(
        nats_url=nats_url,
        data_dir=tmp_path / "store",
        replica_id="store0",
        nats_connect_timeout=5.0,
        nats_replicas=REPLICAS,
    )
    # What the store would create first is made here with three replicas, so that this
    # test does not depend on the store passing nats_replicas to its bus: the streams
    # (its durable consumer inherits their replicas when created) and its claim bucket.
    # A stream grown from 1 to 3 replicas later moves its consumers too, but one peer
    # of the consumer may never catch up (nats-server 2.15.1), and losing the leader
    # then stalls the consumer for want of a quorum.
    await bus.ensure_streams()
    await bus.store_claim_kv(settings.store_claim_ttl)
    s = Store(settings)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.1
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await check()
        except Exception as exc:  # a request meeting the election: try again
            last = exc
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


async def command(bus: Bus, target: str, verb: str, body: dict[str, Any]) -> CommandReply:
    msg = await bus.request(subjects.command_subject(target, verb), orjson.dumps(body), 2.0)
    return CommandReply.model_validate_json(msg.data)


async def stored_flows(bus: Bus) -> list[dict[str, Any]]:
    """Every flow the store lists (all pages)."""
    flows: list[dict[str, Any]] = []
    cursor = None
    while True:
        body = orjson.dumps({"limit": 1000, "cursor": cursor})
        msg = await bus.request(subjects.store_subject("list"), body, timeout=5.0)
        reply = orjson.loads(msg.data)
        flows += reply["flows"]
        cursor = reply["next_cursor"]
        if cursor is None:
            return flows


async def stream_messages(js: Any) -> list[Any]:
    """Every message in FLOWS, by sequence (from whichever node leads it now)."""
    info = await js.stream_info(subjects.FLOWS_STREAM)
    first, last = info.state.first_seq, info.state.last_seq
    return [await js.get_msg(subjects.FLOWS_STREAM, seq) for seq in range(first, last + 1)]


class Traffic:
    """``WORKERS`` clients sending GET /echo/cluster-<n> through the proxy until stopped;
    every request and its outcome are kept."""

    def __init__(self, proxy_url: str, upstream: str) -> None:
        self.proxy_url = proxy_url
        self.upstream = upstream
        self.sent: list[str] = []
        self.answered: dict[str, int] = {}
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _worker(self, w: int) -> None:
        async with httpx.AsyncClient(proxy=self.proxy_url, timeout=10.0) as client:
            n = 0
            while not self._stop.is_set():
                path = f"/echo/cluster-{w}-{n}"
                n += 1
                self.sent.append(path)
                try:
                    resp = await client.get(f"{self.upstream}{path}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"{path}: {exc!r}")
                    continue
                self.answered[path] = resp.status_code
                if resp.status_code != 200 or resp.json()["path"] != path:
                    self.failures.append(f"{path}: {resp.status_code} {resp.text[:100]}")
                await asyncio.sleep(PACE)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(w)) for w in range(WORKERS)]

    async def until(self, count: int, timeout: float = 20.0) -> None:
        await eventually(
            lambda: asyncio.sleep(0, len(self.answered) >= count), timeout, f"{count} answers"
        )

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def leader(js: Any, stream: str) -> str | None:
    """The server leading ``stream`` now (None while it has none)."""
    info = await js.stream_info(stream)
    assert info.cluster is not None
    return info.cluster.leader  # type: ignore[no-any-return]


async def test_losing_the_flows_leader_loses_no_flow_and_no_command(
    cluster: NatsCluster, make_proxy: MakeProxy, store: Store, upstream: Upstream, bus: Bus
) -> None:
    proxy = await make_proxy(nats_replicas=REPLICAS)
    js = bus.nc.jetstream(timeout=1.0)  # a request that meets no leader is not answered

    async def replicated(stream: str) -> bool:
        info = await js.stream_info(stream)
        return bool(info.config.num_replicas == REPLICAS and info.cluster and info.cluster.leader)

    for bucket in (subjects.CONFIG_BUCKET, subjects.REPLICAS_BUCKET, subjects.STORE_CLAIM_BUCKET):
        await eventually(lambda b=bucket: replicated(f"KV_{b}"), 15.0, f"bucket {bucket}")
    assert await replicated(subjects.FLOWS_STREAM)
    assert await replicated(subjects.EVENTS_STREAM)

    traffic = Traffic(proxy.url, upstream.http)
    traffic.start()
    try:
        await traffic.until(40)
        old = await leader(js, subjects.FLOWS_STREAM)
        assert old is not None
        await asyncio.to_thread(cluster.node(old).kill)  # SIGKILL: no flush, no hand-off
        killed_at = time.monotonic()

        async def new_leader() -> str | None:
            now = await leader(js, subjects.FLOWS_STREAM)
            return now if now not in (None, old) else None

        elected = await eventually(new_leader, 30.0, "a new FLOWS leader")
        election = time.monotonic() - killed_at
        await traffic.until(len(traffic.answered) + 40)  # and after the election
    finally:
        await traffic.stop()
    killed = f"{old} killed, {elected} elected in {election:.1f}s"

    # the data plane never noticed
    assert traffic.failures == []
    assert len(traffic.answered) == len(traffic.sent)
    assert all(code == 200 for code in traffic.answered.values())
    sent = set(traffic.sent)
    assert len(sent) == len(traffic.sent)

    # every flow in the store, once, completed
    async def all_stored() -> list[dict[str, Any]] | None:
        flows = [f for f in await stored_flows(bus) if f["path"] in sent]
        done = [f for f in flows if f["state"] == "completed"]
        return flows if len(done) == len(sent) else None

    try:
        flows = await eventually(all_stored, 30.0, f"{len(sent)} completed flows in the store")
    except AssertionError as exc:
        info = await js.consumer_info(subjects.FLOWS_STREAM, subjects.STORE_DURABLE)
        raise AssertionError(f"{exc} ({killed}; ingest {store.consumer.stats}; {info})") from None
    assert len(flows) == len(sent)
    assert len({f["id"] for f in flows}) == len(sent)
    assert {f["path"] for f in flows} == sent
    capture = proxy.ctx.capture
    assert capture.dropped == 0 and capture.undeliverable == 0

    # and once in the stream: no batch stored twice, no final event twice
    messages = await stream_messages(js)
    ids = collections.Counter((m.headers or {}).get("Nats-Msg-Id") for m in messages)
    assert None not in ids
    assert ids.most_common(1)[0][1] == 1, ids.most_common(3)
    finals = collections.Counter(
        e["id"] for m in messages for e in orjson.loads(m.data) if e["event"] != "started"
    )
    assert len(finals) == len(sent) and set(finals.values()) == {1}, finals.most_common(3)

    # the control plane on the two nodes left: a command, scatter-gather, a KV write
    reply = await command(bus, proxy.id, "status", {})
    assert reply.ok and reply.status is not None and reply.status.state == "running"
    replies = await bus.scatter_gather(
        subjects.command_subject(subjects.CMD_ALL, "status"), b"{}", timeout=2.0, expected=1
    )
    assert [CommandReply.model_validate_json(r.data).replica for r in replies] == [proxy.id]
    doc = RuntimeConfig(capture_body_limit=123).model_dump_json().encode()

    async def put() -> int:  # the bucket may still be electing its own leader: retried
        kv = await bus.config_kv()
        return await kv.put(subjects.CONFIG_KEY, doc)

    revision = await eventually(put, 20.0, f"config written ({killed})")

    async def applied() -> bool:
        status = (await command(bus, proxy.id, "status", {})).status
        return status is not None and status.config_revision == revision

    # a watcher whose consumer lived on the dead node is replaced once nats-py misses
    # two of its idle heartbeats (5 s apart): up to ~10 s
    await eventually(applied, 20.0, f"config revision applied ({killed})")
    assert proxy.ctx.config.doc.capture_body_limit == 123


async def replicas_of(bus: Bus, *streams: str) -> list[int]:
    return [(await bus.js.stream_info(s)).config.num_replicas or 1 for s in streams]


STREAMS = (subjects.FLOWS_STREAM, subjects.EVENTS_STREAM, f"KV_{subjects.CONFIG_BUCKET}")


async def test_existing_streams_and_buckets_grow_and_never_shrink(nats_url: str) -> None:
    one = await Bus.connect(nats_url, "r1", timeout=5.0)
    three = await Bus.connect(nats_url, "r3", timeout=5.0, replicas=REPLICAS)
    try:
        await one.ensure_streams()
        await one.config_kv()
        assert await replicas_of(one, *STREAMS) == [1, 1, 1]
        await three.ensure_streams()
        kv = await three.config_kv()
        assert await replicas_of(three, *STREAMS) == [REPLICAS] * 3
        assert await kv.put("grown", b"1")  # a leader at once: the bus waited for it
        await one.ensure_streams()  # a service left on the default shrinks nothing
        await one.config_kv()
        assert await replicas_of(one, *STREAMS) == [REPLICAS] * 3
    finally:
        await one.close()
        await three.close()


async def test_replicas_on_a_server_that_is_not_clustered_fall_back_to_one(
    restartable_nats: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bus = await Bus.connect(restartable_nats.url, "r3", timeout=5.0, replicas=REPLICAS)
    try:
        await bus.ensure_streams()
        kv = await bus.config_kv()
        assert await kv.put("k", b"v")
        assert await replicas_of(bus, *STREAMS) == [1, 1, 1]
        assert bus.replicas == 1
    finally:
        await bus.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("not a JetStream cluster" in w for w in warnings), warnings
