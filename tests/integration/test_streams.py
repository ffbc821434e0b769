"""The live SSE streams end to end: the API on a real uvicorn server (an SSE response
never ends, so httpx's ASGITransport cannot stream it), real NATS of the test's own,
a real in-process proxy and upstream. Clients are httpx streams, and a raw socket for
the client that stops reading."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest

from libs.common import subjects
from libs.common.bus import Bus
from libs.common.natsserver import EmbeddedNats
from tests.integration.conftest import MakeProxy
from tests.integration.harness import Upstream
from tests.integration.sse import ApiServer, Event, SSEClient, serve_api, sse
from tests.unit.test_api_support import ADMIN, READ, READ_KEY, api_settings

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def nats_url(restartable_nats: EmbeddedNats) -> str:
    return restartable_nats.url


@pytest.fixture
async def server(nats_url: str, tmp_path: Path) -> AsyncIterator[ApiServer]:
    settings = api_settings(
        nats_url, tmp_path / "api", api_sse_heartbeat=0.3, api_stream_queue_size=20
    )
    async with serve_api(settings) as running:
        yield running


async def connected(stream: SSEClient) -> Event:
    first = await stream.next()
    assert first.event == "connected", first
    return first


# -- system events ----------------------------------------------------------------------------
async def test_event_stream_live_resume_and_heartbeat(server: ApiServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as api:

        async def audited(n: int) -> None:
            for _ in range(n):  # no replica: 503, audited all the same
                resp = await api.post("/api/proxy/start", headers=ADMIN)
                assert resp.status_code == 503

        async with sse(server.url, "/api/events/stream", READ, {"type": "audit"}) as stream:
            assert (await connected(stream)).json() == {"resumed_after": None}
            await audited(3)
            first = await stream.take(3)
            assert [e.json()["data"]["path"] for e in first] == ["/api/proxy/start"] * 3
            assert [e.event for e in first] == ["message"] * 3
            ids = [int(e.id or 0) for e in first]
            assert ids == sorted(ids) and [e.json()["seq"] for e in first] == ids
            await asyncio.sleep(0.7)  # idle: heartbeat comments keep the connection alive
            await audited(1)
            assert (await stream.next()).json()["data"]["status"] == 503
            assert "heartbeat" in stream.comments
        fourth = ids[-1]
        await audited(2)  # while nobody listens

        # resume after the second event: the third, the fourth (read), the two missed
        headers = {**READ, "Last-Event-ID": str(ids[1])}
        async with sse(server.url, "/api/events/stream", headers, {"type": "audit"}) as again:
            assert (await connected(again)).json() == {"resumed_after": str(ids[1])}
            resumed = await again.take(4)
            got = [int(e.id or 0) for e in resumed]
            assert got[0] == ids[2] and got == sorted(set(got)) and got[1] > fourth
            await audited(1)
            assert int((await again.next()).id or 0) > got[-1]  # then live again

        # filters are subject filters: another type is not delivered
        async with sse(server.url, "/api/events/stream", READ, {"type": "config_applied"}) as s:
            await connected(s)
            await audited(1)
            with pytest.raises(TimeoutError):
                await s.next(timeout=1.0)
        bad = await api.get("/api/events/stream", headers={**READ, "Last-Event-ID": "x"})
        assert bad.status_code == 422 and bad.json()["code"] == "VALIDATION_ERROR"
        no_key = await api.get("/api/events/stream")
        assert no_key.status_code == 401


# -- flows ------------------------------------------------------------------------------------
def final_paths(events: list[Event]) -> list[str]:
    """The paths of the final (not ``started``) flow events, in order."""
    flows = [e.json() for e in events if e.event == "message"]
    return [f["path"] for f in flows if f["event"] != "started"]


async def collect(stream: SSEClient, want: int, timeout: float = 10.0) -> list[Event]:
    """Events until ``want`` final (non-started) events have arrived."""
    got: list[Event] = []
    async with asyncio.timeout(timeout):
        while len(final_paths(got)) < want:
            got.append(await stream.next(timeout))
    return got


async def test_flow_stream_filters_and_resume(
    server: ApiServer, make_proxy: MakeProxy, upstream: Upstream
) -> None:
    proxy = await make_proxy()
    async with contextlib.AsyncExitStack() as stack:
        everything = await stack.enter_async_context(sse(server.url, "/api/flows/stream", READ))
        missing = await stack.enter_async_context(
            sse(server.url, "/api/flows/stream", READ, {"status": 404})
        )
        posts = await stack.enter_async_context(
            sse(server.url, "/api/flows/stream", READ, {"method": "post", "host": "127.0.0.1"})
        )
        elsewhere = await stack.enter_async_context(
            sse(server.url, "/api/flows/stream", READ, {"host": "*.example.com"})
        )
        searched = await stack.enter_async_context(  # the filter language, bodies included
            sse(server.url, "/api/flows/stream", READ, {"q": "~m post & ~bq 'secret b.dy'"})
        )
        for stream in (everything, missing, posts, elsewhere, searched):
            assert (await connected(stream)).json() == {"resumed_after": None}

        async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
            assert (await client.get(f"{upstream.http}/echo/one")).status_code == 200
            assert (await client.get(f"{upstream.http}/status/404")).status_code == 404
            posted = await client.post(f"{upstream.http}/echo/two", content=b"secret body")
            assert posted.status_code == 200

        seen = await collect(everything, 3)
        assert final_paths(seen) == ["/echo/one", "/status/404", "/echo/two"]
        for ev in seen:
            flow = ev.json()
            assert ev.id is not None and ":" in ev.id
            assert flow["replica"] == proxy.id and flow["host"] == "127.0.0.1"
            assert "body_b64" not in (flow["request"] or {})  # bodies are not streamed
            assert "body_b64" not in (flow["response"] or {})
        assert "secret body" not in "".join(e.data for e in seen)
        ids = [e.id for e in seen]
        assert len(set(ids)) == len(ids)

        only_404 = await missing.next()
        assert only_404.json()["path"] == "/status/404"
        assert only_404.json()["response"]["status"] == 404
        assert only_404.id in ids
        found = await collect(searched, 1)
        assert final_paths(found) == ["/echo/two"]
        assert [e.json()["event"] for e in found] == ["completed"]  # bodies: final events only
        post_events = await collect(posts, 1)
        assert final_paths(post_events) == ["/echo/two"]
        assert all(e.json()["method"] == "POST" for e in post_events)
        with pytest.raises(TimeoutError):
            await elsewhere.next(timeout=0.5)
        with pytest.raises(TimeoutError):  # nothing but the one 404 for this filter
            await missing.next(timeout=0.3)

    # resume after the first event: exactly the ones after it, then live
    headers = {**READ, "Last-Event-ID": ids[0] or ""}
    async with sse(server.url, "/api/flows/stream", headers) as resumed:
        assert (await connected(resumed)).json() == {"resumed_after": ids[0]}  # always first
        replayed = [await resumed.next() for _ in ids[1:]]
        assert [e.id for e in replayed] == ids[1:]
        async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
            assert (await client.get(f"{upstream.http}/echo/three")).status_code == 200
        live = await collect(resumed, 1)
        assert final_paths(live) == ["/echo/three"]
        assert all(e.id not in ids for e in live)

    async with httpx.AsyncClient(base_url=server.url, timeout=10) as api:
        for params, field in [({"limit": 5}, "query.limit"), ({"status": 42}, "query.status")]:
            resp = await api.get("/api/flows/stream", params=params, headers=READ)
            assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == field
        bad = await api.get("/api/flows/stream", headers={**READ, "Last-Event-ID": "nope"})
        assert bad.status_code == 422
        # an id this stream never gave (another installation, or the future): said, not silent
        last_seq = int(ids[-1].split(":")[0]) if ids[-1] else 0
        future = await api.get(
            "/api/flows/stream", headers={**READ, "Last-Event-ID": f"{last_seq + 10_000}:0"}
        )
        assert future.status_code == 422
        assert "not an id of this stream" in future.json()["errors"][0]["message"]
        bad_q = await api.get("/api/flows/stream", params={"q": "~c 404 &"}, headers=READ)
        assert bad_q.status_code == 422 and bad_q.json()["code"] == "BAD_FILTER"
        assert bad_q.json()["errors"][0]["field"] == "query.q"
        assert bad_q.json()["errors"][0]["position"] == 8


async def test_a_client_that_stops_reading_is_dropped(
    server: ApiServer, make_proxy: MakeProxy, upstream: Upstream
) -> None:
    """A client whose queue passes FLEET_API_STREAM_QUEUE_SIZE (20 here) is dropped with a
    final ``event: dropped``; the other subscriber keeps receiving everything."""
    proxy = await make_proxy()
    hub = server.app.state.services.flow_hub
    host, port = server.url.removeprefix("http://").rsplit(":", 1)

    # the slow client: a tiny receive buffer, reads the response head and then nothing
    slow = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(slow, (host, int(port)))
    request = (
        f"GET /api/flows/stream HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {READ_KEY}\r\n"
        "Accept: text/event-stream\r\n\r\n"
    )
    await loop.sock_sendall(slow, request.encode())
    head = b""
    while b"event: connected" not in head:
        head += await loop.sock_recv(slow, 4096)
    assert head.startswith(b"HTTP/1.1 200")

    received: list[Event] = []
    arrived = asyncio.Event()
    big = {f"X-Padding-{i}": "p" * 4000 for i in range(8)}  # ~32 KB per event

    async def caught_up(n: int) -> None:
        """Until the fast client has the final events of the first ``n`` flows."""
        async with asyncio.timeout(10):
            while len(final_paths(received)) < n:
                arrived.clear()
                await arrived.wait()

    async with sse(server.url, "/api/flows/stream", READ) as fast:
        await connected(fast)

        async def read_fast() -> None:
            while True:
                received.append(await fast.next(timeout=30))
                arrived.set()

        reader = asyncio.create_task(read_fast())
        sent = 0
        try:
            async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
                while hub.dropped == 0 and sent < 2000:
                    resp = await client.get(f"{upstream.http}/echo/{sent}", headers=big)
                    assert resp.status_code == 200
                    sent += 1
                    # the fast client keeps pace (however loaded this machine is)
                    await caught_up(sent)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    assert hub.dropped == 1
    assert [e.event for e in received] == ["message"] * len(received)  # never dropped
    assert final_paths(received) == [f"/echo/{i}" for i in range(sent)]

    # the slow client finally reads: what was in flight, then `dropped`, then the end
    tail = bytearray()
    async with asyncio.timeout(20):
        while not tail.endswith(b"0\r\n\r\n"):
            chunk = await loop.sock_recv(slow, 1 << 20)
            if not chunk:
                break
            tail += chunk
    slow.close()
    text = bytes(tail)
    assert b"event: dropped" in text
    dropped = text[text.index(b"event: dropped") :]
    assert b"reads too slowly" in dropped and b"last_event_id" in dropped
    assert b'"last_event_id":null' not in dropped  # always an id to resume from
    assert b"\ndata: {" not in dropped.split(b"\n\n", 1)[1]  # nothing after `dropped`
    assert not hub.subscribers or all(s.dropped is None for s in hub.subscribers)


async def test_a_resume_id_older_than_the_stream_says_where_it_goes_on(
    restartable_nats: EmbeddedNats, tmp_path: Path
) -> None:
    """Events between the client's id and the oldest one kept were pruned: ``connected``
    says so (``gap``) and where the stream resumes, then the kept events follow."""
    bus = await Bus.connect(restartable_nats.url, "gap test", 5.0)
    try:
        await bus.ensure_streams()
        event = {"event": "completed", "id": "x", "state": "completed", "path": "/kept"}
        for _ in range(3):
            await bus.js_publish(subjects.flows_subject("r1"), orjson.dumps([event]))
        await bus.js.purge_stream(subjects.FLOWS_STREAM)
        ack = await bus.js_publish(subjects.flows_subject("r1"), orjson.dumps([event]))
        settings = api_settings(restartable_nats.url, tmp_path / "api", api_sse_heartbeat=0.3)
        async with (
            serve_api(settings) as api,
            sse(api.url, "/api/flows/stream", {**READ, "Last-Event-ID": "1:0"}) as stream,
        ):
            hello = (await connected(stream)).json()
            assert hello == {"resumed_after": "1:0", "gap": True, "resumes_at": f"{ack.seq}:0"}
            kept = await stream.next()
            assert kept.id == f"{ack.seq}:0" and kept.json()["path"] == "/kept"
    finally:
        await bus.close()
