"""The views that act on traffic, in a real browser against a real fleet: an intercept
rule added through the rules editor holds real requests, which are approved, allowed once,
denied and modified from the intercept queue; rule edits with a bad filter are refused in
place; a read key sees everything and can press nothing; held markup stays text."""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from playwright.async_api import Locator, Page, expect

from tests.browser.conftest import sign_in
from tests.e2e.system import System

SHOTS = os.environ.get("FLEET_UI_SHOTS")  # a folder: screenshots of the views as tested
HOLD = 60.0  # seconds an intercept rule holds (on_timeout deny): well past any test step


async def shot(page: Page, name: str) -> None:
    if SHOTS:
        await page.screenshot(path=f"{SHOTS}/{name}.png", full_page=True)


def admin(system: System) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=system.api, headers={"X-API-Key": system.key}, timeout=30)


@pytest.fixture
async def api(system: System) -> AsyncIterator[httpx.AsyncClient]:
    async with admin(system) as client:
        yield client


@pytest.fixture
async def rules_made(api: httpx.AsyncClient) -> AsyncIterator[list[str]]:
    """Rule ids a test adds (through the UI or not): deleted afterwards, whatever happens,
    and what they still hold denied."""
    made: list[str] = []
    try:
        yield made
    finally:
        for rule_id in made:
            await api.delete(f"/api/policy/rules/{rule_id}")
        held = (await api.get("/api/approvals/pending/list")).json()["pending"]
        for approval in held:
            if approval["rule"] in made:
                await api.post(f"/api/approvals/pending/{approval['id']}/deny", json={})


async def add_rule(api: httpx.AsyncClient, made: list[str], rule: dict[str, Any]) -> None:
    made.append(rule["id"])
    r = await api.post("/api/policy/rules", json=rule)
    assert r.status_code == 201, r.text


def intercept_rule(rule_id: str, filter_: str) -> dict[str, Any]:
    return {
        "id": rule_id,
        "match": {"filter": filter_},
        "action": {"type": "intercept", "timeout_s": HOLD, "on_timeout": "deny"},
    }


def in_background(system: System, url: str, **kw: Any) -> asyncio.Task[httpx.Response]:
    """A request through the proxy that waits (held) while the test goes on."""

    async def send() -> httpx.Response:
        async with httpx.AsyncClient(proxy=system.proxy, timeout=HOLD + 15) as client:
            return await client.get(url, **kw)

    return asyncio.create_task(send())


def held_card(page: Page, text: str) -> Locator:
    return page.locator("article.held", has_text=text)


async def open_intercept(page: Page, system: System) -> None:
    await page.goto(f"{system.api}/ui/intercept")
    await expect(page.locator("#live-state")).to_have_text("live")


