"""``/api/policy``: the rules policy's REST API. The whole document and single rules,
validation (hostile input included: filter positions, protected headers, sizes),
If-Match, concurrent writes, history and rollback, the roll-out report read from the
replicas' ``policy_revision``/``policy_error``, and the audit records. A real NATS of
the test's own; replicas are fakes whose registry entries the test writes."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest

from libs.common import subjects
from libs.common.bus import Bus, barrier
from libs.common.natsserver import EmbeddedNats
from libs.common.policy import MAX_RULES, Policy, Rule
from services.api.fleet import POLICY_REPORT, classify
from tests.unit.test_api_support import (
    ADMIN,
    READ,
    FakeReplica,
    api_client,
    api_settings,
    eventually,
    replica_status,
)

MIB = 1024 * 1024


@pytest.fixture
def nats_url(restartable_nats: EmbeddedNats) -> str:
    return restartable_nats.url


@pytest.fixture
async def client(nats_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(api_settings(nats_url, tmp_path)) as c:
        yield c


def rule(rule_id: str | None = "r1", **changes: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "match": {"filter": "~d example.com"},
        "action": {"type": "block"},
        **changes,
    }
    if rule_id is not None:
        out["id"] = rule_id
    return out


def saved_form(data: dict[str, Any]) -> dict[str, Any]:
    """A rule as the API returns it (defaults filled in)."""
    return Rule.model_validate(data).model_dump(mode="json")


async def current(client: httpx.AsyncClient) -> dict[str, Any]:
    resp = await client.get("/api/policy", headers=READ)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    assert resp.headers["etag"] == f'"{body["revision"]}"'
    return body


async def ids(client: httpx.AsyncClient) -> list[str]:
    return [r["id"] for r in (await current(client))["policy"]["rules"]]


async def put_policy(client: httpx.AsyncClient, *rules: dict[str, Any]) -> int:
    resp = await client.put("/api/policy", json={"rules": list(rules)}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    revision: int = resp.json()["revision"]
    return revision


def assert_problem(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = resp.json()
    assert body["code"] == code, body
    return body


def fields_of(resp: httpx.Response) -> list[str]:
    return sorted(e["field"] for e in resp.json()["errors"])


# -- reads ------------------------------------------------------------------------------------
async def test_empty_until_written(client: httpx.AsyncClient) -> None:
    assert await current(client) == {"revision": 0, "policy": {"rules": []}}
    listed = await client.get("/api/policy/rules", headers=READ)
    assert listed.status_code == 200 and listed.json() == {"revision": 0, "rules": []}
    assert listed.headers["etag"] == '"0"'
    assert (await client.get("/api/policy/history", headers=READ)).json() == {"revisions": []}


async def test_scopes_reads_and_writes(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/policy")).status_code == 401
    assert (await client.get("/api/policy/rules", headers=READ)).status_code == 200
    for method, url in (
        ("PUT", "/api/policy"),
        ("POST", "/api/policy/rules"),
        ("PUT", "/api/policy/rules/r1"),
        ("DELETE", "/api/policy/rules/r1"),
        ("POST", "/api/policy/rollback"),
    ):
        resp = await client.request(method, url, headers=READ, json=rule())
        assert_problem(resp, 403, "AUTH_FORBIDDEN")
    assert (await current(client))["revision"] == 0


# -- rules CRUD -------------------------------------------------------------------------------
async def test_rule_crud_round_trip(client: httpx.AsyncClient) -> None:
    created = await client.post("/api/policy/rules", json=rule("first"), headers=ADMIN)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["rule"] == saved_form(rule("first")) and body["rule"]["enabled"] is True
    assert (body["applied"], body["pending"], body["rejected"]) == ([], [], [])
    assert created.headers["location"] == "/api/policy/rules/first"
    assert created.headers["etag"] == f'"{body["revision"]}"'
    first_rev = body["revision"]

    second = rule("second", priority=5, match={"filter": "~m POST", "phase": "request"})
    assert (await client.post("/api/policy/rules", json=second, headers=ADMIN)).status_code == 201
    listed = await client.get("/api/policy/rules", headers=READ)
    assert [r["id"] for r in listed.json()["rules"]] == ["first", "second"]

    one = await client.get("/api/policy/rules/second", headers=READ)
    assert one.status_code == 200 and one.json() == saved_form(second)
    assert one.headers["etag"] == listed.headers["etag"]

    changed = rule("second", description="now tagging", action={"type": "tag", "tags": ["x"]})
    updated = await client.put("/api/policy/rules/second", json=changed, headers=ADMIN)
    assert updated.status_code == 200, updated.text
    assert updated.json()["rule"] == saved_form(changed)
    assert (await client.get("/api/policy/rules/second", headers=READ)).json() == saved_form(
        changed
    )
    # the body's id may be left out: the path names the rule; it keeps its place
    no_id = rule(None, enabled=False)
    again = await client.put("/api/policy/rules/first", json=no_id, headers=ADMIN)
    assert again.status_code == 200 and again.json()["rule"]["id"] == "first"
    assert await ids(client) == ["first", "second"]

    deleted = await client.delete("/api/policy/rules/first", headers=ADMIN)
    assert deleted.status_code == 204 and deleted.content == b""
    after = await current(client)
    assert deleted.headers["etag"] == f'"{after["revision"]}"'
    assert after["policy"]["rules"] == [saved_form(changed)]
    assert_problem(
        await client.get("/api/policy/rules/first", headers=READ), 404, "POLICY_RULE_NOT_FOUND"
    )
    history = (await client.get("/api/policy/history", headers=READ)).json()["revisions"]
    assert len(history) == 5 and history[-1]["revision"] == first_rev
    assert [h["revision"] for h in history] == sorted(
        (h["revision"] for h in history), reverse=True
    )
    assert history[0]["policy"] == after["policy"] and history[0]["operation"] == "put"
    short = await client.get("/api/policy/history?limit=2", headers=READ)
    assert [h["revision"] for h in short.json()["revisions"]] == [
        h["revision"] for h in history[:2]
    ]


async def test_generated_ids_and_insert_before(client: httpx.AsyncClient) -> None:
    made = []
    for _ in range(3):
        resp = await client.post("/api/policy/rules", json=rule(None), headers=ADMIN)
        assert resp.status_code == 201, resp.text
        made.append(resp.json()["rule"]["id"])
    assert all(re.fullmatch(r"rule-[0-9a-f]{8}", i) for i in made) and len(set(made)) == 3
    front = await client.post(
        "/api/policy/rules", params={"before": made[0]}, json=rule("front"), headers=ADMIN
    )
    assert front.status_code == 201, front.text
    middle = await client.post(
        "/api/policy/rules", params={"before": made[2]}, json=rule("middle"), headers=ADMIN
    )
    assert middle.status_code == 201, middle.text
    assert await ids(client) == ["front", made[0], made[1], "middle", made[2]]
    missing = await client.post(
        "/api/policy/rules", params={"before": "nope"}, json=rule("x"), headers=ADMIN
    )
    assert_problem(missing, 404, "POLICY_RULE_NOT_FOUND")
    assert "x" not in await ids(client)


async def test_duplicate_id_is_409(client: httpx.AsyncClient) -> None:
    await put_policy(client, rule("a"), rule("b"))
    before = await current(client)
    resp = await client.post("/api/policy/rules", json=rule("b"), headers=ADMIN)
    body = assert_problem(resp, 409, "POLICY_RULE_DUPLICATE")
    assert "'b'" in body["detail"]
    assert await current(client) == before


async def test_unknown_rule_is_404(client: httpx.AsyncClient) -> None:
    await put_policy(client, rule("a"))
    before = await current(client)
    for method, body in (("GET", None), ("PUT", rule("ghost")), ("DELETE", None)):
        headers = READ if method == "GET" else ADMIN
        resp = await client.request(method, "/api/policy/rules/ghost", json=body, headers=headers)
        assert_problem(resp, 404, "POLICY_RULE_NOT_FOUND")
    assert await current(client) == before


async def test_put_rule_id_must_match_the_path(client: httpx.AsyncClient) -> None:
    await put_policy(client, rule("a"), rule("b"))
    before = await current(client)
    resp = await client.put("/api/policy/rules/a", json=rule("b"), headers=ADMIN)
    body = assert_problem(resp, 422, "POLICY_INVALID")
    assert [(e["field"], e["type"]) for e in body["errors"]] == [("body.id", "id_mismatch")]
    renamed = await client.put("/api/policy/rules/a", json=rule("c"), headers=ADMIN)
    assert_problem(renamed, 422, "POLICY_INVALID")
    assert await current(client) == before


# -- the whole document --------------------------------------------------------------------
async def test_put_whole_policy_and_get_body_round_trip(client: httpx.AsyncClient) -> None:
    rev = await put_policy(client, rule("a"), rule("b", priority=3))
    got = await current(client)
    assert got["revision"] == rev and [r["id"] for r in got["policy"]["rules"]] == ["a", "b"]
    # GET's body goes back as is; its revision is then a precondition
    got["policy"]["rules"].reverse()
    resp = await client.put("/api/policy", json=got, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    assert [r["id"] for r in resp.json()["policy"]["rules"]] == ["b", "a"]
    stale = await client.put("/api/policy", json=got, headers=ADMIN)
    assert_problem(stale, 412, "POLICY_CONFLICT")
    assert stale.headers["etag"] == f'"{resp.json()["revision"]}"'
    emptied = await client.put("/api/policy", json={}, headers=ADMIN)
    assert emptied.status_code == 200 and emptied.json()["policy"] == {"rules": []}


async def test_if_match(client: httpx.AsyncClient) -> None:
    rev = await put_policy(client, rule("a"))
    stale = {**ADMIN, "If-Match": f'"{rev - 1}"'}
    fresh = {**ADMIN, "If-Match": f'"{rev}"'}
    calls: list[tuple[str, str, Any]] = [
        ("PUT", "/api/policy", {"rules": []}),
        ("POST", "/api/policy/rules", rule("b")),
        ("PUT", "/api/policy/rules/a", rule("a", priority=1)),
        ("DELETE", "/api/policy/rules/a", None),
        ("POST", "/api/policy/rollback", {"revision": rev}),
    ]
    for method, url, body in calls:
        resp = await client.request(method, url, json=body, headers=stale)
        assert_problem(resp, 412, "POLICY_CONFLICT")
        assert resp.headers["etag"] == f'"{rev}"'
    assert (await current(client))["revision"] == rev
    removed = await client.delete("/api/policy/rules/a", headers=fresh)
    assert removed.status_code == 204
    created = await client.post(
        "/api/policy/rules", json=rule("b"), headers={**ADMIN, "If-Match": "*"}
    )
    assert created.status_code == 201, created.text
    # If-Match and the body's revision that disagree: a client bug, 422
    both = await client.put(
        "/api/policy",
        json={"revision": 1, "policy": {"rules": []}},
        headers={**ADMIN, "If-Match": '"2"'},
    )
    assert_problem(both, 422, "VALIDATION_ERROR")


@pytest.mark.parametrize(
    ("action", "phase"),
    [
        ({"type": "block"}, "request"),
        ({"type": "block", "status": 451, "body": "no", "close": False}, "response"),
        ({"type": "block", "close": True}, "request"),
        (
            {"type": "respond", "status": 200, "headers": [["X-Mock", "1"]], "body": "{}"},
            "request",
        ),
        ({"type": "respond", "status": 503}, "response"),
        ({"type": "map_remote", "pattern": r"^https://a\.example/", "replacement": "x"}, "request"),
        ({"type": "set_headers", "headers": [["X-A", "1"], ["X-A", "2"]]}, "request"),
        ({"type": "set_headers", "headers": [["Cache-Control", "no-store"]]}, "response"),
        ({"type": "remove_headers", "names": ["Cookie", "X-Secret"]}, "request"),
        ({"type": "remove_headers", "names": ["Set-Cookie"]}, "response"),
        ({"type": "replace_body", "pattern": "foo+", "replacement": "bar"}, "response"),
        ({"type": "delay", "ms": 250}, "request"),
        ({"type": "tag", "tags": ["seen", "team:a/b"]}, "response"),
        ({"type": "allow"}, "request"),
        ({"type": "intercept", "timeout_s": 30, "on_timeout": "allow"}, "request"),
        ({"type": "intercept"}, "response"),
    ],
)
async def test_every_action_type_is_accepted(
    client: httpx.AsyncClient, action: dict[str, Any], phase: str
) -> None:
    filt = "~d example.com" if phase == "request" else "~d example.com & ~c 200"
    data = rule("act", match={"filter": filt, "phase": phase}, action=action)
    resp = await client.post("/api/policy/rules", json=data, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    assert resp.json()["rule"] == saved_form(data)
    assert (await client.get("/api/policy/rules/act", headers=READ)).json() == saved_form(data)


# -- hostile input ------------------------------------------------------------------------------
FILTERS = [
    ("~d (", 3),  # a value is missing
    ("~d x &", 6),  # the expression ends early
    ("~b secret", 0),  # body operators: rules match on heads
    ("~d x & ~bq y", 7),
    ("~d x & ~bs y", 7),
    ("~d x | ~c 500", 7),  # response operators in a request rule
    ("!~s", 1),
]


@pytest.mark.parametrize(("expression", "position"), FILTERS)
async def test_bad_filters_report_their_position(
    client: httpx.AsyncClient, expression: str, position: int
) -> None:
    rev = await put_policy(client, rule("keep"))
    resp = await client.post(
        "/api/policy/rules", json=rule("bad", match={"filter": expression}), headers=ADMIN
    )
    body = assert_problem(resp, 422, "POLICY_INVALID")
    (error,) = body["errors"]
    assert error["field"] == "body.match.filter" and error["type"] == "bad_filter"
    assert error["position"] == position and error["expected"]
    # the same rule third in a whole document: the field names the place
    whole = {"rules": [rule("a"), rule("b"), rule("bad", match={"filter": expression})]}
    resp = await client.put("/api/policy", json=whole, headers=ADMIN)
    body = assert_problem(resp, 422, "POLICY_INVALID")
    (error,) = body["errors"]
    assert error["field"] == "body.rules.2.match.filter" and error["position"] == position
    assert "body.rules.2.match.filter" in body["detail"]
    assert (await current(client))["revision"] == rev


async def test_response_operators_are_fine_in_a_response_rule(client: httpx.AsyncClient) -> None:
    data = rule("r", match={"filter": "~c 500 | ~s & ~hs json", "phase": "response"})
    assert (await client.post("/api/policy/rules", json=data, headers=ADMIN)).status_code == 201


PROTECTED = ["Content-Length", "Host", "Transfer-Encoding", "connection", "Proxy-Authorization"]
HOSTILE: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "map_remote at the response phase",
        rule(
            match={"filter": "~d x", "phase": "response"},
            action={"type": "map_remote", "pattern": "a", "replacement": "b"},
        ),
        ["body"],
    ),
    *(
        (
            f"set {name}",
            rule(action={"type": "set_headers", "headers": [[name, "1"]]}),
            ["body.action.set_headers.headers"],
        )
        for name in PROTECTED
    ),
    *(
        (
            f"remove {name}",
            rule(action={"type": "remove_headers", "names": ["X-Ok", name]}),
            ["body.action.remove_headers.names"],
        )
        for name in PROTECTED
    ),
    (
        "respond with Content-Length",
        rule(action={"type": "respond", "headers": [["Content-Length", "0"]]}),
        ["body.action.respond.headers"],
    ),
    (
        "CR LF in a value",
        rule(action={"type": "set_headers", "headers": [["X-A", "a\r\nInjected: 1"]]}),
        ["body.action.set_headers.headers"],
    ),
    (
        "LF in a mock header",
        rule(action={"type": "respond", "headers": [["X-A", "a\nb"]]}),
        ["body.action.respond.headers"],
    ),
    (
        "NUL in a value",
        rule(action={"type": "set_headers", "headers": [["X-A", "a\x00"]]}),
        ["body.action.set_headers.headers"],
    ),
    (
        "not latin-1",
        rule(action={"type": "set_headers", "headers": [["X-A", "price: 5 €"]]}),
        ["body.action.set_headers.headers"],
    ),
    (
        "a header name with a space",
        rule(action={"type": "set_headers", "headers": [["X A", "1"]]}),
        ["body.action.set_headers.headers"],
    ),
    (
        "invalid regex in map_remote",
        rule(action={"type": "map_remote", "pattern": "([a-z", "replacement": ""}),
        ["body.action.map_remote.pattern"],
    ),
    (
        "invalid regex in replace_body",
        rule(action={"type": "replace_body", "pattern": "(?P<x", "replacement": ""}),
        ["body.action.replace_body.pattern"],
    ),
    ("unknown rule field", rule(when="always"), ["body.when"]),
    (
        "unknown action field",
        rule(action={"type": "block", "reason": "x"}),
        ["body.action.block.reason"],
    ),
    ("unknown match field", rule(match={"filter": "~d x", "regex": True}), ["body.match.regex"]),
    ("unknown action type", rule(action={"type": "explode"}), ["body.action"]),
    ("no action", {"id": "r", "match": {"filter": "~d x"}}, ["body.action"]),
    ("priority not a number", rule(priority="high"), ["body.priority"]),
    ("priority too high", rule(priority=10**7), ["body.priority"]),
    ("match is a string", rule(match="~d x"), ["body.match"]),
    ("empty filter", rule(match={"filter": ""}), ["body.match.filter"]),
    ("unknown phase", rule(match={"filter": "~d x", "phase": "later"}), ["body.match.phase"]),
    ("id not a string", rule(7), ["body.id"]),
    ("id with a slash", rule("a/b"), ["body.id"]),
    ("id too long", rule("a" * 65), ["body.id"]),
    ("delay of 0", rule(action={"type": "delay", "ms": 0}), ["body.action.delay.ms"]),
    ("delay too long", rule(action={"type": "delay", "ms": 60_001}), ["body.action.delay.ms"]),
    ("status 99", rule(action={"type": "block", "status": 99}), ["body.action.block.status"]),
    ("a bad tag", rule(action={"type": "tag", "tags": ["has space"]}), ["body.action.tag.tags"]),
    (
        "tags not a list",
        rule(action={"type": "tag", "tags": "one"}),
        ["body.action.tag.tags"],
    ),
    (
        "intercept forever",
        rule(action={"type": "intercept", "timeout_s": 10**6}),
        ["body.action.intercept.timeout_s"],
    ),
    (
        "two problems at once",
        rule(priority="x", action={"type": "delay", "ms": -1}),
        ["body.action.delay.ms", "body.priority"],
    ),
]


@pytest.mark.parametrize(
    ("data", "fields"), [(d, f) for _, d, f in HOSTILE], ids=[i for i, _, _ in HOSTILE]
)
async def test_hostile_rules_are_422_naming_the_field(
    client: httpx.AsyncClient, data: dict[str, Any], fields: list[str]
) -> None:
    rev = await put_policy(client, rule("keep"))
    resp = await client.post("/api/policy/rules", json=data, headers=ADMIN)
    assert_problem(resp, 422, "POLICY_INVALID")
    assert fields_of(resp) == fields
    if "body.id" not in fields:  # the same rule replacing one
        resp = await client.put(
            "/api/policy/rules/keep", json={**data, "id": "keep"}, headers=ADMIN
        )
        assert_problem(resp, 422, "POLICY_INVALID")
        assert fields_of(resp) == fields
    whole = await client.put("/api/policy", json={"rules": [rule("a"), data]}, headers=ADMIN)
    assert_problem(whole, 422, "POLICY_INVALID")
    assert all(f.startswith("body.rules.1") for f in fields_of(whole)), fields_of(whole)
    assert (await current(client))["revision"] == rev


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"rules": [rule("a"), rule("b"), rule("a")]}, ["body.rules"]),  # duplicate ids
        ({"rules": [rule(f"r{i}") for i in range(MAX_RULES + 1)]}, ["body.rules"]),
        ({"rules": "none"}, ["body.rules"]),
        ({"rules": [], "default": "deny"}, ["body.default"]),
        ({"rules": [[1]]}, ["body.rules.0"]),
        ({"revision": 0}, ["body.policy"]),
        ({"revision": "0", "policy": {}}, ["body.revision"]),
        ({"revision": True, "policy": {}}, ["body.revision"]),
        ({"revision": -1, "policy": {}}, ["body.revision"]),
        ({"revision": 0, "policy": [1]}, ["body.policy"]),
        ({"revision": 0, "policy": {"rules": [rule("")]}}, ["body.policy.rules.0.id"]),
        ([1, 2], ["body"]),
        ("rules", ["body"]),
        (None, ["body"]),
    ],
)
async def test_bad_documents_are_422(
    client: httpx.AsyncClient, body: Any, fields: list[str]
) -> None:
    rev = await put_policy(client, rule("keep"))
    resp = await client.put("/api/policy", content=orjson.dumps(body), headers=ADMIN)
    assert_problem(resp, 422, "POLICY_INVALID")
    assert fields_of(resp) == fields
    assert (await current(client))["revision"] == rev


async def test_rule_body_must_be_a_json_object(client: httpx.AsyncClient) -> None:
    for raw in (b"", b"{nope", b"[1]", b'"r"', b"null"):
        resp = await client.post("/api/policy/rules", content=raw, headers=ADMIN)
        assert_problem(resp, 422, "POLICY_INVALID")
        assert fields_of(resp) == ["body"]


async def test_the_thousand_and_first_rule_is_refused(client: httpx.AsyncClient) -> None:
    full = [rule(f"r{i}") for i in range(MAX_RULES)]
    rev = await put_policy(client, *full)
    resp = await client.post("/api/policy/rules", json=rule("one-more"), headers=ADMIN)
    body = assert_problem(resp, 422, "POLICY_INVALID")
    assert fields_of(resp) == ["policy.rules"] and str(MAX_RULES) in body["errors"][0]["message"]
    assert (await current(client))["revision"] == rev
    # replacing one of them is fine
    ok = await client.put("/api/policy/rules/r7", json=rule("r7", priority=1), headers=ADMIN)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    ("method", "url"),
    [("PUT", "/api/policy"), ("POST", "/api/policy/rules"), ("PUT", "/api/policy/rules/a")],
)
async def test_two_mib_bodies_are_413(client: httpx.AsyncClient, method: str, url: str) -> None:
    rev = await put_policy(client, rule("a"))
    big = b'{"rules": [' + b" " * (2 * MIB) + b"]}"
    resp = await client.request(method, url, content=big, headers=ADMIN)
    assert_problem(resp, 413, "PAYLOAD_TOO_LARGE")
    assert (await current(client))["revision"] == rev


async def test_a_policy_too_large_to_store_is_413(tmp_path: Path) -> None:
    """Under the body limit, but the stored form (defaults filled in) would not fit in
    one message of a NATS with the default 1 MiB max_payload: refused as such (413),
    not a bus failure."""

    def body(size: int) -> list[dict[str, Any]]:
        return [
            rule(f"r{i}", description="d" * size, match={"filter": "~q"}) for i in range(MAX_RULES)
        ]

    overhead = len(orjson.dumps({"rules": body(0)}))
    rules = body((MIB - 8 * 1024 - overhead) // MAX_RULES)
    raw = orjson.dumps({"rules": rules})
    assert len(raw) < MIB < len(Policy.model_validate({"rules": rules}).model_dump_json())
    server = EmbeddedNats(tmp_path / "small", max_payload=MIB)
    server.start()
    try:
        async with api_client(api_settings(server.url, tmp_path)) as client:
            resp = await client.put("/api/policy", content=raw, headers=ADMIN)
            body_ = assert_problem(resp, 413, "PAYLOAD_TOO_LARGE")
            assert "NATS" in body_["detail"]
            assert (await current(client))["revision"] == 0
            assert (
                await client.put("/api/policy", json={"rules": rules[:10]}, headers=ADMIN)
            ).status_code == 200
    finally:
        server.stop()


# -- concurrency ------------------------------------------------------------------------------
async def test_concurrent_rule_writes_never_lose_each_other(client: httpx.AsyncClient) -> None:
    await put_policy(client, rule("base"))
    created = await asyncio.gather(
        *(client.post("/api/policy/rules", json=rule(None), headers=ADMIN) for _ in range(8))
    )
    assert [r.status_code for r in created] == [201] * 8, [r.text for r in created]
    made = {r.json()["rule"]["id"] for r in created}
    assert len(made) == 8 and len({r.json()["revision"] for r in created}) == 8
    assert set(await ids(client)) == made | {"base"}
    # edits and deletes of different rules at once: all land
    edits = [
        client.put(f"/api/policy/rules/{i}", json=rule(i, priority=9), headers=ADMIN)
        for i in sorted(made)[:4]
    ]
    deletes = [client.delete(f"/api/policy/rules/{i}", headers=ADMIN) for i in sorted(made)[4:]]
    results = await asyncio.gather(*edits, *deletes)
    assert [r.status_code for r in results] == [200] * 4 + [204] * 4
    rules = (await current(client))["policy"]["rules"]
    assert rules[0]["id"] == "base" and {r["id"] for r in rules} == {"base", *sorted(made)[:4]}
    assert all(r["priority"] == 9 for r in rules[1:])


async def test_concurrent_guarded_writes_one_wins(client: httpx.AsyncClient) -> None:
    rev = await put_policy(client)
    racing = await asyncio.gather(
        *(
            client.post(
                "/api/policy/rules", json=rule(f"r{i}"), headers={**ADMIN, "If-Match": f'"{rev}"'}
            )
            for i in range(5)
        )
    )
    assert sorted(r.status_code for r in racing) == [201, 412, 412, 412, 412]
    assert len(await ids(client)) == 1


# -- history and rollback -----------------------------------------------------------------------
async def test_rollback(client: httpx.AsyncClient) -> None:
    first = await put_policy(client, rule("one"))
    second = await put_policy(client, rule("two"), rule("three"))
    resp = await client.post("/api/policy/rollback", json={"revision": first}, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["revision"] > second and resp.headers["etag"] == f'"{body["revision"]}"'
    assert [r["id"] for r in body["policy"]["rules"]] == ["one"]
    assert await ids(client) == ["one"]
    history = (await client.get("/api/policy/history", headers=READ)).json()["revisions"]
    assert [h["revision"] for h in history] == [body["revision"], second, first]


async def test_rollback_to_what_is_not_a_policy_write(
    client: httpx.AsyncClient, nats_url: str
) -> None:
    await put_policy(client, rule("a"))
    bus = await Bus.connect(nats_url, "test", 5.0)
    try:
        kv = await bus.policy_kv()
        other = await kv.put("not-the-policy", b'{"rules": []}')  # same bucket, other key
        await kv.delete(subjects.POLICY_KEY)
        deleted = (await kv.status()).stream_info.state.last_seq
        bad = await kv.create(subjects.POLICY_KEY, b'{"rules": [{"id": "x"}]}')
    finally:
        await bus.close()
    good = await client.put(
        "/api/policy", json={"rules": [rule("b")]}, headers={**ADMIN, "If-Match": f'"{bad}"'}
    )
    assert good.status_code == 200, good.text
    future = good.json()["revision"] + 1
    for target in (other, deleted, future, 10**12, 2**63 - 1):
        resp = await client.post("/api/policy/rollback", json={"revision": target}, headers=ADMIN)
        assert_problem(resp, 404, "POLICY_REVISION_NOT_FOUND")
    invalid = await client.post("/api/policy/rollback", json={"revision": bad}, headers=ADMIN)
    assert_problem(invalid, 422, "POLICY_INVALID")
    assert fields_of(invalid) == ["body.revision"]
    for junk in (0, -1, 10**30, "1", 1.5, True, None):
        resp = await client.post("/api/policy/rollback", json={"revision": junk}, headers=ADMIN)
        assert_problem(resp, 422, "VALIDATION_ERROR")
        assert fields_of(resp) == ["body.revision"]
    assert await ids(client) == ["b"]
    history = (await client.get("/api/policy/history", headers=READ)).json()["revisions"]
    assert [h["operation"] for h in history][:3] == ["put", "put", "delete"]


async def test_a_corrupt_stored_policy(client: httpx.AsyncClient, nats_url: str) -> None:
    bus = await Bus.connect(nats_url, "test", 5.0)
    try:
        rev = await (await bus.policy_kv()).put(subjects.POLICY_KEY, b'{"rules": 5}')
    finally:
        await bus.close()
    assert_problem(await client.get("/api/policy", headers=READ), 502, "POLICY_CORRUPT")
    added = await client.post("/api/policy/rules", json=rule("a"), headers=ADMIN)
    assert_problem(added, 502, "POLICY_CORRUPT")
    fixed = await client.put(
        "/api/policy", json={"rules": [rule("a")]}, headers={**ADMIN, "If-Match": f'"{rev}"'}
    )
    assert fixed.status_code == 200, fixed.text
    assert await ids(client) == ["a"]


# -- roll-out ---------------------------------------------------------------------------------
def test_classify_reads_the_policy_fields() -> None:
    err = "revision 5 rejected: bad filter"
    applied = replica_status("a", policy_revision=5)
    assert classify(applied, 5, POLICY_REPORT) == ("applied", None)
    assert classify(applied, 5)[0] == "pending"  # the config's fields say nothing of it
    refused = replica_status("a", policy_revision=3, policy_error=err)
    assert classify(refused, 5, POLICY_REPORT) == ("rejected", err)
    config_only = replica_status("a", config_revision=9, config_error=err)
    assert classify(config_only, 5, POLICY_REPORT) == ("pending", None)
    older = replica_status("a", policy_revision=3, policy_error="revision 4 rejected: x")
    assert classify(older, 5, POLICY_REPORT)[0] == "pending"


async def test_rollout_report(client: httpx.AsyncClient, nats_url: str) -> None:
    replicas: list[FakeReplica] = []
    try:
        for name in ("good", "picky", "slow"):
            replicas.append(await FakeReplica(replica_status(name)).start(nats_url))
        good, picky, slow = replicas
        next_rev = (await current(client))["revision"] + 1  # nothing else writes here
        error = f"revision {next_rev} rejected: rule r1: filter ~x unknown"

        async def react() -> None:
            await asyncio.sleep(0.05)
            good.status = good.status.model_copy(update={"policy_revision": next_rev})
            picky.status = picky.status.model_copy(update={"policy_error": error})
            # a config revision that happens to match is not the policy's
            slow.status = slow.status.model_copy(update={"config_revision": next_rev})
            for r in replicas:
                await r.publish()

        resp, _ = await asyncio.gather(
            client.post("/api/policy/rules", json=rule("r1"), headers=ADMIN), react()
        )
    finally:
        for r in replicas:
            await r.stop()
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["revision"] == next_rev
    assert body["applied"] == ["good"] and body["pending"] == ["slow"]
    assert body["rejected"] == [{"id": "picky", "error": error}]


# -- audit --------------------------------------------------------------------------------------
async def test_writes_are_audited_with_their_action(
    client: httpx.AsyncClient, nats_url: str
) -> None:
    nc = await nats.connect(nats_url)
    records: list[dict[str, Any]] = []

    async def on_msg(msg: Any) -> None:
        records.append(orjson.loads(msg.data)["data"])

    try:
        await nc.subscribe(
            subjects.events_subject(subjects.API_SOURCE, subjects.AUDIT_EVENT), cb=on_msg
        )
        await barrier(nc)
        put = await client.put("/api/policy", json={"rules": [rule("a")]}, headers=ADMIN)
        created = await client.post("/api/policy/rules", json=rule(None), headers=ADMIN)
        new_id = created.json()["rule"]["id"]
        updated = await client.put("/api/policy/rules/a", json=rule("a", priority=2), headers=ADMIN)
        deleted = await client.delete(f"/api/policy/rules/{new_id}", headers=ADMIN)
        back = await client.post(
            "/api/policy/rollback", json={"revision": put.json()["revision"]}, headers=ADMIN
        )
        refused = [
            ("POST", "/api/policy/rules", READ, 403),
            ("DELETE", "/api/policy/rules/ghost", ADMIN, 404),
            ("PUT", "/api/policy", {}, 401),
        ]
        for method, url, headers, _status in refused:
            await client.request(method, url, headers=headers, json=rule("z"))

        async def all_recorded() -> bool:
            return len(records) == 5 + len(refused)

        await eventually(all_recorded, 3.0, "every audit record")
    finally:
        await nc.close()
    by_action = [(r["action"], r["status"]) for r in records]
    assert by_action == [
        ("policy.put", 200),
        ("policy.rule.create", 201),
        ("policy.rule.update", 200),
        ("policy.rule.delete", 204),
        ("policy.rollback", 200),
        ("policy.rule.create", 403),
        ("policy.rule.delete", 404),
        ("policy.put", 401),
    ]
    put_rec, create_rec, update_rec, delete_rec, back_rec, *_ = records
    assert put_rec["before"] == 0 and put_rec["after"] == put.json()["revision"]
    assert create_rec["rule"] == new_id and create_rec["after"] == created.json()["revision"]
    assert create_rec["before"] == put.json()["revision"]
    assert update_rec["rule"] == "a" and update_rec["after"] == updated.json()["revision"]
    assert delete_rec["rule"] == new_id and delete_rec["after"] == int(
        deleted.headers["etag"].strip('"')
    )
    assert back_rec["to"] == put.json()["revision"] and back_rec["after"] == back.json()["revision"]
    assert records[6]["rule"] == "ghost"
    assert all("applied" in r for r in records[:5])
