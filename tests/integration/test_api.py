"""The management API end to end: a real NATS of each test's own, real in-process proxy
replicas, a real flow store, and the API in process (ASGI, lifespan running)."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
from typing import Any

import httpx
import pytest

from libs.common.natsserver import EmbeddedNats
from services.store.main import Store
from tests.integration.conftest import MakeProxy
from tests.integration.harness import ProxyUnderTest, Upstream
from tests.unit.test_api_support import (
    ADMIN,
    ADMIN_KEY,
    READ,
    eventually,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def nats_url(restartable_nats: EmbeddedNats) -> str:
    """A NATS of this test's own (config writes and the registry stay inside the test)."""
    return restartable_nats.url


async def status(api: httpx.AsyncClient) -> dict[str, Any]:
    resp = await api.get("/api/proxy/status", headers=READ)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def refuses(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
    return False


async def registered(api: httpx.AsyncClient, *proxies: ProxyUnderTest) -> None:
    """Wait for the replicas' first heartbeat (a replica is in the registry only after it)."""
    want = {p.id for p in proxies}

    async def present() -> bool:
        return want <= {r["id"] for r in (await status(api))["replicas"]}

    await eventually(present, 5.0, f"replicas {sorted(want)} registered")


async def replica_view(api: httpx.AsyncClient, proxy: ProxyUnderTest) -> dict[str, Any]:
    body = await status(api)
    view: dict[str, Any] = next(r for r in body["replicas"] if r["id"] == proxy.id)
    return view


# -- lifecycle ------------------------------------------------------------------------------
async def test_status_reflects_reality(
    api: httpx.AsyncClient, make_proxy: MakeProxy, upstream: Upstream
) -> None:
    assert (await status(api))["state"] == "no_replicas"
    proxy = await make_proxy()
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
        for _ in range(3):
            assert (await client.get(f"{upstream.http}/echo/x")).status_code == 200

        async def counted() -> dict[str, Any] | None:
            body = await status(api)  # the replica may not be listed yet on a busy machine
            view = next((r for r in body["replicas"] if r["id"] == proxy.id), None)
            return view if view is not None and view["flows_total"] == 3 else None

        view = await eventually(counted, 5.0, "3 flows in the registry")
        assert view["state"] == "running" and view["listen"] == proxy.replica.address
        assert view["active_connections"] == 1  # the keep-alive client connection
        assert view["uptime_s"] >= 0 and view["config_error"] is None
    body = await status(api)
    assert body["state"] == "running" and body["totals"]["flows_total"] == 3


async def test_stop_drains_and_refuses_then_start_serves(
    api: httpx.AsyncClient, make_proxy: MakeProxy, upstream: Upstream
) -> None:
    proxy = await make_proxy()
    await registered(api, proxy)
    async with httpx.AsyncClient(proxy=proxy.url, timeout=15) as client:
        in_flight = asyncio.create_task(client.get(f"{upstream.http}/slow?s=1"))

        async def active() -> bool:
            return len(proxy.ctx.active) == 1

        await eventually(active, 5.0, "the slow request in flight")
        resp = await api.post("/api/proxy/stop", json={"deadline": 5}, headers=ADMIN)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["ok"] is True
        assert body["replicas"] == [
            {
                "id": proxy.id,
                "ok": True,
                "state": "stopped",
                "code": None,
                "message": None,
                "aborted": 0,
            }
        ]
        done = await in_flight  # graceful: it was allowed to finish
        assert done.status_code == 200 and done.text == "slow done"
    assert refuses(proxy.port)
    assert (await status(api))["state"] == "stopped"
    assert (await replica_view(api, proxy))["state"] == "stopped"

    resp = await api.post("/api/proxy/start", headers=ADMIN)
    assert resp.status_code == 200 and resp.json()["replicas"][0]["state"] == "running"
    assert (await status(api))["state"] == "running"
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
        assert (await client.get(f"{upstream.http}/echo/again")).status_code == 200


async def test_target_one_of_two_replicas(api: httpx.AsyncClient, make_proxy: MakeProxy) -> None:
    p1 = await make_proxy()
    p2 = await make_proxy()
    await registered(api, p1, p2)
    resp = await api.post("/api/proxy/stop", json={"replica": p2.id, "deadline": 0}, headers=ADMIN)
    assert [r["id"] for r in resp.json()["replicas"]] == [p2.id]
    assert refuses(p2.port) and not refuses(p1.port)
    assert (await status(api))["state"] == "partial"
    resp = await api.post("/api/proxy/start", json={"replica": "nobody"}, headers=ADMIN)
    assert resp.status_code == 404 and resp.json()["code"] == "REPLICA_NOT_FOUND"


# -- config -----------------------------------------------------------------------------------
async def test_config_hot_reload_etag_validation_history(
    api: httpx.AsyncClient, make_proxy: MakeProxy, store: Store, upstream: Upstream
) -> None:
    proxy = await make_proxy()
    await registered(api, proxy)
    current = await api.get("/api/config", headers=READ)
    assert current.headers["etag"] == '"0"'
    document = current.json()["config"]

    resp = await api.put(
        "/api/config",
        json={**document, "capture_body_limit": 10},
        headers={**ADMIN, "If-Match": current.headers["etag"]},
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    rev = body["revision"]
    assert body["applied"] == [proxy.id] and body["pending"] == [] and body["rejected"] == []
    assert resp.headers["etag"] == f'"{rev}"'
    assert proxy.ctx.config.doc.capture_body_limit == 10  # no restart
    assert (await replica_view(api, proxy))["config_revision"] == rev

    # the new limit is what gets recorded
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
        sent = await client.post(f"{upstream.http}/echo/limited", content=b"z" * 100)
        assert sent.status_code == 200
    flow = await _stored_flow(api, path="/echo/limited")
    assert flow["request"]["size"] == 100 and flow["request"]["truncated"] is True
    assert flow["request"]["body"] == "z" * 10

    # a stale If-Match is refused and changes nothing
    stale = await api.put(
        "/api/config",
        json={**document, "capture_body_limit": 20},
        headers={**ADMIN, "If-Match": '"0"'},
    )
    assert stale.status_code == 412 and stale.json()["code"] == "CONFIG_CONFLICT"
    # an invalid document is refused and changes nothing
    bad = await api.put(
        "/api/config", json={**document, "capture_body_limit": "lots"}, headers=ADMIN
    )
    assert bad.status_code == 422 and bad.json()["code"] == "CONFIG_INVALID"
    assert bad.json()["errors"][0]["field"] == "body.capture_body_limit"
    after = await api.get("/api/config", headers=READ)
    assert (
        after.headers["etag"] == f'"{rev}"' and after.json()["config"]["capture_body_limit"] == 10
    )
    assert proxy.ctx.config.doc.capture_body_limit == 10

    second = await api.put(
        "/api/config", json={**document, "capture_body_limit": 2048}, headers=ADMIN
    )
    assert second.json()["applied"] == [proxy.id]
    history = (await api.get("/api/config/history", headers=READ)).json()["revisions"]
    assert [h["revision"] for h in history] == [second.json()["revision"], rev]
    assert [h["config"]["capture_body_limit"] for h in history] == [2048, 10]


async def test_config_round_trip_patch_compare_rollback(
    api: httpx.AsyncClient, make_proxy: MakeProxy
) -> None:
    """A real replica applies every kind of write; compare reads what it runs."""
    proxy = await make_proxy()
    await registered(api, proxy)
    # GET's body, edited, goes straight back; its revision is the precondition
    current = (await api.get("/api/config", headers=READ)).json()
    current["config"]["capture_body_limit"] = 11
    put = await api.put("/api/config", json=current, headers=ADMIN)
    assert put.status_code == 200, put.text
    first = put.json()["revision"]
    assert put.json()["applied"] == [proxy.id] and proxy.ctx.config.doc.capture_body_limit == 11
    replayed = await api.put("/api/config", json=current, headers=ADMIN)  # revision 0: stale
    assert replayed.status_code == 412 and replayed.json()["code"] == "CONFIG_CONFLICT"

    # a merge patch changes one field and keeps the rest
    patch = await api.patch(
        "/api/config",
        content=b'{"ignore_hosts": ["bank.example"]}',
        headers={
            **ADMIN,
            "Content-Type": "application/merge-patch+json",
            "If-Match": f'"{first}"',
        },
    )
    assert patch.status_code == 200, patch.text
    second = patch.json()["revision"]
    assert patch.json()["applied"] == [proxy.id]
    assert proxy.ctx.config.doc.ignore_hosts == ["bank.example"]
    assert proxy.ctx.config.doc.capture_body_limit == 11
    bad = await api.patch("/api/config", json={"ignore_hosts": "bank.example"}, headers=ADMIN)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "body.ignore_hosts"
    assert proxy.ctx.config.revision == second  # the good config stays

    compare = (await api.get("/api/config/compare", headers=READ)).json()
    assert compare["revision"] == second and compare["in_sync"] is True
    (view,) = compare["replicas"]
    assert view["id"] == proxy.id and view["state"] == "applied" and view["revision"] == second
    assert view["differences"] == [] and view["running"]["ignore_hosts"] == ["bank.example"]

    # rollback to the first write: a new revision with the first document, applied
    back = await api.post("/api/config/rollback", json={"revision": first}, headers=ADMIN)
    assert back.status_code == 200, back.text
    third = back.json()["revision"]
    assert third > second and back.json()["applied"] == [proxy.id]
    assert proxy.ctx.config.revision == third and proxy.ctx.config.doc.ignore_hosts == []
    missing = await api.post("/api/config/rollback", json={"revision": 10**9}, headers=ADMIN)
    assert missing.status_code == 404 and missing.json()["code"] == "CONFIG_REVISION_NOT_FOUND"
    for hostile in (0, -1, "1", 10**30):
        resp = await api.post("/api/config/rollback", json={"revision": hostile}, headers=ADMIN)
        assert resp.status_code == 422, (hostile, resp.text)
    history = (await api.get("/api/config/history", headers=READ)).json()["revisions"]
    assert [h["revision"] for h in history] == [third, second, first]
    assert history[0]["config"] == history[2]["config"]

    # one replica's status; an unknown one is a 404, an unknown parameter a 422
    one = await api.get("/api/proxy/status", params={"replica": proxy.id}, headers=READ)
    assert [r["id"] for r in one.json()["replicas"]] == [proxy.id]
    assert one.json()["replicas"][0]["config_revision"] == third
    gone = await api.get("/api/proxy/status", params={"replica": "nope"}, headers=READ)
    assert gone.status_code == 404 and gone.json()["code"] == "REPLICA_NOT_FOUND"
    typo = await api.get("/api/proxy/status", params={"replicas": proxy.id}, headers=READ)
    assert typo.status_code == 422 and typo.json()["errors"][0]["field"] == "query.replicas"


# -- CA -------------------------------------------------------------------------------------
async def test_ca_pem(api: httpx.AsyncClient, make_proxy: MakeProxy) -> None:
    missing = await api.get("/api/ca.pem", headers=READ)
    assert missing.status_code == 404 and missing.json()["code"] == "CA_NOT_AVAILABLE"
    proxy = await make_proxy()
    resp = await api.get("/api/ca.pem", headers=READ)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/x-pem-file"
    assert resp.content == proxy.ca_path.read_bytes()
    assert resp.content.startswith(b"-----BEGIN CERTIFICATE-----")


# -- flows --------------------------------------------------------------------------------------
async def _stored_flow(api: httpx.AsyncClient, **filters: Any) -> dict[str, Any]:
    """The full flow of the first listed match, once the store has its final state."""
    path = filters.pop("path", None)

    async def find() -> dict[str, Any] | None:
        page = (await api.get("/api/flows", params=filters, headers=READ)).json()
        for f in page["flows"]:
            if (path is None or f["path"] == path) and f["state"] != "active":
                got: dict[str, Any] = (await api.get(f"/api/flows/{f['id']}", headers=READ)).json()
                return got
        return None

    found: dict[str, Any] = await eventually(find, 10.0, f"stored flow {path}")
    return found


async def test_flows_end_to_end(
    api: httpx.AsyncClient, make_proxy: MakeProxy, store: Store, upstream: Upstream
) -> None:
    proxy = await make_proxy()
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
        assert (await client.get(f"{upstream.http}/echo/one")).status_code == 200
        posted = await client.post(
            f"{upstream.http}/echo/two",
            content="héllo".encode(),
            headers={"Content-Type": "text/plain"},
        )
        assert posted.status_code == 200
        assert (await client.get(f"{upstream.http}/status/404")).status_code == 404
        assert (await client.get(f"{upstream.http}/bytes/300")).status_code == 200

    async def four() -> list[dict[str, Any]] | None:
        resp = await api.get("/api/flows", params={"replica": proxy.id}, headers=READ)
        flows: list[dict[str, Any]] = resp.json()["flows"]
        done = [f for f in flows if f["state"] == "completed"]
        return flows if len(done) == 4 else None

    flows = await eventually(four, 10.0, "4 completed flows")
    assert [f["path"] for f in flows] == ["/bytes/300", "/status/404", "/echo/two", "/echo/one"]

    # filters
    async def paths(**params: Any) -> list[str]:
        resp = await api.get("/api/flows", params=params, headers=READ)
        assert resp.status_code == 200, resp.text
        return [f["path"] for f in resp.json()["flows"]]

    assert await paths(method="post") == ["/echo/two"]
    assert await paths(status=404) == ["/status/404"]
    assert await paths(min_status=200, max_status=299) == ["/bytes/300", "/echo/two", "/echo/one"]
    assert await paths(host="127.0.0.1", state="completed") == [f["path"] for f in flows]
    assert await paths(host="*.example.com") == []
    assert await paths(since=flows[-1]["started_at"], until=flows[0]["started_at"] + 1) == [
        f["path"] for f in flows
    ]
    assert await paths(since="2999-01-01T00:00:00Z") == []
    assert await paths(path="/echo/") == ["/echo/two", "/echo/one"]

    # the filter language, as mitmproxy users type it, decided by the store
    assert await paths(q="~m post | ~c 404") == ["/status/404", "/echo/two"]
    assert await paths(q="~d 127.0.0.1 & !~c 200") == ["/status/404"]
    assert await paths(q="~u echo/t ~s") == ["/echo/two"]  # juxtaposition is AND
    assert await paths(q="~bq héllo") == ["/echo/two"]  # a body, rechecked in the store
    assert await paths(q="~hq 'content-type: text/plain'", replica=proxy.id) == ["/echo/two"]
    assert await paths(q=f"~replica ^{proxy.id}$ & ~state completed & ~kind http") == [
        f["path"] for f in flows
    ]
    listing = (await api.get("/api/flows", params={"q": "~s", "limit": 2}, headers=READ)).json()
    assert listing["filtered_count"] == 4 and listing["filtered_count_exact"] is True
    body_search = (await api.get("/api/flows", params={"q": "~b x"}, headers=READ)).json()
    assert body_search["scanned"] >= 4 and body_search["partial"] is False
    for q, position in (("~c 404 &", 8), ("(~q)", 1), ("~d [", 0)):
        bad = await api.get("/api/flows", params={"q": q}, headers=READ)
        assert bad.status_code == 422 and bad.json()["code"] == "BAD_FILTER", bad.text
        error = bad.json()["errors"][0]
        assert error["field"] == "query.q" and error["position"] == position
    helped = await api.get("/api/filter-help", params={"q": "~d a & ~c 2"}, headers=READ)
    assert helped.status_code == 200
    assert helped.json()["explain"] == "(domain matches 'a' and response code is 2)"
    assert {"~d regex", "~c int", "~b regex", "!"} <= {
        o["operator"] for o in helped.json()["operators"]
    }

    # pagination
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 1, "replica": proxy.id}
        if cursor:
            params["cursor"] = cursor
        page = (await api.get("/api/flows", params=params, headers=READ)).json()
        seen += [f["path"] for f in page["flows"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f["path"] for f in flows]
    bad = await api.get("/api/flows", params={"cursor": "!!!"}, headers=READ)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "query.cursor"

    # detail: text inline, binary as base64 when not UTF-8, raw bodies
    two = next(f for f in flows if f["path"] == "/echo/two")
    detail = (await api.get(f"/api/flows/{two['id']}", headers=READ)).json()
    assert detail["method"] == "POST" and detail["response"]["status"] == 200
    assert detail["request"]["body"] == "héllo" and detail["request"]["encoding"] == "utf-8"
    assert detail["response"]["encoding"] == "utf-8"
    assert '"body_len": 6' in detail["response"]["body"]
    raw = await api.get(f"/api/flows/{two['id']}/request/body", headers=READ)
    assert raw.content == "héllo".encode() and raw.headers["content-type"] == "text/plain"
    raw = await api.get(f"/api/flows/{two['id']}/response/body", headers=READ)
    assert raw.headers["content-type"].startswith("application/json")
    sized = next(f for f in flows if f["path"] == "/bytes/300")
    raw = await api.get(f"/api/flows/{sized['id']}/response/body", headers=READ)
    assert raw.content == b"x" * 300 and raw.headers["content-type"] == "application/octet-stream"
    missing = await api.get("/api/flows/000000000000000000000000", headers=READ)
    assert missing.status_code == 404 and missing.json()["code"] == "FLOW_NOT_FOUND"


async def test_binary_body_is_base64(
    api: httpx.AsyncClient, make_proxy: MakeProxy, store: Store, upstream: Upstream
) -> None:
    proxy = await make_proxy()
    blob = bytes(range(256))
    async with httpx.AsyncClient(proxy=proxy.url, timeout=10) as client:
        await client.post(f"{upstream.http}/echo/bin", content=blob)
    flow = await _stored_flow(api, path="/echo/bin")
    assert flow["request"]["encoding"] == "base64"
    assert base64.b64decode(flow["request"]["body"]) == blob


async def test_kill_an_active_flow(
    api: httpx.AsyncClient, make_proxy: MakeProxy, upstream: Upstream, store: Store
) -> None:
    other = await make_proxy()  # a second replica that does not hold the flow
    proxy = await make_proxy()
    await registered(api, other, proxy)
    received = 0

    async def drip() -> None:
        nonlocal received
        async with (
            httpx.AsyncClient(proxy=proxy.url, timeout=15) as client,
            client.stream("GET", f"{upstream.http}/drip?s=0.1&n=300") as resp,
        ):
            async for chunk in resp.aiter_bytes():
                received += len(chunk)

    task = asyncio.create_task(drip())
    try:

        async def active() -> list[str]:
            return list(proxy.ctx.active)

        (flow_id,) = await eventually(active, 5.0, "the drip flow active")
        resp = await api.delete(f"/api/flows/{flow_id}", headers=ADMIN)
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"killed": True, "id": flow_id, "replica": proxy.id}
        with pytest.raises(httpx.TransportError):
            await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
    assert received < 300

    async def recorded_killed() -> bool:
        resp = await api.get(f"/api/flows/{flow_id}", headers=READ)
        return resp.status_code == 200 and resp.json()["state"] == "killed"

    await eventually(recorded_killed, 10.0, "the store records the kill")
    again = await api.delete(f"/api/flows/{flow_id}", headers=ADMIN)
    assert again.status_code == 409 and again.json()["code"] == "FLOW_NOT_ACTIVE"
    unknown = await api.delete("/api/flows/ffffffffffff000000000000", headers=ADMIN)
    assert unknown.status_code == 404 and unknown.json()["code"] == "FLOW_NOT_FOUND"


# -- auth on every route ----------------------------------------------------------------------
def _operations(schema: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(method, path, whether it answers with an SSE stream) of every operation."""
    ops = []
    for path, item in schema["paths"].items():
        for method, op in item.items():
            content = op.get("responses", {}).get("200", {}).get("content", {})
            concrete = re.sub(r"\{[^}]+\}", "0123abcd", path)
            ops.append((method.upper(), concrete, "text/event-stream" in content))
    return ops


async def test_every_route_needs_the_right_key(
    api: httpx.AsyncClient, make_proxy: MakeProxy
) -> None:
    await registered(api, await make_proxy())
    schema = (await api.get("/api/openapi.json", headers=READ)).json()
    operations = _operations(schema)
    assert len(operations) >= 14
    wrong: list[dict[str, str]] = [
        {},
        {"X-API-Key": "not-a-key"},
        {"Authorization": "Bearer not-a-key"},
        {"X-API-Key": ADMIN_KEY[:-1]},
    ]
    open_routes = {("GET", "/healthz"), ("GET", "/readyz")}
    checked = 0
    for method, path, stream in operations:
        if (method, path) in open_routes:
            resp = await api.request(method, path)
            assert resp.status_code == 200, (method, path)
            continue
        assert path.startswith("/api/"), f"{method} {path} is outside /api"
        for headers in wrong:
            resp = await api.request(method, path, headers=headers)
            assert resp.status_code == 401, (method, path, headers, resp.text)
            assert resp.json()["code"] == "AUTH_REQUIRED"
        reader = dict(READ)
        if stream:  # an SSE stream never ends: a bad id ends it at once
            reader["Last-Event-ID"] = "not-an-id"
        as_reader = await api.request(method, path, headers=reader, json=_harmless(method, path))
        if method == "GET":
            assert as_reader.status_code not in (401, 403), (method, path)
        else:
            assert as_reader.status_code == 403, (method, path)
            assert as_reader.json()["code"] == "AUTH_FORBIDDEN"
            as_admin = await api.request(method, path, headers=ADMIN, json=_harmless(method, path))
            assert as_admin.status_code not in (401, 403), (method, path)
        checked += 1
    assert checked == len(operations) - len(open_routes)


def _harmless(method: str, path: str) -> Any:
    """A body that does no lasting damage when an admin request goes through."""
    if path == "/api/proxy/stop":
        return {"replica": "not-registered"}  # 404: nothing is stopped
    if path == "/api/proxy/start":
        return {}
    if path == "/api/config" and method in ("PUT", "PATCH"):
        return {"capture_body_limit": -1}  # 422: nothing is written
    if path == "/api/config/rollback":
        return {"revision": 0}  # 422: nothing is written
    return None