async def test_intercept_rule_from_the_editor_then_approve_allow_deny_modify(
    page: Page, system: System, site: str, api: httpx.AsyncClient, rules_made: list[str]
) -> None:
    tag = uuid.uuid4().hex[:10]
    rule_id = f"hold-{tag}"
    rules_made.append(rule_id)
    await sign_in(page, system, target="/ui/rules")
    # the rule through the UI's editor: the form, the action's template, then saved
    await page.click("#add-rule")
    await page.fill("#rule-id", rule_id)
    await page.fill("#rule-filter", f"~u held-{tag}")
    await page.fill("#rule-description", "held for a person")
    await page.select_option("#rule-action-type", "intercept")
    assert json.loads(await page.input_value("#rule-action"))["type"] == "intercept"
    await page.fill(
        "#rule-action",
        json.dumps({"type": "intercept", "timeout_s": HOLD, "on_timeout": "deny"}),
    )
    await shot(page, "rules-editor-new")
    await page.click("#rule-save")
    row = page.locator(f"#rule-rows tr[data-id='{rule_id}']")
    await expect(row).to_have_count(1)
    await expect(row.locator("td.action")).to_have_text(f"intercept {HOLD:g}s, then deny")
    saved = (await api.get(f"/api/policy/rules/{rule_id}")).json()
    assert saved["match"]["filter"] == f"~u held-{tag}"
    assert saved["action"] == {"type": "intercept", "timeout_s": HOLD, "on_timeout": "deny"}

    await open_intercept(page, system)
    # approve: the client gets its answer, the approval is cached for that URL
    approved = in_background(system, f"{site}/json/held-{tag}-a?x=1")
    card = held_card(page, f"/json/held-{tag}-a")
    await expect(card).to_have_count(1, timeout=15_000)  # arrived live, no reload
    await expect(card.locator(".rule")).to_have_text(rule_id)
    await expect(card.locator(".countdown")).to_have_text(re.compile(r"^(1m 00s|\d+s)$"))
    await card.locator("details.request-headers summary").click()
    await expect(card.locator("table.headers")).to_contain_text("User-Agent")
    await shot(page, "intercept-one-held")
    await card.locator("input.ttl").fill("600")
    await card.get_by_role("button", name="Approve").click()
    assert (await approved).status_code == 200
    await expect(card).to_have_count(0)
    cached = page.locator("#cached-rows tr", has_text=f"/json/held-{tag}-a")
    await expect(cached).to_have_count(1)
    await expect(cached).not_to_contain_text("?x=1")  # cached without the query string
    # a cached approval lets the same URL pass (any query string) without being held
    async with httpx.AsyncClient(proxy=system.proxy, timeout=15) as client:
        assert (await client.get(f"{site}/json/held-{tag}-a?x=2")).status_code == 200

    # allow once
    once = in_background(system, f"{site}/json/held-{tag}-b")
    card = held_card(page, f"/json/held-{tag}-b")
    await expect(card).to_have_count(1, timeout=15_000)
    await card.get_by_role("button", name="Allow once").click()
    assert (await once).status_code == 200
    await expect(card).to_have_count(0)

    # deny, with the status and body the client gets instead
    denied = in_background(system, f"{site}/json/held-{tag}-c")
    card = held_card(page, f"/json/held-{tag}-c")
    await expect(card).to_have_count(1, timeout=15_000)
    await card.get_by_role("button", name="Deny…").click()
    await card.locator("input[name=status]").fill("451")
    await card.locator("textarea[name=body]").fill("not today")
    await card.get_by_role("button", name="Send deny").click()
    answer = await denied
    assert (answer.status_code, answer.text) == (451, "not today")
    await expect(card).to_have_count(0)

    # modify: a bad URL is refused in place (still held), then the path is changed
    modified = in_background(system, f"{site}/json/held-{tag}-d", headers={"X-Keep": "1"})
    card = held_card(page, f"/json/held-{tag}-d")
    await expect(card).to_have_count(1, timeout=15_000)
    await card.get_by_role("button", name="Modify…").click()
    await card.locator("input[name=url]").fill("not a url")
    await card.get_by_role("button", name="Send modified").click()
    url_error = card.locator(".field-error[data-field='body.request.url']")
    await expect(url_error).to_contain_text("URL")
    await expect(card.locator("input[name=url]")).to_have_attribute("aria-invalid", "true")
    await shot(page, "intercept-modify-error")
    await card.locator("input[name=url]").fill(f"{site}/json/modified-{tag}")
    await card.get_by_role("button", name="+ header").click()
    await card.locator(".header-row input.hname").last.fill("X-Added")
    await card.locator(".header-row input.hvalue").last.fill("yes")
    await card.get_by_role("button", name="Send modified").click()
    answer = await modified
    assert answer.status_code == 200
    assert answer.json()["path"] == f"/json/modified-{tag}"  # what the upstream was asked
    await expect(card).to_have_count(0)

    # resolved elsewhere (another browser, the CLI): the card goes away here too
    other = in_background(system, f"{site}/json/held-{tag}-e")
    card = held_card(page, f"/json/held-{tag}-e")
    await expect(card).to_have_count(1, timeout=15_000)
    approval_id = await card.get_attribute("data-id")
    r = await api.post(f"/api/approvals/pending/{approval_id}/allow-once")
    assert r.status_code == 200, r.text
    await expect(card).to_have_count(0)
    assert (await other).status_code == 200
    await expect(page.locator("#notice")).to_contain_text(f"held-{tag}-e")

    # forget the cached approval: gone from the list and from the server
    await cached.get_by_role("button", name="Forget").click()
    await expect(cached).to_have_count(0)
    left = (await api.get("/api/approvals/cached")).json()["cached"]
    assert not [c for c in left if c["rule"] == rule_id]


