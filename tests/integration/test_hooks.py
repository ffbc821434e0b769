"""The hook seam (``services/proxy/hooks.py``) through a real replica: addons installed
on the running proxy (``ctx.chain``) rewrite requests and responses, answer requests
themselves, kill them, and hold them until resumed, killed or abandoned; hooks that
raise are logged and skipped; the end hooks run once per exchange.

What the client received, what reached the upstream and what was recorded are all
checked: the upstream is the echo app (it says what it got) or a ``Sentinel`` that
counts the connections and bytes it was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from services.proxy.exchange import Exchange
from services.proxy.hooks import HOOKS, Addon, AddonChain
from tests.integration.harness import (
    FlowEvents,
    ProxyUnderTest,
    RawClient,
    RawResponse,
    Upstream,
    free_port,
    run_curl,
)

pytestmark = pytest.mark.timeout(60)


# -- helpers ---------------------------------------------------------------------------------
class Sentinel:
    """An upstream that records every connection and the bytes it got, answering each
    request head with a small 200 (for tests where nothing should reach it)."""

    def __init__(self) -> None:
        self.connections = 0
        self.received = b""
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(65536):
                self.received += data
                if b"\r\n\r\n" in data:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsentinel")
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def sentinel() -> AsyncIterator[Sentinel]:
    s = Sentinel()
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


def install(proxy: ProxyUnderTest, *addons: Addon) -> None:
    """Replace the replica's chain: the addons of its config (ignore_hosts...) first."""
    proxy.ctx.chain = AddonChain([*proxy.ctx.chain.addons, *addons])


def status(event: dict[str, Any]) -> int | None:
    return None if event["response"] is None else int(event["response"]["status"])


def get(url: str, *headers: str, method: str = "GET", body: bytes = b"") -> bytes:
    host = url.split("/")[2]
    lines = [f"{method} {url} HTTP/1.1", f"Host: {host}", *headers]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def echoed(resp: RawResponse) -> dict[str, Any]:
    assert resp.status == 200, (resp.status, resp.body[:200])
    data: dict[str, Any] = orjson.loads(resp.body)
    return data


def seen(echo: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in echo["headers"] if k.lower() == name.lower()]


