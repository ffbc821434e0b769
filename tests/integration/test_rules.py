"""The rules policy on a real replica: a policy written to KV ``fleet_policy`` is applied
without a restart, and real clients (curl, httpx, raw sockets) through the proxy to real
upstreams meet its rules. What the client got, what the upstream got and what was
recorded (``policy``, ``tags``) are checked; so is what a hostile client or a bad policy
cannot do.

Each test runs its own NATS: the policy bucket is shared by every replica on a server.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import AsyncIterator

import pytest

from libs.common import subjects
from libs.common.natsserver import EmbeddedNats
from services.proxy.rewrite import LIMIT as REWRITE_LIMIT
from tests.integration.conftest import MakeProxy
from tests.integration.harness import RawClient, Upstream, raw_server, run_curl
from tests.integration.rules_harness import Fleet, matched, rule, start_fleet

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def fleet(restartable_nats: EmbeddedNats, make_proxy: MakeProxy) -> AsyncIterator[Fleet]:
    async with start_fleet(restartable_nats, make_proxy) as f:
        yield f


# -- edits ---------------------------------------------------------------------------------
async def test_set_and_remove_request_headers_reach_the_upstream(
    fleet: Fleet, upstream: Upstream
) -> None:
    revision = await fleet.put_policy(
        [
            rule("hdr", "~u /echo/", {"type": "set_headers", "headers": [["X-Team", "a"]]}),
            rule("strip", "~hq x-secret", {"type": "remove_headers", "names": ["X-Secret"]}),
            rule("other", "~d elsewhere.example", {"type": "tag", "tags": ["never"]}),
        ]
    )
    async with fleet.client() as client:
        resp = await client.get(
            f"{upstream.http}/echo/h", headers={"X-Team": "client", "X-Secret": "s3"}
        )
    got = {k.lower(): v for k, v in resp.json()["headers"]}
    assert got["x-team"] == "a"  # replaced, not added
    assert [k for k, _ in resp.json()["headers"] if k.lower() == "x-team"] == ["X-Team"]
    assert "x-secret" not in got
    event = await fleet.flows.final_for("/echo/h")
    assert event["policy"]["revision"] == revision
    assert matched(event) == [("hdr", "set_headers"), ("strip", "remove_headers")]


async def test_response_phase_edits_reach_the_client(fleet: Fleet, upstream: Upstream) -> None:
    await fleet.put_policy(
        [
            rule(
                "csp",
                "~c 200 & ~u /echo/",
                {"type": "set_headers", "headers": [["X-Frame-Options", "DENY"]]},
                phase="response",
            ),
            rule(
                "srv",
                "~hs content-type",
                {"type": "remove_headers", "names": ["Server"]},
                phase="response",
            ),
        ]
    )
    async with fleet.client() as client:
        resp = await client.get(f"{upstream.http}/echo/r")
        other = await client.get(f"{upstream.http}/status/404")
    assert resp.headers["x-frame-options"] == "DENY"
    assert "server" not in resp.headers
    assert resp.json()["path"] == "/echo/r"  # the body streams untouched
    assert "x-frame-options" not in other.headers
    event = await fleet.flows.final_for("/echo/r")
    assert matched(event) == [("csp", "set_headers"), ("srv", "remove_headers")]
    assert {"phase": "response"}.items() <= event["policy"]["matched"][0].items()


async def test_map_remote_sends_the_request_elsewhere(fleet: Fleet, upstream: Upstream) -> None:
    await fleet.put_policy(
        [
            rule(
                "mock-api",
                "~u /old/",
                {"type": "map_remote", "pattern": "/old/", "replacement": "/echo/new/"},
            )
        ]
    )
    async with fleet.client() as client:
        resp = await client.get(f"{upstream.http}/old/x?q=1")
    assert resp.json()["path"] == "/echo/new/x?q=1"
    event = await fleet.flows.final_for("/echo/new/x?q=1")
    assert matched(event) == [("mock-api", "map_remote")]
    assert "to http://127.0.0.1" in event["policy"]["matched"][0]["note"]


async def test_map_remote_cannot_reach_the_fleets_own_nats(
    fleet: Fleet, upstream: Upstream, restartable_nats: EmbeddedNats
) -> None:
    """A rule (or a request it rewrites) is no way around the destination policy."""
    nats_port = int(restartable_nats.url.rsplit(":", 1)[1])
    await fleet.put_policy(
        [
            rule(
                "evil",
                "~u /to-nats",
                {
                    "type": "map_remote",
                    "pattern": r"^http://[^/]+/to-nats",
                    "replacement": f"http://127.0.0.1:{nats_port}/",
                },
            )
        ]
    )
    async with fleet.client() as client:
        resp = await client.get(f"{upstream.http}/to-nats")
    assert resp.status_code == 403
    event = await fleet.flows.wait_for(lambda e: e["event"] != "started" and e["port"] == nats_port)
    assert event["state"] == "error"


async def test_map_remote_to_a_non_url_leaves_the_request_alone(
    fleet: Fleet, upstream: Upstream
) -> None:
    await fleet.put_policy(
        [rule("bad", "~u /echo/", {"type": "map_remote", "pattern": "^http", "replacement": "x"})]
    )
    async with fleet.client() as client:
        resp = await client.get(f"{upstream.http}/echo/keep")
    assert resp.status_code == 200
    event = await fleet.flows.final_for("/echo/keep")
    assert "not applied" in event["policy"]["matched"][0]["note"]


# -- answers -------------------------------------------------------------------------------
async def test_block_answers_without_going_upstream(fleet: Fleet, upstream: Upstream) -> None:
    await fleet.put_policy(
        [rule("ads", "~d 127.0.0.1 & ~u /ads/", {"type": "block", "status": 451, "body": "no"})]
    )
    code, out, _err = await run_curl(
        "-s", "-i", "-x", fleet.proxy.url, f"{upstream.http}/ads/banner"
    )
    assert code == 0
    assert out.startswith(b"HTTP/1.1 451")
    assert out.endswith(b"\r\n\r\nno")
    event = await fleet.flows.final_for("/ads/banner")
    assert event["state"] == "completed"
    assert event["response"]["status"] == 451
    assert event["server"] is None  # nothing was connected upstream
    assert matched(event) == [("ads", "block")]


async def test_block_with_close_cuts_the_connection(fleet: Fleet, upstream: Upstream) -> None:
    await fleet.put_policy([rule("cut", "~u /cut", {"type": "block", "close": True})])
    async with await RawClient.connect(fleet.proxy.port) as client:
        await client.send(f"GET {upstream.http}/cut HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert await client.read_until_eof(timeout=3) == b""
    event = await fleet.flows.final_for("/cut")
    assert event["state"] == "killed"
    assert "blocked by rule cut" in event["error"]


async def test_respond_mocks_a_request(fleet: Fleet, upstream: Upstream) -> None:
    await fleet.put_policy(
        [
            rule(
                "mock",
                "~m POST & ~u /api/login",
                {
                    "type": "respond",
                    "status": 201,
                    "headers": [["Content-Type", "application/json"], ["Set-Cookie", "a=1"]],
                    "body": '{"token":"fake"}',
                },
            )
        ]
    )
    async with fleet.client() as client:
        resp = await client.post(f"{upstream.http}/api/login", content=b"user=x")
        again = await client.get(f"{upstream.http}/echo/after-mock")  # same connection
    assert resp.status_code == 201
    assert resp.json() == {"token": "fake"}
    assert resp.headers["set-cookie"] == "a=1"
    assert again.status_code == 200
    event = await fleet.flows.final_for("/api/login")
    assert event["response"]["status"] == 201


async def test_respond_at_the_response_phase_replaces_the_upstreams_answer(
    fleet: Fleet, upstream: Upstream
) -> None:
    await fleet.put_policy(
        [
            rule(
                "hide-5xx",
                "~c 500",
                {"type": "respond", "status": 503, "body": "maintenance"},
                phase="response",
            )
        ]
    )
    async with fleet.client() as client:
        resp = await client.get(f"{upstream.http}/status/500")
        ok = await client.get(f"{upstream.http}/status/200")
    assert (resp.status_code, resp.text) == (503, "maintenance")
    assert (ok.status_code, ok.text) == (200, "status 200")
    event = await fleet.flows.final_for("/status/500")
    assert event["response"]["status"] == 503
    assert matched(event) == [("hide-5xx", "respond")]


# -- order ---------------------------------------------------------------------------------
async def test_priority_order_edits_accumulate_and_a_final_action_ends_the_phase(
    fleet: Fleet, upstream: Upstream
) -> None:
    await fleet.put_policy(
        [
            rule("late", "~u /echo/", {"type": "set_headers", "headers": [["X-Order", "late"]]}),
            rule(
                "first",
                "~u /echo/",
                {"type": "set_headers", "headers": [["X-Order", "first"]]},
                priority=10,
            ),
            rule("tagit", "~u /echo/", {"type": "tag", "tags": ["seen"]}, priority=5),
            # matches the request as it arrived, not after 'first' added X-Order
            rule("needs-edit", "~hq x-order", {"type": "tag", "tags": ["edited"]}, priority=4),
            rule("stop", "~u /echo/", {"type": "allow"}, priority=1),
            rule("after-stop", "~u /echo/", {"type": "block"}),
        ]
    )
    async with fleet.client() as client:
        resp = await client.get(f"{upstream.http}/echo/o")
    assert resp.status_code == 200
    order = [v for k, v in resp.json()["headers"] if k.lower() == "x-order"]
    assert order == ["first"]  # 'late' ranks below 'stop'
    event = await fleet.flows.final_for("/echo/o")
    assert matched(event) == [("first", "set_headers"), ("tagit", "tag"), ("stop", "allow")]
    assert event["tags"] == ["seen"]


async def test_disabled_rules_and_other_phases_do_nothing(fleet: Fleet, upstream: Upstream) -> None:
    await fleet.put_policy(
        [
            rule("off", "~u /echo/", {"type": "block"}, enabled=False),
            rule("resp", "~u /echo/", {"type": "tag", "tags": ["r"]}, phase="response"),
        ]
    )
    async with fleet.client() as client:
        resp = await client.get(f"{upstream.http}/echo/d")
    assert resp.status_code == 200
    event = await fleet.flows.final_for("/echo/d")
    assert matched(event) == [("resp", "tag")]
    assert event["tags"] == ["r"]


async def test_delay_holds_then_goes_on(fleet: Fleet, upstream: Upstream) -> None:
    await fleet.put_policy(
        [
            rule("slow1", "~u /echo/slow", {"type": "delay", "ms": 150}),
            rule("slow2", "~u /echo/slow", {"type": "delay", "ms": 150}),
        ]
    )
    async with fleet.client() as client:
        t0 = time.monotonic()
        resp = await client.get(f"{upstream.http}/echo/slow")
        took = time.monotonic() - t0
    assert resp.status_code == 200
    assert took >= 0.3  # the delays add up
    event = await fleet.flows.final_for("/echo/slow")
    assert matched(event) == [("slow1", "delay"), ("slow2", "delay")]


async def test_delay_then_block_answers_after_the_delay(fleet: Fleet, upstream: Upstream) -> None:
    await fleet.put_policy(
        [
            rule("wait", "~u /echo/db", {"type": "delay", "ms": 200}, priority=1),
            rule("deny", "~u /echo/db", {"type": "block", "status": 429, "body": "later"}),
        ]
    )
    async with fleet.client() as client:
        t0 = time.monotonic()
        resp = await client.get(f"{upstream.http}/echo/db")
        took = time.monotonic() - t0
    assert (resp.status_code, resp.text) == (429, "later")
    assert took >= 0.2


async def test_a_delayed_exchange_can_be_killed(fleet: Fleet, upstream: Upstream) -> None:
    await fleet.put_policy([rule("wait", "~u /echo/k", {"type": "delay", "ms": 20_000})])
    async with await RawClient.connect(fleet.proxy.port) as client:
        await client.send(f"GET {upstream.http}/echo/k HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        started = await fleet.flows.wait_for(lambda e: e["path"] == "/echo/k")
        t0 = time.monotonic()
        assert fleet.proxy.ctx.kill(started["id"])
        assert await client.read_until_eof(timeout=3) == b""
        assert time.monotonic() - t0 < 1
    event = await fleet.flows.final_for("/echo/k")
    assert event["state"] == "killed"


# -- CONNECT and HTTPS --------------------------------------------------------------------
async def test_block_applies_to_intercepted_https(fleet: Fleet, upstream: Upstream) -> None:
    await fleet.put_policy([rule("tls", "~u /echo/secret", {"type": "block", "body": "nope"})])
    code, out, _err = await run_curl(
        "-s",
        "-i",
        "--cacert",
        str(fleet.proxy.ca_path),
        "-x",
        fleet.proxy.url,
        f"{upstream.https}/echo/secret",
    )
    assert code == 0
    connect, inner = out.split(b"\r\n\r\n", 1)  # -i shows the CONNECT's answer first
    assert connect == b"HTTP/1.1 200 Connection established"
    assert inner.startswith(b"HTTP/1.1 403 ")
    assert inner.endswith(b"nope")


async def test_block_refuses_a_connect(fleet: Fleet, upstream: Upstream) -> None:
    await fleet.put_policy(
        [rule("no-tunnel", f"~u 127.0.0.1:{upstream.https_port}", {"type": "block"})]
    )
    async with await RawClient.connect(fleet.proxy.port) as client:
        target = f"127.0.0.1:{upstream.https_port}"
        await client.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        data = await client.read_until_eof(timeout=3)
    assert data.startswith(b"HTTP/1.1 403")


# -- last good policy ------------------------------------------------------------------------
async def test_a_policy_the_replica_cannot_apply_keeps_the_last_good(
    fleet: Fleet, upstream: Upstream
) -> None:
    good = await fleet.put_policy([rule("g", "~u /echo/", {"type": "tag", "tags": ["good"]})])
    bad = await fleet.put_policy(
        b'{"rules": [{"id": "x", "match": {"filter": "~u ("}, "action": {"type": "block"}}]}'
    )
    control = fleet.proxy.replica.control
    assert control is not None
    assert control.policy_error is not None
    assert control.policy_error.startswith(f"revision {bad} rejected: ")
    assert "filter" in control.policy_error
    assert control.status().policy_revision == good
    async with fleet.client() as client:
        await client.get(f"{upstream.http}/echo/lkg")
    event = await fleet.flows.final_for("/echo/lkg")
    assert event["tags"] == ["good"]
    assert event["policy"]["revision"] == good
    # fixed by the next good revision
    fixed = await fleet.put_policy([])
    assert control.policy_error is None
    assert control.status().policy_revision == fixed


async def test_deleting_the_policy_removes_every_rule(fleet: Fleet, upstream: Upstream) -> None:
    await fleet.put_policy([rule("b", "~u /echo/", {"type": "block"})])
    kv = await fleet.bus.policy_kv()
    await kv.delete(subjects.POLICY_KEY)
    deadline = time.monotonic() + 5
    while fleet.proxy.ctx.policy.request and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    async with fleet.client() as client:
        resp = await client.get(f"{upstream.http}/echo/free")
    assert resp.status_code == 200


# -- hostile input ----------------------------------------------------------------------------
async def test_a_backtracking_filter_fails_closed_for_a_block(
    fleet: Fleet, upstream: Upstream
) -> None:
    """A client that makes an operator's regex backtrack does not slip past a block, and
    the replica is not held up: the search gives up after its time budget."""
    await fleet.put_policy(
        [
            rule("redos", '~u "(a|aa)+$"', {"type": "block", "status": 403}),
            rule("edit", '~u "(a|aa)+$"', {"type": "tag", "tags": ["t"]}, priority=1),
        ]
    )
    evil = "/" + "a" * 40 + "!"
    async with fleet.client() as client:
        t0 = time.monotonic()
        resp = await client.get(f"{upstream.http}{evil}")
        took = time.monotonic() - t0
    assert resp.status_code == 403
    assert took < 2
    event = await fleet.flows.final_for(evil)
    notes = {m["rule"]: m.get("note") for m in event["policy"]["matched"]}
    assert notes == {"redos": "filter timed out: counted as a match"}
    assert event["tags"] == []


# -- replace_body ----------------------------------------------------------------------------
async def _pieces() -> AsyncIterator[bytes]:  # a body httpx sends chunked
    for piece in (b"cat ", b"in ", b"chunks"):
        yield piece


async def test_replace_body_rewrites_a_request_body(fleet: Fleet, upstream: Upstream) -> None:
    await fleet.put_policy(
        [
            rule(
                "r1", "~u /echo/", {"type": "replace_body", "pattern": "cat", "replacement": "dog"}
            ),
            rule(
                "r2", "~u /echo/", {"type": "replace_body", "pattern": "dog s", "replacement": "D"}
            ),
        ]
    )
    async with fleet.client() as client:
        resp = await client.post(f"{upstream.http}/echo/b", content=b"a cat sat, cat")
        chunked = await client.post(f"{upstream.http}/echo/c", content=_pieces())
        empty = await client.get(f"{upstream.http}/echo/e")
    assert resp.json()["body"] == "a Dat, dog"  # in order, each on the result before
    assert resp.json()["body_len"] == len("a Dat, dog")
    assert chunked.json()["body"] == "dog in chunks"
    got = {k.lower(): v for k, v in chunked.json()["headers"]}
    assert got["content-length"] == str(len("dog in chunks"))
    assert "transfer-encoding" not in got
    assert empty.status_code == 200
    event = await fleet.flows.final_for("/echo/b")
    notes = [m["note"] for m in event["policy"]["matched"]]
    assert notes == ["2 replaced", "1 replaced"]
    assert event["request"]["size"] == len("a Dat, dog")  # what went upstream
    empty_event = await fleet.flows.final_for("/echo/e")
    assert empty_event["policy"]["matched"][0]["note"] == "no body: not applied"


async def test_replace_body_rewrites_a_response_body(fleet: Fleet, upstream: Upstream) -> None:
    await fleet.put_policy(
        [
            rule(
                "resp",
                "~u /chunked/",
                {"type": "replace_body", "pattern": "c{10}", "replacement": "0123456789!"},
                phase="response",
            ),
            rule(
                "json",
                "~u /echo/",
                {"type": "replace_body", "pattern": '"GET"', "replacement": '"TEG"'},
                phase="response",
            ),
        ]
    )
    async with fleet.client() as client:
        resp = await client.get(f"{upstream.http}/chunked/100")
        again = await client.get(f"{upstream.http}/echo/j")  # same connection, still framed
    assert resp.text == "0123456789!" * 10
    assert resp.headers["content-length"] == "110"
    assert "transfer-encoding" not in resp.headers
    assert again.json()["method"] == "TEG"
    event = await fleet.flows.final_for("/chunked/100")
    assert event["policy"]["matched"][0]["note"] == "10 replaced"
    assert event["response"]["size"] == 110


async def test_replace_body_decodes_a_gzip_response(fleet: Fleet) -> None:
    body = gzip.compress(b"hello secret world", mtime=0)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        await writer.drain()
        writer.close()

    await fleet.put_policy(
        [
            rule(
                "hide",
                "~u /gz",
                {"type": "replace_body", "pattern": "secret", "replacement": "******"},
                phase="response",
            )
        ]
    )
    async with raw_server(serve) as port:
        code, out, _err = await run_curl(
            "-s", "-i", "-x", fleet.proxy.url, f"http://127.0.0.1:{port}/gz"
        )
    assert code == 0
    head, got = out.split(b"\r\n\r\n", 1)
    assert got == b"hello ****** world"
    assert b"content-encoding" not in head.lower()


async def test_replace_body_leaves_a_body_over_the_limit_alone(
    fleet: Fleet, upstream: Upstream
) -> None:
    await fleet.put_policy(
        [
            rule(
                "big",
                "~u /bytes/",
                {"type": "replace_body", "pattern": "x", "replacement": "y"},
                phase="response",
            )
        ]
    )
    n = REWRITE_LIMIT + 100_000
    async with fleet.client() as client:
        resp = await client.get(f"{upstream.http}/bytes/{n}")
    assert len(resp.content) == n
    assert resp.content[:10] == b"x" * 10
    event = await fleet.flows.final_for(f"/bytes/{n}")
    assert event["policy"]["matched"][0]["note"] == f"body over {REWRITE_LIMIT} bytes: not applied"
    assert event["response"]["size"] == n


async def test_replace_body_pattern_that_backtracks_gives_up_in_time(
    fleet: Fleet, upstream: Upstream
) -> None:
    await fleet.put_policy(
        [
            rule(
                "redos",
                "~u /echo/",
                {"type": "replace_body", "pattern": "(a|aa)+$", "replacement": "z"},
            )
        ]
    )
    evil = b"a" * 60 + b"!"
    async with fleet.client() as client:
        t0 = time.monotonic()
        resp = await client.post(f"{upstream.http}/echo/redos", content=evil)
        took = time.monotonic() - t0
    assert resp.json()["body"] == evil.decode()
    assert took < 3
    event = await fleet.flows.final_for("/echo/redos")
    assert event["policy"]["matched"][0]["note"] == "pattern timed out: not applied"
