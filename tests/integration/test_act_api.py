"""Acting on traffic through the REST API, end to end: a real NATS of each test's own,
real in-process proxy replicas and flow store, the API in process, real clients and
upstreams. Rules written over REST meet curl; an intercepted request is approved,
modified and denied over REST while its client waits; a held flow is killed; recorded
flows are replayed; a policy a replica cannot apply is reported.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from libs.common import subjects
from libs.common.bus import Bus
from libs.common.natsserver import EmbeddedNats
from services.store.main import Store
from tests.integration.conftest import MakeProxy
from tests.integration.harness import ProxyUnderTest, RawClient, Upstream, run_curl
from tests.unit.test_api_support import ADMIN, READ, api_client, api_settings, eventually

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def nats_url(restartable_nats: EmbeddedNats) -> str:
    """A NATS of this test's own: the policy bucket is shared by every replica on it."""
    return restartable_nats.url


async def running(api: httpx.AsyncClient, proxy: ProxyUnderTest) -> None:
    async def present() -> bool:
        status = (await api.get("/api/proxy/status", headers=READ)).json()
        return any(r["id"] == proxy.id for r in status["replicas"])

    await eventually(present, 5.0, "replica registered")


async def stored(api: httpx.AsyncClient, flow_id: str) -> dict[str, Any]:
    async def final() -> dict[str, Any] | None:
        resp = await api.get(f"/api/flows/{flow_id}", headers=READ)
        if resp.status_code == 200 and resp.json()["state"] != "active":
            flow: dict[str, Any] = resp.json()
            return flow
        return None

    found: dict[str, Any] = await eventually(final, 10.0, f"flow {flow_id} stored")
    return found