async def final(flows: FlowEvents, flow_id: str) -> dict[str, Any]:
    return await flows.wait_for(lambda e: e["id"] == flow_id and e["event"] != "started")


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    """Wait (bounded) until ``predicate()`` is true."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


class Holder(Addon):
    """Holds every request whose path starts with ``prefix``; remembers them."""

    name = "holder"

    def __init__(self, prefix: bytes = b"/") -> None:
        self.prefix = prefix
        self.held: list[Exchange] = []
        self.heads: list[bytes] = []

    def request_head(self, ex: Exchange) -> None:
        self.heads.append(ex.flow.path)
        if ex.flow.path.startswith(self.prefix):
            self.held.append(ex)
            ex.hold()


class Counter(Addon):
    """Counts each hook call by flow id."""

    name = "counter"

    def __init__(self) -> None:
        self.calls: dict[str, list[str]] = defaultdict(list)

    def request_head(self, ex: Exchange) -> None:
        self.calls[ex.flow.id].append("request_head")

    def request_end(self, ex: Exchange) -> None:
        self.calls[ex.flow.id].append("request_end")

    def response_head(self, ex: Exchange) -> None:
        self.calls[ex.flow.id].append("response_head")

    def response_end(self, ex: Exchange) -> None:
        self.calls[ex.flow.id].append("response_end")

    def error(self, ex: Exchange) -> None:
        self.calls[ex.flow.id].append("error")

    def ends(self, flow_id: str) -> list[str]:
        return [c for c in self.calls[flow_id] if c in ("response_end", "error")]


# -- AddonChain (unit) -----------------------------------------------------------------------
def test_chain_holds_only_the_hooks_addons_override() -> None:
    empty = AddonChain()
    for hook in HOOKS:
        assert getattr(empty, hook) == ()
    assert AddonChain([Addon(), Addon()]).request_head == ()  # the base defines no hooks

    class OnlyHead(Addon):
        def request_head(self, ex: Exchange) -> None:
            pass

    class HeadAndError(OnlyHead):
        def error(self, ex: Exchange) -> None:
            pass

    a, b = OnlyHead(), HeadAndError()
    chain = AddonChain([a, b])
    assert chain.request_head == (a.request_head, b.request_head)  # in order
    assert chain.error == (b.error,)
    assert chain.request_end == chain.response_head == chain.response_end == ()
    counter = Counter()
    full = AddonChain([counter])
    assert all(len(getattr(full, hook)) == 1 for hook in HOOKS)
    assert full.addons == (counter,)


# -- rewriting the request -------------------------------------------------------------------
async def test_request_head_rewrite_reaches_the_upstream(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    class Rewrite(Addon):
        def request_head(self, ex: Exchange) -> None:
            flow = ex.flow
            flow.path = b"/echo/rewritten?by=addon"
            flow.method = b"PUT"
            flow.req_headers[:] = [
                (n, v) for n, v in flow.req_headers if n.lower() != b"x-remove-me"
            ]
            flow.req_headers.append((b"X-Added", b"by-addon"))

    install(proxy, Rewrite())
    async with await RawClient.connect(proxy.port) as client:
        await client.send(get(f"{upstream.http}/echo/original", "X-Remove-Me: secret", "X-Keep: 1"))
        echo = echoed(await client.read_response())
    assert echo["method"] == "PUT"
    assert echo["path"] == "/echo/rewritten?by=addon"
    assert seen(echo, "x-added") == ["by-addon"]
    assert seen(echo, "x-remove-me") == []
    assert seen(echo, "x-keep") == ["1"]
    event = await flows.final_for("/echo/rewritten?by=addon")
    assert event["state"] == "completed" and event["method"] == "PUT"


async def test_request_head_can_retarget_the_exchange(
    proxy: ProxyUnderTest, upstream: Upstream, sentinel: Sentinel
) -> None:
    """The upstream connection follows ``flow.host``/``port`` set by an addon (map_remote)."""

    class MapRemote(Addon):
        def request_head(self, ex: Exchange) -> None:
            ex.flow.port = upstream.http_port

    install(proxy, MapRemote())
    async with await RawClient.connect(proxy.port) as client:
        await client.send(get(f"http://127.0.0.1:{sentinel.port}/echo/mapped"))
        echo = echoed(await client.read_response())
    assert echo["path"] == "/echo/mapped"
    assert sentinel.connections == 0


async def test_held_request_with_a_body_is_relayed_whole_after_resume(
    proxy: ProxyUnderTest, upstream: Upstream
) -> None:
    holder = Holder(b"/echo")
    install(proxy, holder)
    async with await RawClient.connect(proxy.port) as client:
        await client.send(get(f"{upstream.http}/echo/post", method="POST", body=b"A" * 70000))
        await until(lambda: holder.held)
        asyncio.get_running_loop().call_later(0.1, holder.held[0].resume)
        echo = echoed(await client.read_response())
    assert echo["method"] == "POST"
    assert echo["body_len"] == 70000


# -- respond ---------------------------------------------------------------------------------
class Responder(Addon):
    def __init__(self, prefix: bytes = b"/") -> None:
        self.prefix = prefix

    def request_head(self, ex: Exchange) -> None:
        if ex.flow.path.startswith(self.prefix):
            ex.respond(418, [(b"Content-Type", b"text/plain"), (b"X-By", b"addon")], b"teapot")


async def test_respond_answers_without_the_upstream(
    proxy: ProxyUnderTest, sentinel: Sentinel, flows: FlowEvents
) -> None:
    install(proxy, Responder())
    base = f"http://127.0.0.1:{sentinel.port}"
    async with await RawClient.connect(proxy.port) as client:
        await client.send(get(f"{base}/answered"))
        resp = await client.read_response()
        assert (resp.status, resp.body, resp.header("x-by")) == (418, b"teapot", "addon")
        # the connection is kept alive: a second request is answered too
        await client.send(get(f"{base}/again"))
        again = await client.read_response()
        assert again.status == 418
    event = await flows.final_for("/answered")
    assert event["event"] == "completed" and event["state"] == "completed"
    assert status(event) == 418
    assert sentinel.connections == 0 and sentinel.received == b""


async def test_respond_with_curl(proxy: ProxyUnderTest, sentinel: Sentinel) -> None:
    install(proxy, Responder())
    rc, out, err = await run_curl(
        "-x", proxy.url, "-i", f"http://127.0.0.1:{sentinel.port}/curl", timeout=10
    )
    assert rc == 0, err
    assert out.startswith(b"HTTP/1.1 418 ")
    assert out.endswith(b"\r\n\r\nteapot")
    assert sentinel.connections == 0


async def test_respond_to_a_request_with_a_body_closes_after_the_answer(
    proxy: ProxyUnderTest, sentinel: Sentinel, flows: FlowEvents
) -> None:
    install(proxy, Responder())
    async with await RawClient.connect(proxy.port) as client:
        await client.send(
            get(f"http://127.0.0.1:{sentinel.port}/posted", method="POST", body=b"x" * 10)
        )
        resp = await client.read_response()
        assert resp.status == 418
        assert await client.closed_by_peer(5.0)
    assert status(await flows.final_for("/posted")) == 418
    assert sentinel.connections == 0


async def test_respond_to_a_pipelined_request_waits_its_turn(
    proxy: ProxyUnderTest, upstream: Upstream
) -> None:
    install(proxy, Responder(b"/answer"))
    async with await RawClient.connect(proxy.port) as client:
        await client.send(
            get(f"{upstream.http}/echo/first")
            + get(f"{upstream.http}/answer")
            + get(f"{upstream.http}/echo/third")
        )
        first = await client.read_response()
        second = await client.read_response()
        third = await client.read_response()
    assert echoed(first)["path"] == "/echo/first"
    assert (second.status, second.body) == (418, b"teapot")
    assert echoed(third)["path"] == "/echo/third"


# -- kill ------------------------------------------------------------------------------------
async def test_kill_at_request_head_cuts_the_client(
    proxy: ProxyUnderTest, sentinel: Sentinel, flows: FlowEvents
) -> None:
    class Killer(Addon):
        def request_head(self, ex: Exchange) -> None:
            ex.kill("no thanks")

    install(proxy, Killer())
    async with await RawClient.connect(proxy.port) as client:
        await client.send(get(f"http://127.0.0.1:{sentinel.port}/killed"))
        assert await client.read_until_eof(5.0) == b""
    event = await flows.final_for("/killed")
    assert event["event"] == "killed" and event["state"] == "killed"
    assert event["error"] == "no thanks"
    assert sentinel.connections == 0


async def test_kill_at_response_head_cuts_the_client(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    class KillResponse(Addon):
        def response_head(self, ex: Exchange) -> None:
            ex.kill("bad response")

    install(proxy, KillResponse())
    async with await RawClient.connect(proxy.port) as client:
        await client.send(get(f"{upstream.http}/echo/resp-killed"))
        assert await client.read_until_eof(5.0) == b""
    event = await flows.final_for("/echo/resp-killed")
    assert event["state"] == "killed" and event["error"] == "bad response"


# -- hold ------------------------------------------------------------------------------------
async def test_hold_then_resume_from_a_callback_completes(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    holder = Holder(b"/echo")
    install(proxy, holder)

    def resume_later(ex: Exchange) -> None:
        asyncio.get_running_loop().call_later(0.2, ex.resume)

    async with await RawClient.connect(proxy.port) as client:
        await client.send(get(f"{upstream.http}/echo/held"))
        await until(lambda: holder.held)
        ex = holder.held[0]
        assert ex.flow.state == "active"
        assert proxy.ctx.active.get(ex.flow.id) is ex  # a held exchange is active (killable)
        started = await flows.wait_for(lambda e: e["id"] == ex.flow.id)
        assert started["event"] == "started"
        resume_later(ex)
        echo = echoed(await client.read_response())
    assert echo["path"] == "/echo/held"
    event = await final(flows, ex.flow.id)
    assert event["state"] == "completed" and status(event) == 200


async def test_hold_then_client_disconnect_ends_error_and_sends_nothing(
    proxy: ProxyUnderTest, sentinel: Sentinel, flows: FlowEvents
) -> None:
    holder = Holder()
    install(proxy, holder)
    client = await RawClient.connect(proxy.port)
    await client.send(get(f"http://127.0.0.1:{sentinel.port}/abandoned"))
    await until(lambda: holder.held)
    ex = holder.held[0]
    client.close()
    event = await final(flows, ex.flow.id)
    assert event["state"] == "error"
    assert "disconnect" in (event["error"] or "")
    assert ex.flow.id not in proxy.ctx.active
    ex.resume()  # a late decision on an abandoned exchange does nothing
    await asyncio.sleep(0.2)
    assert sentinel.connections == 0 and sentinel.received == b""
    assert [e["event"] for e in flows.events if e["id"] == ex.flow.id] == ["started", "error"]


async def test_hold_then_operator_kill(
    proxy: ProxyUnderTest, sentinel: Sentinel, flows: FlowEvents
) -> None:
    holder = Holder()
    install(proxy, holder)
    async with await RawClient.connect(proxy.port) as client:
        await client.send(get(f"http://127.0.0.1:{sentinel.port}/held-killed"))
        await until(lambda: holder.held)
        ex = holder.held[0]
        assert proxy.ctx.kill(ex.flow.id, "operator said no")
        assert await client.read_until_eof(5.0) == b""
    event = await final(flows, ex.flow.id)
    assert event["state"] == "killed" and event["error"] == "operator said no"
    assert not proxy.ctx.kill(ex.flow.id)  # gone from the active set
    ex.resume()
    await asyncio.sleep(0.2)
    assert sentinel.connections == 0


async def test_hold_then_exchange_kill_from_a_callback(
    proxy: ProxyUnderTest, sentinel: Sentinel, flows: FlowEvents
) -> None:
    """``Exchange.kill`` outside a hook (an intercept decision) frees a held exchange."""
    holder = Holder()
    install(proxy, holder)
    async with await RawClient.connect(proxy.port) as client:
        await client.send(get(f"http://127.0.0.1:{sentinel.port}/decided-kill"))
        await until(lambda: holder.held)
        ex = holder.held[0]
        asyncio.get_running_loop().call_later(0.05, ex.kill, "rejected")
        assert await client.read_until_eof(5.0) == b""
    event = await final(flows, ex.flow.id)
    assert event["state"] == "killed" and event["error"] == "rejected"
    assert sentinel.connections == 0


async def test_pipelined_request_behind_a_held_one_waits_then_completes_in_order(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    holder = Holder(b"/echo/one")
    install(proxy, holder)
    async with await RawClient.connect(proxy.port) as client:
        await client.send(get(f"{upstream.http}/echo/one") + get(f"{upstream.http}/echo/two"))
        await until(lambda: holder.held)
        await asyncio.sleep(0.3)  # room for the proxy to (wrongly) go on with the second
        assert holder.heads == [b"/echo/one"]  # the second is not even parsed yet
        assert client.buf == b""
        holder.held[0].resume()
        first = await client.read_response()
        second = await client.read_response()
    assert echoed(first)["path"] == "/echo/one"
    assert echoed(second)["path"] == "/echo/two"
    assert holder.heads == [b"/echo/one", b"/echo/two"]
    assert (await flows.final_for("/echo/two"))["state"] == "completed"


async def test_second_pipelined_request_held_while_the_first_is_answered(
    proxy: ProxyUnderTest, upstream: Upstream
) -> None:
    holder = Holder(b"/echo/two")
    install(proxy, holder)
    async with await RawClient.connect(proxy.port) as client:
        await client.send(get(f"{upstream.http}/echo/one") + get(f"{upstream.http}/echo/two"))
        first = await client.read_response()
        assert echoed(first)["path"] == "/echo/one"
        await until(lambda: holder.held)
        holder.held[0].resume()
        second = await client.read_response()
    assert echoed(second)["path"] == "/echo/two"


class HoldConnect(Addon):
    def request_head(self, ex: Exchange) -> None:
        if ex.flow.method == b"CONNECT":
            ex.hold()
            asyncio.get_running_loop().call_later(0.1, ex.resume)


async def test_held_connect_resumes_into_a_tunnel(make_proxy: Any, upstream: Upstream) -> None:
    proxy = await make_proxy(intercept_tls=False)
    install(proxy, HoldConnect())
    rc, out, err = await run_curl(
        "-x", proxy.url, "--cacert", str(upstream.ca.cert_path), f"{upstream.https}/echo/tunnel",
        timeout=15,
    )  # fmt: skip
    assert rc == 0, err
    assert orjson.loads(out)["path"] == "/echo/tunnel"


async def test_held_connect_resumes_into_interception(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    install(proxy, HoldConnect())
    rc, out, err = await run_curl(
        "-x", proxy.url, "--cacert", str(proxy.ca_path), "--max-time", "8",
        f"{upstream.https}/echo/tls", timeout=15,
    )  # fmt: skip
    assert rc == 0, err
    assert orjson.loads(out)["path"] == "/echo/tls"
    event = await flows.final_for("/echo/tls")
    assert event["state"] == "completed" and event["scheme"] == "https"


# -- response head ---------------------------------------------------------------------------
async def test_response_head_rewrite_reaches_the_client(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    class RewriteResponse(Addon):
        def response_head(self, ex: Exchange) -> None:
            flow = ex.flow
            flow.status = 203
            flow.resp_headers[:] = [
                (n, v) for n, v in flow.resp_headers if n.lower() != b"content-type"
            ]
            flow.resp_headers.append((b"X-Rewritten", b"yes"))

    install(proxy, RewriteResponse())
    async with await RawClient.connect(proxy.port) as client:
        await client.send(get(f"{upstream.http}/echo/resp"))
        resp = await client.read_response()
    assert resp.status == 203
    assert resp.header("x-rewritten") == "yes"
    assert resp.header("content-type") is None
    assert orjson.loads(resp.body)["path"] == "/echo/resp"
    event = await flows.final_for("/echo/resp")
    assert status(event) == 203 and event["state"] == "completed"


# -- end hooks: once per exchange ------------------------------------------------------------
async def test_end_hooks_run_once_per_exchange(
    proxy: ProxyUnderTest, upstream: Upstream, sentinel: Sentinel, flows: FlowEvents
) -> None:
    counter = Counter()

    class Decide(Addon):
        def request_head(self, ex: Exchange) -> None:
            path = ex.flow.path
            if path == b"/respond":
                ex.respond(204)
            elif path == b"/kill":
                ex.kill("killed for the count")

    install(proxy, counter, Decide())
    dead = free_port()
    # completed, with a body (request_end), keep-alive: two exchanges on one connection
    async with await RawClient.connect(proxy.port) as client:
        await client.send(get(f"{upstream.http}/echo/a", method="POST", body=b"abc"))
        await client.read_response()
        await client.send(get(f"{upstream.http}/echo/b"))
        await client.read_response()
        await client.send(get(f"http://127.0.0.1:{sentinel.port}/respond"))
        assert (await client.read_response()).status == 204
    # an upstream that cannot be reached: 502, error
    async with await RawClient.connect(proxy.port) as client:
        await client.send(get(f"http://127.0.0.1:{dead}/unreachable"))
        assert (await client.read_response()).status == 502
    # killed at the request head
    async with await RawClient.connect(proxy.port) as client:
        await client.send(get(f"http://127.0.0.1:{sentinel.port}/kill"))
        assert await client.read_until_eof(5.0) == b""
    # killed by the operator in the middle of a response
    cut = "/drip?s=0.05&n=200&cut=1"
    async with await RawClient.connect(proxy.port) as client:
        await client.send(get(f"{upstream.http}{cut}"))
        await until(lambda: any(e["path"] == cut for e in flows.events))
        drip = next(e for e in flows.events if e["path"] == cut)
        await until(lambda: drip["id"] in proxy.ctx.active)
        await until(lambda: proxy.ctx.active[drip["id"]].response_started)
        assert proxy.ctx.kill(drip["id"])
        with contextlib.suppress(TimeoutError):
            await client.read_until_eof(5.0)
    # the client leaves in the middle of a response
    gone = "/drip?s=0.05&n=200&gone=1"
    client = await RawClient.connect(proxy.port)
    await client.send(get(f"{upstream.http}{gone}"))
    await until(lambda: any(e["path"] == gone for e in flows.events))
    client.close()

    paths = {
        "/echo/a": "completed",
        "/echo/b": "completed",
        "/respond": "completed",
        "/unreachable": "error",
        "/kill": "killed",
        cut: "killed",
        gone: "error",
    }
    finals = {}
    for path, state in paths.items():
        event = await flows.final_for(path)
        assert event["state"] == state, (path, event)
        finals[path] = event
    await asyncio.sleep(0.3)  # room for a (wrong) second end hook
    for path, event in finals.items():
        calls = counter.calls[event["id"]]
        expected = ["response_end"] if event["state"] == "completed" else ["error"]
        assert counter.ends(event["id"]) == expected, (path, calls)
        assert calls.count("request_head") == 1, (path, calls)
    assert counter.calls[finals["/echo/a"]["id"]] == [
        "request_head",
        "request_end",
        "response_head",
        "response_end",
    ]
    assert counter.calls[finals["/respond"]["id"]] == ["request_head", "response_end"]


async def test_end_hooks_run_once_for_a_tunnel(
    make_proxy: Any, upstream: Upstream, nats_url: str
) -> None:
    proxy = await make_proxy(intercept_tls=False)
    counter = Counter()
    install(proxy, counter)
    rc, _, err = await run_curl(
        "-x", proxy.url, "--cacert", str(upstream.ca.cert_path), f"{upstream.https}/echo/t"
    )
    assert rc == 0, err
    await until(lambda: any(counter.ends(f) for f in counter.calls))
    await asyncio.sleep(0.3)
    (flow_id,) = counter.calls
    assert counter.calls[flow_id] == ["request_head", "response_end"]


# -- addons that raise -----------------------------------------------------------------------
async def test_an_addon_that_raises_is_logged_and_skipped(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(Addon):
        name = "broken"

        def request_head(self, ex: Exchange) -> None:
            raise RuntimeError("broken request_head")

        def request_end(self, ex: Exchange) -> None:
            raise RuntimeError("broken request_end")

        def response_head(self, ex: Exchange) -> None:
            raise RuntimeError("broken response_head")

        def response_end(self, ex: Exchange) -> None:
            raise RuntimeError("broken response_end")

        def error(self, ex: Exchange) -> None:
            raise RuntimeError("broken error")

    class After(Addon):
        """Runs after the broken one: the chain goes on."""

        def request_head(self, ex: Exchange) -> None:
            ex.flow.req_headers.append((b"X-After", b"ran"))

    install(proxy, Broken(), After())
    with caplog.at_level(logging.ERROR, logger="proxyfleet.proxy"):
        async with await RawClient.connect(proxy.port) as client:
            await client.send(get(f"{upstream.http}/echo/broken", method="POST", body=b"xy"))
            echo = echoed(await client.read_response())
            # the connection survives: a second exchange works too
            await client.send(get(f"{upstream.http}/echo/broken2"))
            assert echoed(await client.read_response())["path"] == "/echo/broken2"
        assert echo["body"] == "xy"
        assert seen(echo, "x-after") == ["ran"]
        event = await flows.final_for("/echo/broken")
        assert event["state"] == "completed" and status(event) == 200
        # the error hook raises too, on a failing exchange
        async with await RawClient.connect(proxy.port) as client:
            await client.send(get(f"http://127.0.0.1:{free_port()}/broken-error"))
            assert (await client.read_response()).status == 502
        assert (await flows.final_for("/broken-error"))["state"] == "error"
    failed = [r for r in caplog.records if "addon hook" in r.getMessage()]
    messages = {str(r.exc_info[1]) for r in failed if r.exc_info}
    assert {
        "broken request_head",
        "broken request_end",
        "broken response_head",
        "broken response_end",
        "broken error",
    } <= messages


# -- hold at the response head ---------------------------------------------------------------
class ResponseHolder(Addon):
    """Holds the first response at its head; remembers it."""

    name = "response-holder"

    def __init__(self) -> None:
        self.held: list[Exchange] = []

    def response_head(self, ex: Exchange) -> None:
        if not self.held:
            self.held.append(ex)
            ex.hold()


async def test_response_held_at_its_head_goes_on_with_the_edits_made_meanwhile(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    holder = ResponseHolder()
    install(proxy, holder)
    async with await RawClient.connect(proxy.port) as client:
        await client.send(get(f"{upstream.http}/bytes/200000"))  # a body bigger than one read
        await until(lambda: holder.held)
        ex = holder.held[0]
        assert not ex.response_started  # nothing went to the client yet
        with pytest.raises(TimeoutError):
            await client.read_response(timeout=0.3)
        ex.flow.resp_headers.append((b"X-Decided", b"later"))
        ex.flow.resp_headers.append((b"Content-Length", b"1"))  # framing stays the upstream's
        ex.resume()
        resp = await client.read_response()
        assert resp.status == 200 and resp.header("x-decided") == "later"
        assert len(resp.body) == 200000
        # the connection goes on: a second request on it is served
        await client.send(get(f"{upstream.http}/echo/next"))
        assert echoed(await client.read_response())["path"] == "/echo/next"
    event = await final(flows, ex.flow.id)
    assert event["state"] == "completed" and event["response"]["size"] == 200000


async def test_response_held_then_killed(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    holder = ResponseHolder()
    install(proxy, holder)
    async with await RawClient.connect(proxy.port) as client:
        await client.send(get(f"{upstream.http}/echo/response-killed"))
        await until(lambda: holder.held)
        ex = holder.held[0]
        ex.kill("operator refused the response")
        assert await client.read_until_eof(5.0) == b""
    event = await final(flows, ex.flow.id)
    assert event["state"] == "killed" and event["error"] == "operator refused the response"


async def test_response_held_then_client_disconnects(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    holder = ResponseHolder()
    install(proxy, holder)
    client = await RawClient.connect(proxy.port)
    await client.send(get(f"{upstream.http}/echo/response-abandoned"))
    await until(lambda: holder.held)
    ex = holder.held[0]
    client.close()
    event = await final(flows, ex.flow.id)
    assert event["state"] == "error" and "disconnect" in (event["error"] or "")
    ex.resume()  # too late: nothing happens
    assert proxy.ctx.pool.idle_count == 0  # the held upstream connection was not pooled
