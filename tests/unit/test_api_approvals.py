"""``/api/approvals`` against fake replicas that hold exchanges (a registry entry and a
responder to ``intercepts`` / ``decide`` as ``libs.common.approvals`` says), on a real
NATS of the test's own; the SSE stream on a real uvicorn server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.errors
import orjson
import pytest
from nats.js.errors import KeyNotFoundError

from libs.common import events, subjects
from libs.common.approvals import (
    CachedApproval,
    Decision,
    HeldRequest,
    HeldResponse,
    PendingApproval,
    approval_id,
    cache_key,
)
from libs.common.bus import Bus, barrier
from libs.common.models import CommandReply
from libs.common.natsserver import EmbeddedNats
from services.api.routes.approvals import MAX_DECISION_BODY
from tests.integration.sse import serve_api, sse
from tests.unit.test_api_support import (
    ADMIN,
    READ,
    FakeReplica,
    api_client,
    api_settings,
    eventually,
    replica_status,
)

pytestmark = pytest.mark.timeout(60)

URL = "https://api.example.com/v1/pay?session=abc#frag"


@pytest.fixture
def nats_url(restartable_nats: EmbeddedNats) -> str:
    return restartable_nats.url


@pytest.fixture
async def client(nats_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = api_settings(nats_url, tmp_path, api_command_timeout=0.7, api_approval_ttl=900)
    async with api_client(settings) as c:
        yield c


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    b = await Bus.connect(nats_url, "approvals-test", 5.0)
    yield b
    await b.close()


def held(
    replica: str,
    flow: str,
    phase: str = "request",
    created: float | None = None,
    rule: str = "hold-pay",
) -> PendingApproval:
    now = created if created is not None else time.time()
    return PendingApproval(
        id=approval_id(flow, phase),  # type: ignore[arg-type]
        flow_id=flow,
        replica=replica,
        phase=phase,  # type: ignore[arg-type]
        rule=rule,
        created_at=now,
        expires_at=now + 60,
        timeout_s=60,
        on_timeout="deny",
        request=HeldRequest(
            method="post", url=URL, headers=[("content-type", "application/json")], body_size=2
        ),
        response=None
        if phase == "request"
        else HeldResponse(status=200, reason="OK", headers=[("content-type", "text/plain")]),
    )


class Holder:
    """A fake replica that holds ``pending`` and answers the approvals verbs."""

    def __init__(self, name: str, pending: list[PendingApproval], silent: bool = False) -> None:
        self.name = name
        self.pending = {p.id: p for p in pending}
        self.resolved: set[str] = set()
        self.decisions: list[Decision] = []
        self.silent = silent
        self.refuse: dict[str, str] = {}  # approval id -> the code to refuse it with
        self.verbs = ("intercepts", "decide")  # an older replica knows neither
        self.replica: FakeReplica | None = None

    def answer(self, verb: str, body: dict[str, Any]) -> CommandReply | None:
        if self.silent:
            return None
        if verb == "intercepts" and verb in self.verbs:
            items = [p.model_dump(mode="json") for p in self.pending.values()]
            return CommandReply(replica=self.name, ok=True, data={"pending": items})
        if verb not in self.verbs:
            return CommandReply(replica=self.name, ok=False, code="UNKNOWN_COMMAND")
        decision = Decision.model_validate(body)  # what the API sent fits the contract
        self.decisions.append(decision)
        if decision.id in self.refuse:
            code = self.refuse[decision.id]
            return CommandReply(replica=self.name, ok=False, code=code, message="refused here")
        if decision.id in self.pending:
            approval = self.pending.pop(decision.id)
            self.resolved.add(decision.id)
            return CommandReply(
                replica=self.name, ok=True, data={"approval": approval.model_dump(mode="json")}
            )
        if decision.id in self.resolved:
            return CommandReply(replica=self.name, ok=False, code="APPROVAL_DECIDED")
        return CommandReply(replica=self.name, ok=False, code="APPROVAL_NOT_FOUND")

    async def start(self, nats_url: str) -> Holder:
        self.replica = await FakeReplica(replica_status(self.name), self.answer).start(nats_url)
        return self

    async def stop(self) -> None:
        if self.replica is not None:
            await self.replica.stop()


@pytest.fixture
async def holders() -> AsyncIterator[list[Holder]]:
    made: list[Holder] = []
    yield made
    for h in made:
        await h.stop()


async def hold(
    holders: list[Holder], nats_url: str, name: str, *pending: PendingApproval, **kw: Any
) -> Holder:
    h = await Holder(name, list(pending), **kw).start(nats_url)
    holders.append(h)
    return h


# -- the pending list ---------------------------------------------------------------------------
async def test_list_gathers_every_replica_oldest_first(
    client: httpx.AsyncClient, holders: list[Holder], nats_url: str
) -> None:
    assert (await client.get("/api/approvals/pending/list", headers=READ)).json() == {
        "pending": [],
        "missing": [],
    }
    t = time.time() - 30
    await hold(
        holders, nats_url, "r1", held("r1", "f3", created=t + 3), held("r1", "f1", created=t)
    )
    await hold(holders, nats_url, "r2", held("r2", "f2", "response", created=t + 1))
    resp = await client.get("/api/approvals/pending/list", headers=READ)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [(p["id"], p["replica"]) for p in body["pending"]] == [
        ("f1-request", "r1"),
        ("f2-response", "r2"),
        ("f3-request", "r1"),
    ]
    assert body["missing"] == []
    assert body["pending"][1]["response"]["status"] == 200
    assert PendingApproval.model_validate(body["pending"][0]) == holders[0].pending["f1-request"]
    # a registered replica that does not answer: named, the others still listed
    await hold(holders, nats_url, "r3", held("r3", "f9"), silent=True)
    body = (await client.get("/api/approvals/pending/list", headers=READ)).json()
    assert len(body["pending"]) == 3 and body["missing"] == ["r3"]
    unknown = await client.get("/api/approvals/pending/list?replica=r1", headers=READ)
    assert unknown.status_code == 422 and unknown.json()["errors"][0]["field"] == "query.replica"


# -- decisions ----------------------------------------------------------------------------------
async def test_each_decision_sends_its_decision_to_the_holder(
    client: httpx.AsyncClient, holders: list[Holder], nats_url: str
) -> None:
    other = await hold(holders, nats_url, "other")
    h = await hold(
        holders,
        nats_url,
        "holder",
        held("holder", "a1"),
        held("holder", "d1"),
        held("holder", "m1"),
        held("holder", "m2", "response"),
    )
    resp = await client.post("/api/approvals/pending/a1-request/allow-once", headers=ADMIN)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"] == "a1-request" and body["decision"] == "allow_once"
    assert body["replica"] == "holder" and body["approval"]["flow_id"] == "a1"
    assert body["cached"] is None

    resp = await client.post(
        "/api/approvals/pending/d1-request/deny",
        json={"status": 451, "body": "not today"},
        headers=ADMIN,
    )
    assert resp.status_code == 200 and resp.json()["decision"] == "deny", resp.text

    edit = {
        "method": "PUT",
        "url": "https://api.example.com/v2/pay",
        "headers": [["X-Reviewed", "yes"]],
        "body": "{}",
    }
    resp = await client.post(
        "/api/approvals/pending/m1-request/modify", json={"request": edit}, headers=ADMIN
    )
    assert resp.status_code == 200 and resp.json()["decision"] == "modify", resp.text
    resp = await client.post(
        "/api/approvals/pending/m2-response/modify",
        json={"response": {"status": 202, "body": "edited"}},
        headers=ADMIN,
    )
    assert resp.status_code == 200, resp.text

    sent = [d.model_dump(exclude_none=True) for d in h.decisions]
    assert sent == [
        {"id": "a1-request", "decision": "allow_once", "by": "ops"},
        {"id": "d1-request", "decision": "deny", "by": "ops", "status": 451, "body": "not today"},
        {
            "id": "m1-request",
            "decision": "modify",
            "by": "ops",
            "request": {
                "method": "PUT",
                "url": "https://api.example.com/v2/pay",
                "headers": [("X-Reviewed", "yes")],
                "body": "{}",
            },
        },
        {
            "id": "m2-response",
            "decision": "modify",
            "by": "ops",
            "response": {"status": 202, "body": "edited"},
        },
    ]
    # a broadcast: every replica saw every decision, only the holder acted on it
    assert [d.id for d in other.decisions] == [d.id for d in h.decisions]
    assert h.pending == {}


async def test_unknown_decided_and_no_replica(
    client: httpx.AsyncClient, holders: list[Holder], nats_url: str
) -> None:
    resp = await client.post("/api/approvals/pending/f1-request/allow-once", headers=ADMIN)
    assert resp.status_code == 404 and resp.json()["code"] == "APPROVAL_NOT_FOUND"
    assert "no proxy replica" in resp.json()["detail"]
    assert resp.headers["content-type"] == "application/problem+json"

    await hold(holders, nats_url, "r1", held("r1", "f1"))
    await hold(holders, nats_url, "r2")
    resp = await client.post("/api/approvals/pending/nope-request/deny", headers=ADMIN)
    assert resp.status_code == 404 and resp.json()["code"] == "APPROVAL_NOT_FOUND"
    assert resp.json()["title"] == "Pending approval not found"

    first = await client.post("/api/approvals/pending/f1-request/deny", headers=ADMIN)
    assert first.status_code == 200, first.text
    for verb in ("deny", "allow-once", "approve"):
        again = await client.post(f"/api/approvals/pending/f1-request/{verb}", headers=ADMIN)
        assert again.status_code == 409, again.text
        assert again.json()["code"] == "APPROVAL_ALREADY_DECIDED"


async def test_a_silent_replica_may_hold_it(
    client: httpx.AsyncClient, holders: list[Holder], nats_url: str
) -> None:
    await hold(holders, nats_url, "talks")
    await hold(holders, nats_url, "mute", held("mute", "f1"), silent=True)
    resp = await client.post("/api/approvals/pending/f1-request/allow-once", headers=ADMIN)
    assert resp.status_code == 503 and resp.json()["code"] == "NO_REPLICAS"
    assert "mute" in resp.json()["detail"]


async def test_refusals_and_failures_of_the_holder(
    client: httpx.AsyncClient, holders: list[Holder], nats_url: str
) -> None:
    old = await hold(holders, nats_url, "old")
    old.verbs = ()  # knows neither verb: it cannot hold anything, it is not a failure
    h = await hold(holders, nats_url, "r1", held("r1", "f1"), held("r1", "f2"))
    resp = await client.post("/api/approvals/pending/f0-request/allow-once", headers=ADMIN)
    assert resp.status_code == 404 and resp.json()["code"] == "APPROVAL_NOT_FOUND"
    body = (await client.get("/api/approvals/pending/list", headers=READ)).json()
    assert [p["id"] for p in body["pending"]] == ["f1-request", "f2-request"]
    assert body["missing"] == ["old"]
    h.refuse = {"f1-request": "APPROVAL_INVALID", "f2-request": "BAD_COMMAND"}
    resp = await client.post(
        "/api/approvals/pending/f1-request/modify",
        json={"request": {"url": "https://a.example/"}},
        headers=ADMIN,
    )
    assert resp.status_code == 422 and resp.json()["code"] == "DECISION_REFUSED"
    assert "APPROVAL_INVALID" in resp.json()["detail"]
    resp = await client.post("/api/approvals/pending/f2-request/deny", headers=ADMIN)
    assert resp.status_code == 502 and resp.json()["code"] == "REPLICA_ERROR"
    assert "BAD_COMMAND" in resp.json()["detail"]
    h.refuse = {}
    resp = await client.post("/api/approvals/pending/f2-request/deny", headers=ADMIN)
    assert resp.status_code == 200 and resp.json()["replica"] == "r1"


async def test_modify_must_fit_the_phase(
    client: httpx.AsyncClient, holders: list[Holder], nats_url: str
) -> None:
    h = await hold(holders, nats_url, "r1", held("r1", "f1", "response"), held("r1", "f2"))
    resp = await client.post(
        "/api/approvals/pending/f1-response/modify",
        json={"request": {"method": "GET"}},
        headers=ADMIN,
    )
    assert resp.status_code == 422 and resp.json()["code"] == "APPROVAL_PHASE_MISMATCH"
    assert [e["field"] for e in resp.json()["errors"]] == ["body.request"]
    resp = await client.post(
        "/api/approvals/pending/f2-request/modify",
        json={"response": {"status": 500}},
        headers=ADMIN,
    )
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "body.response"
    assert h.decisions == []  # refused before asking
    # an id that does not name its phase: the replica refuses, the API maps it
    h.pending["custom"] = held("r1", "f3")
    h.refuse["custom"] = "APPROVAL_PHASE_MISMATCH"
    resp = await client.post(
        "/api/approvals/pending/custom/modify", json={"request": {"body": "x"}}, headers=ADMIN
    )
    assert resp.status_code == 422 and resp.json()["code"] == "APPROVAL_PHASE_MISMATCH"
    assert "refused here" in resp.json()["detail"] and [d.id for d in h.decisions] == ["custom"]


async def test_hostile_input_never_reaches_a_replica(
    client: httpx.AsyncClient, holders: list[Holder], nats_url: str
) -> None:
    h = await hold(holders, nats_url, "r1", held("r1", "f1"))
    base = "/api/approvals/pending"
    for bad in ("x" * 129, "a.b", "a%20b", "a%0d%0aX-Injected:%201", "%2e%2e", "f1-request%00"):
        resp = await client.post(f"{base}/{bad}/allow-once", headers=ADMIN)
        assert resp.status_code in (404, 422), (bad, resp.status_code)
        if resp.status_code == 422:
            assert resp.json()["errors"][0]["field"] == "path.approval_id", bad
    resp = await client.post(f"{base}/{'x' * 129}/deny", headers=ADMIN)
    assert resp.status_code == 422 and resp.json()["code"] == "VALIDATION_ERROR"
    assert (await client.post(f"{base}/{'x' * 128}/deny", headers=ADMIN)).status_code == 404
    h.decisions.clear()

    def modify(body: Any) -> Any:
        return client.post(f"{base}/f1-request/modify", json=body, headers=ADMIN)

    cases: list[tuple[Any, str]] = [
        ({"request": {"headers": [["X-A\r\nX-Injected", "1"]]}}, "body.request.headers"),
        ({"request": {"headers": [["X-A", "1\r\nX-Injected: 1"]]}}, "body.request.headers"),
        ({"request": {"headers": [["X-A", "nul\x00"]]}}, "body.request.headers"),
        ({"request": {"headers": [["X-A: 1", "1"]]}}, "body.request.headers"),
        ({"response": {"headers": [["X-A", "caf\u00e9\u2603"]]}}, "body.response.headers"),
        ({"request": {"headers": [["X-A", "v" * 9000]]}}, "body.request.headers.0.1"),
        ({"request": {"headers": [["X-A", "1"]] * 201}}, "body.request.headers"),
        ({"request": {"method": "GET /x HTTP/1.1\r\n"}}, "body.request.method"),
        ({"request": {"url": "javascript:alert(1)"}}, "body.request.url"),
        ({"request": {"url": "https://a.example/\r\nX: 1"}}, "body.request.url"),
        ({"request": {"url": "/relative"}}, "body.request.url"),
        ({"request": {"body": "x" * (64 * 1024 + 1)}}, "body.request.body"),
        ({"request": {}}, "body.request"),
        ({"request": {"method": "GET", "verb": "x"}}, "body.request.verb"),
        ({"request": {"method": "GET"}, "response": {"status": 200}}, "body"),
        ({}, "body"),
        ({"request": {"method": "GET"}, "extra": 1}, "body.extra"),
        (["request"], "body"),
    ]
    for body, field in cases:
        resp = await modify(body)
        assert resp.status_code == 422, (body, resp.text)
        fields = [e["field"] for e in resp.json()["errors"]]
        assert field in fields, (body, fields)
    resp = await client.post(f"{base}/f1-request/modify", content=b"{not json", headers=ADMIN)
    assert resp.status_code == 422 and resp.json()["errors"][0]["type"] == "json_invalid"
    resp = await client.post(f"{base}/f1-request/modify", headers=ADMIN)
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "body"
    for verb, body, field in [
        ("approve", {"ttl_s": 0}, "body.ttl_s"),
        ("approve", {"ttl_s": 7 * 86400 + 1}, "body.ttl_s"),
        ("approve", {"ttl": 60}, "body.ttl"),
        ("allow-once", {"why": "because"}, "body.why"),
        ("deny", {"status": 99}, "body.status"),
        ("deny", {"body": "x" * (64 * 1024 + 1)}, "body.body"),
        ("deny", {"status": 403, "headers": []}, "body.headers"),
    ]:
        resp = await client.post(f"{base}/f1-request/{verb}", json=body, headers=ADMIN)
        assert resp.status_code == 422, (verb, body, resp.text)
        assert [e["field"] for e in resp.json()["errors"]] == [field], (verb, body)
    huge = b'{"body": "' + b"x" * MAX_DECISION_BODY + b'"}'
    resp = await client.post(f"{base}/f1-request/deny", content=huge, headers=ADMIN)
    assert resp.status_code == 413 and resp.json()["code"] == "PAYLOAD_TOO_LARGE"
    assert h.decisions == [] and "f1-request" in h.pending


async def test_read_scope_cannot_decide(
    client: httpx.AsyncClient, holders: list[Holder], nats_url: str
) -> None:
    h = await hold(holders, nats_url, "r1", held("r1", "f1"))
    for verb in ("approve", "allow-once", "deny", "modify"):
        resp = await client.post(f"/api/approvals/pending/f1-request/{verb}", json={}, headers=READ)
        assert resp.status_code == 403 and resp.json()["code"] == "AUTH_FORBIDDEN", verb
    for url in ("/api/approvals/cached", "/api/approvals/cached/entry?rule=r&method=GET&url=/"):
        resp = await client.delete(url, headers=READ)
        assert resp.status_code == 403, url
    resp = await client.post("/api/approvals/pending/f1-request/deny")
    assert resp.status_code == 401
    assert h.decisions == []
    assert (await client.get("/api/approvals/pending/list", headers=READ)).status_code == 200
    assert (await client.get("/api/approvals/cached", headers=READ)).status_code == 200


# -- cached approvals ---------------------------------------------------------------------------
async def test_approve_writes_the_cached_approval(
    client: httpx.AsyncClient, holders: list[Holder], nats_url: str, bus: Bus
) -> None:
    await hold(holders, nats_url, "r1", held("r1", "f1"), held("r1", "f2", rule="other-rule"))
    before = time.time()
    resp = await client.post(
        "/api/approvals/pending/f1-request/approve", json={"ttl_s": 120}, headers=ADMIN
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    key = cache_key("hold-pay", "POST", "https://api.example.com/v1/pay")
    assert key == cache_key("hold-pay", "post", URL)  # no query string, any method case
    cached = body["cached"]
    assert cached["key"] == key and cached["url"] == "https://api.example.com/v1/pay"
    assert cached["method"] == "POST" and cached["by"] == "ops"
    kv = await bus.approvals_kv()
    stored = CachedApproval.model_validate_json((await kv.get(key)).value or b"")
    assert stored.rule == "hold-pay" and stored.method == "POST" and stored.by == "ops"
    assert stored.url == "https://api.example.com/v1/pay"
    assert before + 120 <= stored.expires_at <= time.time() + 120
    assert stored.expires_at - stored.created_at == pytest.approx(120)
    assert holders[0].decisions[0].decision == "approve"

    # no ttl_s: FLEET_API_APPROVAL_TTL (900 here)
    resp = await client.post("/api/approvals/pending/f2-request/approve", headers=ADMIN)
    assert resp.status_code == 200, resp.text
    other = CachedApproval.model_validate_json(
        (await kv.get(cache_key("other-rule", "POST", URL))).value or b""
    )
    assert other.expires_at - other.created_at == pytest.approx(900)

    listed = (await client.get("/api/approvals/cached", headers=READ)).json()["cached"]
    assert [(c["rule"], c["key"]) for c in listed] == [
        ("hold-pay", key),
        ("other-rule", cache_key("other-rule", "POST", URL)),
    ]
    assert 100 < listed[0]["expires_in_s"] <= 120


async def test_cached_list_skips_expired_entries(client: httpx.AsyncClient, bus: Bus) -> None:
    kv = await bus.approvals_kv()
    now = time.time()
    live = CachedApproval(
        rule="r", method="GET", url="https://a.example/x", by="ops", created_at=now - 10,
        expires_at=now + 60,
    )  # fmt: skip
    gone = CachedApproval(
        rule="r", method="GET", url="https://a.example/old", by="ops", created_at=now - 100,
        expires_at=now - 1,
    )  # fmt: skip
    for entry in (live, gone):
        await kv.put(entry.key(), entry.model_dump_json().encode())
    await kv.put("not-json", b"garbage")
    body = (await client.get("/api/approvals/cached", headers=READ)).json()
    assert [c["url"] for c in body["cached"]] == ["https://a.example/x"]
    assert body["cached"][0]["key"] == live.key()


async def test_forget_one_entry_and_purge(
    client: httpx.AsyncClient, bus: Bus, nats_url: str
) -> None:
    kv = await bus.approvals_kv()
    now = time.time()
    entries = [
        CachedApproval(rule=rule, method="POST", url=url, created_at=now, expires_at=now + 60)
        for rule, url in [
            ("hold-pay", "https://api.example.com/v1/pay"),
            ("hold-pay", "https://api.example.com/v1/refund"),
            ("other", "https://b.example/"),
        ]
    ]
    for entry in entries:
        await kv.put(entry.key(), entry.model_dump_json().encode())
    # a replica watching the bucket sees every removal
    nc = await nats.connect(nats_url)
    seen: list[tuple[str, str | None]] = []
    watcher = await nc.jetstream().key_value(subjects.APPROVALS_BUCKET)
    watch = await watcher.watchall(include_history=False)
    try:
        # the entry is named by rule, method (any case) and URL without its query string
        params = {"rule": "hold-pay", "method": "post", "url": URL}
        resp = await client.delete("/api/approvals/cached/entry", params=params, headers=ADMIN)
        assert resp.status_code == 204, resp.text
        with pytest.raises(KeyNotFoundError):
            await kv.get(entries[0].key())
        again = await client.delete("/api/approvals/cached/entry", params=params, headers=ADMIN)
        assert again.status_code == 404 and again.json()["code"] == "CACHED_APPROVAL_NOT_FOUND"
        missing = await client.delete("/api/approvals/cached/entry?rule=x", headers=ADMIN)
        assert missing.status_code == 422
        assert {e["field"] for e in missing.json()["errors"]} == {"query.method", "query.url"}
        bad = {"rule": "r", "method": "GET\r\nX", "url": "u"}
        resp = await client.delete("/api/approvals/cached/entry", params=bad, headers=ADMIN)
        assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "query.method"

        resp = await client.delete("/api/approvals/cached", headers=ADMIN)
        assert resp.status_code == 204
        assert (await client.get("/api/approvals/cached", headers=READ)).json() == {"cached": []}
        for entry in entries[1:]:
            with pytest.raises(KeyNotFoundError):
                await kv.get(entry.key())

        while True:
            try:
                e = await watch.updates(0.3)
            except nats.errors.TimeoutError:
                break
            if e is not None:
                seen.append((e.key, e.operation))
        purged = {k for k, op in seen if op in ("PURGE", "DEL")}
        assert purged == {e.key() for e in entries}
    finally:
        await watch.stop()
        await nc.close()
    # purging nothing is fine
    assert (await client.delete("/api/approvals/cached", headers=ADMIN)).status_code == 204


# -- audit --------------------------------------------------------------------------------------
async def test_every_decision_and_deletion_is_audited(
    client: httpx.AsyncClient, holders: list[Holder], nats_url: str
) -> None:
    await hold(
        holders,
        nats_url,
        "r1",
        held("r1", "f1"),
        held("r1", "f2"),
        held("r1", "f3"),
        held("r1", "f4"),
    )
    nc = await nats.connect(nats_url)
    records: list[dict[str, Any]] = []

    async def on_msg(msg: Any) -> None:
        records.append(orjson.loads(msg.data)["data"])

    calls: list[tuple[str, str, dict[str, str], Any]] = [
        ("POST", "/api/approvals/pending/f1-request/approve", ADMIN, {"ttl_s": 60}),
        ("POST", "/api/approvals/pending/f2-request/allow-once", ADMIN, None),
        ("POST", "/api/approvals/pending/f3-request/deny", ADMIN, {"status": 403}),
        ("POST", "/api/approvals/pending/f4-request/modify", ADMIN, {"request": {"body": ""}}),
        ("POST", "/api/approvals/pending/f4-request/deny", ADMIN, None),  # 409
        ("POST", "/api/approvals/pending/f9-request/deny", READ, None),  # 403
        (
            "DELETE",
            "/api/approvals/cached/entry?rule=hold-pay&method=POST&url=https://api.example.com/v1/pay?t=secret",
            ADMIN,
            None,
        ),
        ("DELETE", "/api/approvals/cached", ADMIN, None),
    ]
    try:
        await nc.subscribe(
            subjects.events_subject(subjects.API_SOURCE, subjects.AUDIT_EVENT), cb=on_msg
        )
        await barrier(nc)
        for method, url, headers, body in calls:
            await client.request(method, url, headers=headers, json=body)

        async def all_recorded() -> bool:
            return len(records) == len(calls)

        await eventually(all_recorded, 3.0, "every audit record")
    finally:
        await nc.close()
    got = [(r["action"], r["status"], r["key_id"]) for r in records]
    assert got == [
        ("approval.approve", 200, "ops"),
        ("approval.allow_once", 200, "ops"),
        ("approval.deny", 200, "ops"),
        ("approval.modify", 200, "ops"),
        ("approval.deny", 409, "ops"),
        ("approval.deny", 403, "viewer"),
        ("approval.cache.delete", 204, "ops"),
        ("approval.cache.purge", 204, "ops"),
    ]
    for rec, flow, decision in zip(
        records, ("f1", "f2", "f3", "f4"), ("approve", "allow_once", "deny", "modify"), strict=False
    ):
        assert rec["approval"] == f"{flow}-request" and rec["flow"] == flow
        assert rec["decision"] == decision and rec["replica"] == "r1"
    assert records[0]["cached_until"] > time.time()
    assert records[4]["approval"] == "f4-request" and "flow" not in records[4]
    assert records[6]["url"] == "https://api.example.com/v1/pay"  # the query string is not kept
    assert records[6]["rule"] == "hold-pay" and records[6]["method"] == "POST"
    assert records[7]["purged"] == 0  # the one entry (approve f1) was deleted just before


# -- the live stream ----------------------------------------------------------------------------
async def test_stream_snapshot_then_created_resolved_timeout(
    nats_url: str, tmp_path: Path, holders: list[Holder], bus: Bus
) -> None:
    t = time.time() - 5
    a = held("r1", "fa", created=t)
    h = await hold(holders, nats_url, "r1", a)
    settings = api_settings(nats_url, tmp_path, api_command_timeout=0.7, api_sse_heartbeat=0.3)
    b = held("r1", "fb")

    async def emit(kind: str, data: dict[str, Any]) -> int:
        event = await events.emit(bus, "r1", kind, data, replica="r1")
        assert event is not None
        info = await bus.js.stream_info(subjects.EVENTS_STREAM)
        return int(info.state.last_seq)

    async with serve_api(settings) as server:
        bad = {**READ, "Last-Event-ID": "12abc"}
        async with httpx.AsyncClient(base_url=server.url) as api:
            resp = await api.get("/api/approvals/pending", headers=bad)
            assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == (
                "header.last-event-id"
            )
        async with sse(server.url, "/api/approvals/pending", READ) as stream:
            snap = await stream.next()
            assert snap.event == "snapshot"
            body = snap.json()
            assert body["type"] == "snapshot" and body["missing"] == []
            assert [p["id"] for p in body["pending"]] == ["fa-request"]
            h.pending[b.id] = b
            seq_created = await emit(events.INTERCEPT_CREATED, {"approval": b.model_dump()})
            await emit(events.FLOW_KILLED, {"flow_id": "zz"})  # not an intercept event
            await emit(
                events.INTERCEPT_RESOLVED,
                {"id": a.id, "flow_id": "fa", "decision": "allow_once", "by": "ops"},
            )
            await emit(
                events.INTERCEPT_TIMEOUT, {"id": b.id, "flow_id": "fb", "on_timeout": "deny"}
            )
            created, resolved, timeout = await stream.take(3)
            assert [e.event for e in (created, resolved, timeout)] == [
                "pending_created",
                "pending_resolved",
                "pending_timeout",
            ]
            assert created.id == str(seq_created)
            c = created.json()
            assert c["type"] == "pending_created" and c["replica"] == "r1"
            assert c["approval"]["id"] == b.id and c["approval"]["flow_id"] == "fb"
            assert isinstance(c["timestamp"], float)
            r = resolved.json()
            assert (r["type"], r["id"], r["flow_id"], r["decision"], r["by"], r["replica"]) == (
                "pending_resolved",
                a.id,
                "fa",
                "allow_once",
                "ops",
                "r1",
            )
            tt = timeout.json()
            assert (tt["type"], tt["id"], tt["on_timeout"]) == ("pending_timeout", b.id, "deny")
            assert int(created.id or 0) < int(resolved.id or 0) < int(timeout.id or 0)

        # resume after the created event of b: a fresh snapshot (c is pending now), then
        # what happened since; c's own created event is not repeated (the snapshot has it)
        cc = held("r1", "fc")
        h.pending = {cc.id: cc}
        await emit(events.INTERCEPT_CREATED, {"approval": cc.model_dump()})
        headers = {**READ, "Last-Event-ID": str(seq_created)}
        async with sse(server.url, "/api/approvals/pending", headers) as again:
            snap = await again.next()
            assert [p["id"] for p in snap.json()["pending"]] == [cc.id]
            replay = await again.take(2)
            assert [(e.event, e.json()["id"]) for e in replay] == [
                ("pending_resolved", a.id),
                ("pending_timeout", b.id),
            ]
            await asyncio.sleep(0.7)  # idle: heartbeat comments keep the connection alive
            await emit(
                events.INTERCEPT_RESOLVED,
                {"id": cc.id, "flow_id": "fc", "decision": "deny", "by": "ops"},
            )
            last = await again.next()
            assert last.event == "pending_resolved" and last.json()["id"] == cc.id
            assert "heartbeat" in again.comments