async def listed(api: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    page = (await api.get("/api/flows", params=params, headers=READ)).json()
    flows: list[dict[str, Any]] = page["flows"]
    return flows


async def pending_list(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    async def some() -> list[dict[str, Any]] | None:
        got = (await api.get("/api/approvals/pending/list", headers=READ)).json()["pending"]
        return got or None

    found: list[dict[str, Any]] = await eventually(some, 5.0, "a pending approval")
    return found


def rule(rule_id: str, flt: str, action: dict[str, Any], phase: str = "request") -> dict[str, Any]:
    return {"id": rule_id, "match": {"filter": flt, "phase": phase}, "action": action}


async def test_rules_written_over_rest_act_on_curl_and_are_recorded(
    api: httpx.AsyncClient, make_proxy: MakeProxy, store: Store, upstream: Upstream
) -> None:
    proxy = await make_proxy()
    await running(api, proxy)
    put = await api.put(
        "/api/policy",
        json={
            "rules": [
                rule("deny-admin", "~u /admin", {"type": "block", "status": 403, "body": "no"}),
                rule("mark", "~u /echo/", {"type": "set_headers", "headers": [["X-Seen", "1"]]}),
            ]
        },
        headers=ADMIN,
    )
    assert put.status_code == 200, put.text
    assert put.json()["applied"] == [proxy.id]
    revision = put.json()["revision"]
    added = await api.post(
        "/api/policy/rules",
        json=rule("tagit", "~u /echo/", {"type": "tag", "tags": ["api"]}),
        headers=ADMIN,
    )
    assert added.status_code == 201, added.text
    assert added.json()["applied"] == [proxy.id]

    code, out, _ = await run_curl("-s", "-i", "-x", proxy.url, f"{upstream.http}/admin/x")
    assert code == 0 and out.startswith(b"HTTP/1.1 403") and out.endswith(b"no")
    code, out, _ = await run_curl("-s", "-x", proxy.url, f"{upstream.http}/echo/x")
    headers = {k.lower(): v for k, v in orjson.loads(out)["headers"]}
    assert headers["x-seen"] == "1"

    [blocked] = await eventually(lambda: listed(api, path="/admin/x"), 10.0, "blocked flow")
    flow = await stored(api, blocked["id"])
    assert flow["policy"]["revision"] == added.json()["revision"] == revision + 1
    assert [(m["rule"], m["action"]) for m in flow["policy"]["matched"]] == [
        ("deny-admin", "block")
    ]
    [echoed] = await eventually(lambda: listed(api, path="/echo/x"), 10.0, "echo flow")
    flow = await stored(api, echoed["id"])
    assert flow["tags"] == ["api"]
    assert flow["policy"]["revision"] == added.json()["revision"]

    deleted = await api.delete("/api/policy/rules/deny-admin", headers=ADMIN)
    assert deleted.status_code == 204

    async def unblocked() -> bool:
        _code, out, _ = await run_curl("-s", "-i", "-x", proxy.url, f"{upstream.http}/admin/y")
        return out.startswith(b"HTTP/1.1 404")  # the upstream's own answer

    await eventually(unblocked, 5.0, "rule removed on the replica")


async def test_a_policy_a_replica_cannot_apply_is_reported_and_the_last_good_kept(
    api: httpx.AsyncClient, make_proxy: MakeProxy, nats_url: str, upstream: Upstream
) -> None:
    proxy = await make_proxy()
    await running(api, proxy)
    good = await api.put(
        "/api/policy",
        json={"rules": [rule("g", "~u /echo/", {"type": "tag", "tags": ["good"]})]},
        headers=ADMIN,
    )
    assert good.json()["applied"] == [proxy.id]
    # a writer that skips the API's validation (an older API, a hand-edited bucket)
    bus = await Bus.connect(nats_url, "test", 5)
    try:
        kv = await bus.policy_kv()
        bad = await kv.put(subjects.POLICY_KEY, b'{"rules": [{"id": "x"}]}')
    finally:
        await bus.close()

    async def reported() -> dict[str, Any] | None:
        status = (await api.get("/api/proxy/status", headers=READ)).json()
        [replica] = status["replicas"]
        return replica if replica.get("policy_error") else None

    replica = await eventually(reported, 5.0, "policy_error in the status")
    assert replica["policy_error"].startswith(f"revision {bad} rejected: ")
    assert replica["policy_revision"] == good.json()["revision"]
    events = (await api.get("/api/events", params={"type": "policy_rejected"}, headers=READ)).json()
    [event] = [e for e in events["events"] if e["type"] == "policy_rejected"]
    assert event["data"]["kept_revision"] == good.json()["revision"]
    assert event["severity"] == "warning"
    # the last good revision still acts
    assert proxy.ctx.policy.revision == good.json()["revision"]


async def test_an_intercepted_request_is_approved_modified_and_denied_over_rest(
    api: httpx.AsyncClient, make_proxy: MakeProxy, store: Store, upstream: Upstream
) -> None:
    proxy = await make_proxy()
    await running(api, proxy)
    resp = await api.put(
        "/api/policy",
        json={"rules": [rule("review", "~u /echo/pay", {"type": "intercept", "timeout_s": 30})]},
        headers=ADMIN,
    )
    assert resp.json()["applied"] == [proxy.id]
    async with httpx.AsyncClient(proxy=proxy.url, timeout=20) as client:
        # approve (and cache): the client, waiting all along, gets the upstream's answer
        call = asyncio.create_task(client.post(f"{upstream.http}/echo/pay", content=b"5 EUR"))
        [held] = await pending_list(api)
        assert not call.done()
        assert held["request"]["method"] == "POST"
        decided = await api.post(f"/api/approvals/pending/{held['id']}/approve", headers=ADMIN)
        assert decided.status_code == 200, decided.text
        first = await call
        assert first.status_code == 200 and first.json()["body"] == "5 EUR"
        again = await api.post(f"/api/approvals/pending/{held['id']}/deny", headers=ADMIN)
        assert again.status_code == 409
        cached = (await api.get("/api/approvals/cached", headers=READ)).json()
        assert [e["rule"] for e in cached["cached"]] == ["review"]

        # cached (once the replica has seen the entry): the same request passes unheld
        async def cached_there() -> bool:
            return bool(proxy.ctx.intercepts.cache)

        await eventually(cached_there, 5.0, "cached approval on the replica")
        t0 = time.monotonic()
        second = await client.post(f"{upstream.http}/echo/pay", content=b"6 EUR")
        assert second.status_code == 200 and time.monotonic() - t0 < 5
        assert (await api.delete("/api/approvals/cached", headers=ADMIN)).status_code == 204

        async def uncached() -> bool:
            return not proxy.ctx.intercepts.cache

        await eventually(uncached, 5.0, "cache purged on the replica")

        # modify: the upstream sees the edited request
        call = asyncio.create_task(client.post(f"{upstream.http}/echo/pay", content=b"7 EUR"))
        [held] = await pending_list(api)
        modified = await api.post(
            f"/api/approvals/pending/{held['id']}/modify",
            json={"request": {"body": "1 EUR", "url": f"{upstream.http}/echo/pay/reviewed"}},
            headers=ADMIN,
        )
        assert modified.status_code == 200, modified.text
        third = await call
        assert third.json()["body"] == "1 EUR"
        assert third.json()["path"] == "/echo/pay/reviewed"

        # deny: the client gets the operator's answer, nothing goes upstream
        call = asyncio.create_task(client.post(f"{upstream.http}/echo/pay", content=b"8 EUR"))
        [held] = await pending_list(api)
        denied = await api.post(
            f"/api/approvals/pending/{held['id']}/deny",
            json={"status": 402, "body": "declined"},
            headers=ADMIN,
        )
        assert denied.status_code == 200, denied.text
        fourth = await call
        assert (fourth.status_code, fourth.text) == (402, "declined")

    flows = await eventually(
        lambda: _all_final(api, "/echo/pay"), 10.0, "the intercepted flows stored"
    )
    outcomes = sorted(f["intercept"]["outcome"] for f in flows)
    assert outcomes == ["approved", "cached", "denied"]
    approved = next(f for f in flows if f["intercept"]["outcome"] == "approved")
    assert approved["intercept"]["by"] == "ops"  # the deciding key's id, never the key
    [reviewed] = await eventually(lambda: _all_final(api, "/echo/pay/reviewed"), 10.0, "modified")
    assert reviewed["intercept"]["modified"] == ["url", "body"]


async def _all_final(api: httpx.AsyncClient, path: str) -> list[dict[str, Any]] | None:
    found = [f for f in await listed(api, path=path) if f["path"] == path]
    if not found or any(f["state"] == "active" for f in found):
        return None
    return [await stored(api, f["id"]) for f in found]


async def test_killing_a_held_flow_over_rest_cuts_its_client_at_once(
    api: httpx.AsyncClient,
    make_proxy: MakeProxy,
    store: Store,
    upstream: Upstream,
    nats_url: str,
    tmp_path: Path,
) -> None:
    proxy = await make_proxy()
    await running(api, proxy)
    await api.put(
        "/api/policy",
        json={"rules": [rule("review", "~u /echo/hold", {"type": "intercept"})]},
        headers=ADMIN,
    )
    async with await RawClient.connect(proxy.port) as client:
        await client.send(f"GET {upstream.http}/echo/hold HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        [held] = await pending_list(api)
        # the API keeps nothing: another API process (a restarted one) sees the same
        settings = api_settings(nats_url, tmp_path / "api-2")
        async with api_client(settings) as restarted:
            assert [p["id"] for p in await pending_list(restarted)] == [held["id"]]
        t0 = time.monotonic()
        killed = await api.delete(f"/api/flows/{held['flow_id']}", headers=ADMIN)
        assert killed.status_code == 200, killed.text
        assert await client.read_until_eof(timeout=3) == b""
        assert time.monotonic() - t0 < 1.0
    late = await api.post(f"/api/approvals/pending/{held['id']}/approve", headers=ADMIN)
    assert late.status_code == 409
    flow = await stored(api, held["flow_id"])
    assert flow["state"] == "killed"
    assert flow["intercept"]["outcome"] == "killed"
    assert (await api.get("/api/approvals/pending/list", headers=READ)).json()["pending"] == []


async def test_replay_records_a_new_flow_and_refuses_what_it_cannot_send(
    api: httpx.AsyncClient,
    make_proxy: MakeProxy,
    store: Store,
    upstream: Upstream,
    restartable_nats: EmbeddedNats,
) -> None:
    proxy = await make_proxy()
    await running(api, proxy)
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
        await client.post(
            f"{upstream.http}/echo/orig?a=1",
            content=b"payload",
            headers={"X-Trace": "t1", "Authorization": "Bearer secret"},
        )
    [orig] = await eventually(lambda: listed(api, path="/echo/orig"), 10.0, "original stored")
    await stored(api, orig["id"])

    replayed = await api.post(f"/api/flows/{orig['id']}/replay", headers=ADMIN)
    assert replayed.status_code == 201, replayed.text
    new_id = replayed.json()["flow_id"]
    assert replayed.json()["replay_of"] == orig["id"]
    assert replayed.json()["replica"] == proxy.id
    flow = await stored(api, new_id)
    assert flow["replay_of"] == orig["id"]
    assert flow["method"] == "POST"
    assert flow["path"] == "/echo/orig?a=1"
    assert flow["response"]["status"] == 200
    sent = {k.lower(): v for k, v in flow["request"]["headers"]}
    assert sent["x-trace"] == "t1"
    assert "authorization" not in sent  # the secret was never stored: not sent as a mask
    marked = await listed(api, q="~replay")
    assert [f["id"] for f in marked] == [new_id]

    edited = await api.post(
        f"/api/flows/{orig['id']}/replay",
        json={"method": "PUT", "body": "changed", "headers": [["X-Edit", "yes"]]},
        headers=ADMIN,
    )
    assert edited.status_code == 201, edited.text
    flow = await stored(api, edited.json()["flow_id"])
    assert flow["method"] == "PUT"
    assert {k.lower(): v for k, v in flow["request"]["headers"]}.get("x-edit") == "yes"

    # a replay is no way around the destination policy: the fleet's own NATS stays refused
    nats_port = int(restartable_nats.url.rsplit(":", 1)[1])
    evil = await api.post(
        f"/api/flows/{orig['id']}/replay",
        json={"url": f"http://127.0.0.1:{nats_port}/"},
        headers=ADMIN,
    )
    assert evil.status_code == 201
    refused = await stored(api, evil.json()["flow_id"])
    assert refused["state"] == "error"
    assert refused["response"]["status"] == 403

    # hostile or impossible edits: 422 naming the field
    for body, field in (
        ({"url": "ftp://x/"}, "body.url"),
        ({"url": "http://a b/"}, "body.url"),
        ({"method": "GE T"}, "body.method"),
        ({"headers": [["X-A", "a\r\nInjected: 1"]]}, "body.headers"),
        ({"body_b64": "***"}, "body.body_b64"),
        ({"unknown": 1}, "body.unknown"),
    ):
        resp = await api.post(f"/api/flows/{orig['id']}/replay", json=body, headers=ADMIN)
        assert resp.status_code == 422, (body, resp.text)
        assert resp.json()["errors"][0]["field"].startswith(field), (body, resp.json())
    assert (await api.post("/api/flows/nope/replay", headers=ADMIN)).status_code == 404
    assert (await api.post(f"/api/flows/{orig['id']}/replay", headers=READ)).status_code == 403


async def test_a_truncated_body_is_replayed_only_when_supplied(
    api: httpx.AsyncClient, make_proxy: MakeProxy, store: Store, upstream: Upstream
) -> None:
    proxy = await make_proxy(capture_body_limit=4)
    await running(api, proxy)
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
        await client.post(f"{upstream.http}/echo/big", content=b"0123456789")
    [orig] = await eventually(lambda: listed(api, path="/echo/big"), 10.0, "stored")
    await stored(api, orig["id"])
    refused = await api.post(f"/api/flows/{orig['id']}/replay", headers=ADMIN)
    assert refused.status_code == 422
    assert refused.json()["code"] == "REPLAY_BODY_TRUNCATED"
    assert refused.json()["errors"][0]["field"] == "body.body"
    supplied = await api.post(
        f"/api/flows/{orig['id']}/replay", json={"body": "0123456789"}, headers=ADMIN
    )
    assert supplied.status_code == 201
    flow = await stored(api, supplied.json()["flow_id"])
    assert flow["request"]["size"] == 10