async def test_edit_a_rule_errors_in_place_then_saved_and_toggled(
    page: Page, system: System, api: httpx.AsyncClient, rules_made: list[str]
) -> None:
    tag = uuid.uuid4().hex[:10]
    rule_id = f"tag-{tag}"
    good = f"~u never-{tag}"
    await add_rule(
        api,
        rules_made,
        {"id": rule_id, "match": {"filter": good}, "action": {"type": "tag", "tags": [tag]}},
    )
    await sign_in(page, system, target="/ui/rules")
    row = page.locator(f"#rule-rows tr[data-id='{rule_id}']")
    await expect(row.locator("td.filter")).to_have_text(good)
    await expect(row.locator("td.action")).to_have_text(f"tag {tag}")
    revision = (await api.get("/api/policy")).json()["revision"]
    await expect(page.locator("#policy-revision")).to_have_text(f"revision {revision}")

    await row.get_by_role("button", name="Edit").click()
    await expect(page.locator("#rule-id")).to_have_value(rule_id)
    bad = f"~u edited-{tag} & (~d"
    await page.fill("#rule-filter", bad)
    await page.click("#rule-save")
    error = page.locator("#rule-filter-error")
    await expect(error).to_be_visible()
    caret_line = (await error.locator("pre.caret").inner_text()).splitlines()[1]
    assert caret_line.index("^") == len(bad)  # at the end: something is missing there
    assert await error.get_attribute("data-position") == str(len(bad))
    await expect(page.locator("#rule-errors")).to_contain_text("POLICY_INVALID")
    await expect(page.locator("#rule-filter")).to_have_attribute("aria-invalid", "true")
    await shot(page, "rules-filter-error")
    on_server = (await api.get(f"/api/policy/rules/{rule_id}")).json()
    assert on_server["match"]["filter"] == good  # nothing was saved
    assert (await api.get("/api/policy")).json()["revision"] == revision

    # a response operator in a request-phase rule: refused where it is too
    await page.fill("#rule-filter", f"~u edited-{tag} & ~c 200")
    await page.click("#rule-save")
    await expect(error.locator("pre.caret")).to_contain_text("~c")
    assert await error.get_attribute("data-position") == str(len(f"~u edited-{tag} & "))

    # fixed: saved, the editor closes, the list and the server agree
    await page.fill("#rule-filter", f"~u edited-{tag}")
    await page.click("#rule-save")
    await expect(page.locator("#rule-editor")).to_be_hidden()
    await expect(row.locator("td.filter")).to_have_text(f"~u edited-{tag}")
    on_server = (await api.get(f"/api/policy/rules/{rule_id}")).json()
    assert on_server["match"]["filter"] == f"~u edited-{tag}"
    assert on_server["action"] == {"type": "tag", "tags": [tag]}

    # the whole rule as JSON: a bad field is refused and named, nothing saved
    await row.get_by_role("button", name="Edit").click()
    await page.click("#rule-mode")
    doc = json.loads(await page.input_value("#rule-json"))
    assert doc["id"] == rule_id
    doc["priority"] = "high"
    await page.fill("#rule-json", json.dumps(doc))
    await page.click("#rule-save")
    await expect(page.locator("#rule-errors")).to_contain_text("body.priority")
    await shot(page, "rules-json-error")
    await page.click("#rule-cancel")
    assert (await api.get(f"/api/policy/rules/{rule_id}")).json()["priority"] == 0

    # disable, enable: the toggle says what the server says
    toggle = row.locator("td.on button")
    await expect(toggle).to_have_attribute("aria-pressed", "true")
    await toggle.click()
    await expect(row).to_have_attribute("data-enabled", "false")
    await expect(toggle).to_have_attribute("aria-pressed", "false")
    assert (await api.get(f"/api/policy/rules/{rule_id}")).json()["enabled"] is False
    await shot(page, "rules-list")
    await toggle.click()
    await expect(row).to_have_attribute("data-enabled", "true")
    assert (await api.get(f"/api/policy/rules/{rule_id}")).json()["enabled"] is True

    # history: the revisions this test wrote are listed
    await page.click("#history-toggle")
    now = (await api.get("/api/policy")).json()["revision"]
    await expect(page.locator(f"#policy-history tr[data-revision='{now}']")).to_contain_text(
        "current"
    )
    await shot(page, "rules-history")

    # delete (pressed twice)
    await row.get_by_role("button", name="Delete").click()
    await row.get_by_role("button", name="Really delete?").click()
    await expect(row).to_have_count(0)
    assert (await api.get(f"/api/policy/rules/{rule_id}")).status_code == 404


async def test_a_read_key_sees_the_queue_and_rules_and_cannot_act(
    page: Page, system: System, site: str, api: httpx.AsyncClient, rules_made: list[str]
) -> None:
    tag = uuid.uuid4().hex[:10]
    rule_id = f"ro-{tag}"
    await add_rule(api, rules_made, intercept_rule(rule_id, f"~u ro-{tag}"))
    made = await api.post("/api/keys", json={"scope": "read", "name": f"viewer-{tag}"})
    assert made.status_code == 201, made.text
    held = in_background(system, f"{site}/json/ro-{tag}")
    await sign_in(page, system, key=made.json()["secret"], target="/ui/intercept")
    await expect(page.locator("#scope")).to_have_text("read")
    await expect(page.locator("#live-state")).to_have_text("live")
    card = held_card(page, f"/json/ro-{tag}")
    await expect(card).to_have_count(1, timeout=15_000)
    approval_id = await card.get_attribute("data-id")
    buttons = card.locator(".held-actions button")
    assert await buttons.count() == 4
    for i in range(4):
        await expect(buttons.nth(i)).to_be_disabled()
    await expect(card.locator("input.ttl")).to_be_disabled()
    await expect(page.locator("#forget-all")).to_be_disabled()
    await card.locator("details.request-headers summary").click()
    await expect(card.locator("table.headers")).to_contain_text("User-Agent")
    await shot(page, "intercept-read-key")
    # and the API refuses anyway, CSRF token and all
    status = await page.evaluate(
        """async (id) => {
            const csrf = document.querySelector('meta[name="csrf-token"]').content;
            const r = await fetch(`/api/approvals/pending/${id}/allow-once`,
                {method: 'POST', headers: {'X-CSRF-Token': csrf}});
            return r.status;
        }""",
        approval_id,
    )
    assert status == 403

    await page.goto(f"{system.api}/ui/rules")
    row = page.locator(f"#rule-rows tr[data-id='{rule_id}']")
    await expect(row).to_have_count(1)
    await expect(row.locator("td.action")).to_have_text(f"intercept {HOLD:g}s, then deny")
    await expect(page.locator("#add-rule")).to_be_disabled()
    await expect(row.locator("td.on button")).to_be_disabled()
    for name in ("Edit", "Delete"):
        await expect(row.get_by_role("button", name=name, exact=True)).to_be_disabled()
    await page.click("#history-toggle")  # reading the history is fine
    await expect(page.locator("#policy-history table.history")).to_be_visible()

    r = await api.post(f"/api/approvals/pending/{approval_id}/deny", json={"status": 409})
    assert r.status_code == 200, r.text
    assert (await held).status_code == 409


async def test_held_markup_is_shown_as_text(
    page: Page, system: System, site: str, api: httpx.AsyncClient, rules_made: list[str]
) -> None:
    tag = uuid.uuid4().hex[:10]
    rule_id = f"evil-{tag}"
    await add_rule(api, rules_made, intercept_rule(rule_id, f"~u evil-{tag}"))
    markup = "<img src=x onerror=window.__pwned=1>"
    await sign_in(page, system, target="/ui/intercept")
    await expect(page.locator("#live-state")).to_have_text("live")
    held = in_background(
        system,
        f"{site}/json/evil-{tag}",
        params={"q": "<script>window.__pwned=2</script>"},
        headers={"X-Evil": markup, "X-Evil-2": "<svg onload=window.__pwned=3><b>bold</b>"},
    )
    card = held_card(page, f"/json/evil-{tag}")
    await expect(card).to_have_count(1, timeout=15_000)
    await card.locator("details.request-headers summary").click()
    evil = card.locator("table.headers tr", has_text="X-Evil")
    await expect(evil.first).to_contain_text(markup)  # the markup, as text
    await expect(card.locator("img, svg, script, b")).to_have_count(0)
    await card.get_by_role("button", name="Modify…").click()  # into inputs: values, not markup
    values = await card.locator(".header-row input.hvalue").evaluate_all(
        "els => els.map(e => e.value)"
    )
    assert markup in values
    await expect(card.locator("img, svg, script, b")).to_have_count(0)
    await shot(page, "intercept-hostile")
    assert await page.evaluate("window.__pwned") is None
    await card.get_by_role("button", name="Deny…").click()
    await card.get_by_role("button", name="Send deny").click()
    assert (await held).status_code == 403  # deny's default answer
    await expect(card).to_have_count(0)
    assert await page.evaluate("window.__pwned") is None


async def test_a_held_response_is_modified(
    page: Page, system: System, site: str, api: httpx.AsyncClient, rules_made: list[str]
) -> None:
    tag = uuid.uuid4().hex[:10]
    rule = intercept_rule(f"resp-{tag}", f"~u resp-{tag}")
    rule["match"]["phase"] = "response"
    await add_rule(api, rules_made, rule)
    await sign_in(page, system, target="/ui/intercept")
    await expect(page.locator("#live-state")).to_have_text("live")
    held = in_background(system, f"{site}/json/resp-{tag}")
    card = held_card(page, f"/json/resp-{tag}")
    await expect(card).to_have_count(1, timeout=15_000)
    await expect(card.locator(".phase-tag")).to_have_text("response")
    await expect(card.locator(".held-status .status")).to_have_text("200")
    await card.get_by_role("button", name="Modify…").click()
    await card.locator("input[name=status]").fill("202")
    await card.locator("textarea[name=body]").fill("changed by a person")
    await shot(page, "intercept-response-modify")
    await card.get_by_role("button", name="Send modified").click()
    answer = await held
    assert (answer.status_code, answer.text) == (202, "changed by a person")
    await expect(card).to_have_count(0)


async def test_a_rule_edit_over_a_change_made_meanwhile_is_refused_then_kept(
    page: Page, system: System, api: httpx.AsyncClient, rules_made: list[str]
) -> None:
    tag = uuid.uuid4().hex[:10]
    rule_id = f"race-{tag}"
    await add_rule(
        api,
        rules_made,
        {
            "id": rule_id,
            "match": {"filter": f"~u a-{tag}"},
            "action": {"type": "tag", "tags": [tag]},
        },
    )
    await sign_in(page, system, target="/ui/rules")
    row = page.locator(f"#rule-rows tr[data-id='{rule_id}']")
    await row.get_by_role("button", name="Edit").click()
    await page.fill("#rule-filter", f"~u mine-{tag}")
    # meanwhile, someone else changes the same rule
    theirs = (await api.get(f"/api/policy/rules/{rule_id}")).json()
    theirs["match"]["filter"] = f"~u theirs-{tag}"
    assert (await api.put(f"/api/policy/rules/{rule_id}", json=theirs)).status_code == 200
    await page.click("#rule-save")
    await expect(page.locator("#rule-errors")).to_contain_text("POLICY_CONFLICT")
    await expect(page.locator("#rule-stale")).to_be_visible()
    on_server = (await api.get(f"/api/policy/rules/{rule_id}")).json()
    assert on_server["match"]["filter"] == f"~u theirs-{tag}"  # not overwritten unseen
    await expect(row.locator("td.filter")).to_have_text(f"~u theirs-{tag}")  # shown now
    await expect(page.locator("#rule-filter")).to_have_value(f"~u mine-{tag}")  # edit kept
    await page.click("#rule-save")  # knowingly, over theirs
    await expect(page.locator("#rule-editor")).to_be_hidden()
    on_server = (await api.get(f"/api/policy/rules/{rule_id}")).json()
    assert on_server["match"]["filter"] == f"~u mine-{tag}"
