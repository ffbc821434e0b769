"""The ops views in a real browser against a real ``proxyfleet up``: the config editor (field
errors in place, nothing written; save, history, rollback, compare), replicas (stop/start
from the page, live charts computed from the flow stream), the event log arriving live,
API keys (secret shown once, revoke), what a read key may not do, and hostile values shown
as text."""

from __future__ import annotations

import json
import random
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, expect

from tests.browser.conftest import sign_in, through_proxy
from tests.e2e.system import System


def _headers(system: System, key: str | None = None) -> dict[str, str]:
    return {"X-API-Key": key or system.key}


async def _config(system: System) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        got = await client.get(f"{system.api}/api/config", headers=_headers(system))
    assert got.status_code == 200, got.text
    return dict(got.json())


@pytest.fixture
async def saved_config(system: System) -> AsyncIterator[dict[str, Any]]:
    """The config as it was; written back afterwards whatever the test changed."""
    before = await _config(system)
    try:
        yield before
    finally:
        async with httpx.AsyncClient() as client:
            put = await client.put(
                f"{system.api}/api/config", headers=_headers(system), json=before["config"]
            )
        assert put.status_code == 200, put.text


async def _edit(page: Page, change: dict[str, Any]) -> None:
    """Change fields of the document in the editor, as typed JSON."""
    doc = json.loads(await page.input_value("#config-editor"))
    doc.update(change)
    await page.fill("#config-editor", json.dumps(doc, indent=2))


async def _open_config(page: Page, system: System) -> None:
    await sign_in(page, system, target="/ui/config")
    await expect(page.locator("#config-revision")).to_have_attribute(
        "data-revision", re.compile(r"^\d+$")
    )
    await expect(page.locator("#config-fields li").first).to_be_visible()


async def test_config_field_error_in_place_save_history_rollback_compare(
    page: Page, system: System, saved_config: dict[str, Any]
) -> None:
    await _open_config(page, system)
    save = page.get_by_role("button", name="Save", exact=True)

    # an invalid value: the error is next to the editor, at its field; nothing is written
    await _edit(page, {"capture_body_limit": -1})
    await save.click()
    field = page.locator('#config-fields li[data-field="capture_body_limit"]')
    await expect(field.locator(".field-error")).to_contain_text("greater than or equal to 0")
    await expect(page.locator("#config-editor")).to_have_attribute("aria-invalid", "true")
    await expect(page.locator("#config-errors")).to_contain_text("capture_body_limit")
    assert await _config(system) == saved_config

    # two valid saves, each in the history with who wrote it
    first, second = random.randint(10_000, 99_999), random.randint(100_000, 999_999)
    revisions = []
    for value in (first, second):
        await _edit(page, {"capture_body_limit": value})
        await save.click()
        await expect(page.locator("#saved")).to_be_visible()
        now = await _config(system)
        assert now["config"]["capture_body_limit"] == value
        await expect(page.locator("#config-revision")).to_have_text(f"revision {now['revision']}")
        revisions.append(now["revision"])
    await expect(page.locator("#rollout .applied")).to_contain_text("applied (1)")
    row = page.locator(f'#history-rows tr[data-revision="{revisions[1]}"]')
    await expect(row.locator("td.who")).to_contain_text("local")
    await expect(row).to_contain_text("capture_body_limit")  # what changed in it
    # the diff of the two revisions, field by field
    await row.get_by_role("button", name="Diff").click()
    diff = page.locator('#diff tr[data-field="capture_body_limit"]')
    await expect(diff.locator("td.old")).to_have_text(str(first))
    await expect(diff.locator("td.new")).to_have_text(str(second))

    # roll back to the first: the server runs it again, as a new revision
    old = page.locator(f'#history-rows tr[data-revision="{revisions[0]}"]')
    await old.get_by_role("button", name="Roll back to this").click()
    await expect(page.locator("#saved")).to_contain_text(f"Revision {revisions[0]}'s document")
    now = await _config(system)
    assert now["config"]["capture_body_limit"] == first and now["revision"] > revisions[1]
    await expect(
        page.locator(f'#history-rows tr[data-revision="{now["revision"]}"]')
    ).to_be_visible()
    await expect(page.locator("#in-sync")).to_have_text("in sync", timeout=10_000)
    await expect(page.locator('#compare-rows tr[data-state="applied"]')).to_have_count(1)

    # someone else saves meanwhile: a stale save says so and offers a reload
    async with httpx.AsyncClient() as client:
        patched = await client.patch(
            f"{system.api}/api/config",
            headers=_headers(system),
            json={"capture_body_limit": second},
        )
    assert patched.status_code == 200, patched.text
    await _edit(page, {"capture_body_limit": 4321})
    await save.click()
    await expect(page.locator("#stale")).to_contain_text("since you loaded it")
    assert (await _config(system))["config"]["capture_body_limit"] == second
    await page.locator("#stale").get_by_role("button", name="Reload").click()
    await expect(page.locator("#config-revision")).to_have_text(
        f"revision {patched.json()['revision']}"
    )
    assert json.loads(await page.input_value("#config-editor"))["capture_body_limit"] == second


async def test_replica_listed_stopped_and_started_from_the_page(page: Page, system: System) -> None:
    await sign_in(page, system, target="/ui/replicas")
    card = page.locator("article.replica")
    await expect(card).to_have_count(1)
    await expect(card).to_have_attribute("data-state", "running")
    await expect(card.locator(".listen")).to_have_text(system.proxy.removeprefix("http://"))
    await expect(page.locator("#fleet-state")).to_have_text("running")
    try:
        await card.locator("input.deadline").fill("0")
        await card.get_by_role("button", name="Stop", exact=True).click()
        await expect(page.locator("#action-result")).to_contain_text("stop")
        await expect(card).to_have_attribute("data-state", "stopped", timeout=10_000)
        await expect(page.locator("#fleet-state")).to_have_text("stopped")
        with pytest.raises(httpx.TransportError):  # nothing listens: refused
            await through_proxy(system, "http://127.0.0.1:9/")
        await card.get_by_role("button", name="Start", exact=True).click()
        await expect(card).to_have_attribute("data-state", "running", timeout=10_000)
    finally:
        async with httpx.AsyncClient(timeout=30) as client:
            started = await client.post(
                f"{system.api}/api/proxy/start", headers=_headers(system), json={}
            )
        assert started.status_code == 200, started.text
    await expect(page.locator("#fleet-state")).to_have_text("running")


async def test_replica_charts_count_the_live_flows(page: Page, system: System, site: str) -> None:
    await sign_in(page, system, target="/ui/replicas")
    await expect(page.locator("#live-state")).to_have_text("live")
    rate = page.locator("article.replica svg.rate")
    latency = page.locator("article.replica svg.latency")
    await expect(rate).to_have_attribute("data-total", "0")
    tag = uuid.uuid4().hex[:8]
    for code in (200, 200, 200, 503, 503):
        assert await through_proxy(system, f"{site}/status/{code}/chart-{tag}") == code
    await expect(rate).to_have_attribute("data-total-2xx", "3", timeout=10_000)
    await expect(rate).to_have_attribute("data-total-5xx", "2")
    await expect(rate).to_have_attribute("data-total-error", "0")
    await expect(rate).to_have_attribute("data-total", "5")
    assert int(await rate.get_attribute("data-points") or 0) >= 1
    assert await rate.locator("rect").count() >= 2  # green and red stacked, at least
    await expect(latency).to_have_attribute("data-samples", "5")
    assert float(await latency.get_attribute("data-p95") or "nan") >= 0
    assert await latency.locator("path.p50").count() == 1
    await expect(page.locator("article.replica .rate-note")).to_contain_text("5xx 2")


async def test_a_config_change_shows_up_live_in_the_events(
    page: Page, system: System, saved_config: dict[str, Any]
) -> None:
    await sign_in(page, system, target="/ui/events")
    await expect(page.locator("#live-state")).to_have_text("live")
    value = random.randint(10_000, 99_999)
    async with httpx.AsyncClient() as client:
        patched = await client.patch(
            f"{system.api}/api/config",
            headers=_headers(system),
            json={"capture_body_limit": value},
        )
    assert patched.status_code == 200, patched.text
    revision = patched.json()["revision"]
    applied = page.locator(
        '#event-rows tr[data-type="config_applied"]', has_text=f"revision={revision}"
    )
    await expect(applied).to_have_count(1, timeout=10_000)  # without a reload
    audit = page.locator('#event-rows tr[data-type="audit"]', has_text="config.patch").first
    await expect(audit).to_contain_text("status=200")
    await audit.locator("td.data").click()  # expands to the whole event as JSON
    await expect(audit.locator("pre.json")).to_contain_text(f'"after": {revision}')

    # filters: only warnings and up, only one type
    await page.select_option("#event-severity", "warning")
    await expect(page.locator('#event-rows tr[data-severity="info"]')).to_have_count(0)
    await page.select_option("#event-severity", "")
    await page.fill("#event-type", "config_applied")
    await page.press("#event-type", "Enter")
    assert "type=config_applied" in page.url
    rows = page.locator("#event-rows tr")
    await expect(rows.first).to_have_attribute("data-type", "config_applied")
    types = await rows.evaluate_all("rs => [...new Set(rs.map(r => r.dataset.type))]")
    assert types == ["config_applied"]


async def test_create_a_key_see_its_secret_once_and_revoke_it(page: Page, system: System) -> None:
    await sign_in(page, system, target="/ui/keys")
    configured = page.locator('#key-rows tr[data-source="settings"]')
    await expect(configured.first).to_contain_text("remove it there")
    await expect(configured.get_by_role("button", name="Revoke")).to_have_count(0)
    name = f"ci-{uuid.uuid4().hex[:8]}"
    await page.select_option("#key-scope", "read")
    await page.fill("#key-name", name)
    await page.get_by_role("button", name="Create key").click()
    secret = (await page.locator("#secret").inner_text()).strip()
    await expect(page.locator("#new-key")).to_contain_text("shown this once")
    row = page.locator("#key-rows tr", has_text=name)
    await expect(row).to_have_count(1)
    key_id = await row.get_attribute("data-key")
    async with httpx.AsyncClient() as client:
        read = await client.get(f"{system.api}/api/flows?limit=1", headers=_headers(system, secret))
        write = await client.post(
            f"{system.api}/api/proxy/stop", headers=_headers(system, secret), json={}
        )
    assert read.status_code == 200 and write.status_code == 403, (read.text, write.text)

    await page.reload()  # shown once: never again
    await expect(row).to_have_count(1)
    assert secret not in await page.content()

    await row.get_by_role("button", name="Revoke").click()
    await row.get_by_role("button", name=f"Revoke {key_id} now").click()
    await expect(page.locator("#revoked")).to_contain_text(str(key_id))
    await expect(page.locator("#key-rows tr", has_text=name)).to_have_count(0)
    async with httpx.AsyncClient() as client:
        refused = await client.get(
            f"{system.api}/api/flows?limit=1", headers=_headers(system, secret)
        )
    assert refused.status_code == 401


ACTIONS = {
    "config": ["Save", "Roll back to this"],
    "replicas": ["Start all", "Stop all", "Start", "Stop"],
    "events": [],
    "keys": ["Create key", "Revoke"],
}


async def test_a_read_key_sees_the_ops_views_and_cannot_act(
    page: Page, system: System, saved_config: dict[str, Any]
) -> None:
    async with httpx.AsyncClient() as client:
        # two revisions at least, so that the history offers a rollback
        for value in (11_111, 22_222):
            put = await client.patch(
                f"{system.api}/api/config",
                headers=_headers(system),
                json={"capture_body_limit": value},
            )
            assert put.status_code == 200, put.text
        made = await client.post(
            f"{system.api}/api/keys",
            headers=_headers(system),
            json={"scope": "read", "name": "ops-viewer"},
        )
    assert made.status_code == 201, made.text
    try:
        await sign_in(page, system, key=made.json()["secret"], target="/ui/config")
        await expect(page.locator("#scope")).to_have_text("read")
        for view, names in ACTIONS.items():
            await page.goto(f"{system.api}/ui/{view}")
            await expect(page.locator("#app > section").first).to_be_visible()
            if view == "config":
                await expect(page.locator("#history-rows tr").nth(1)).to_be_visible()
                assert await page.locator("#config-editor").evaluate("e => e.readOnly")
            if view == "replicas":
                await expect(page.locator("article.replica")).to_have_count(1)
            if view == "keys":
                await expect(
                    page.locator('#key-rows tr[data-source="runtime"]').first
                ).to_be_visible()
            if view == "events":
                await expect(page.locator("#event-rows tr").first).to_be_visible()
            for name in names:
                buttons = page.get_by_role("button", name=name, exact=True)
                assert await buttons.count() >= 1, (view, name)
                for i in range(await buttons.count()):
                    await expect(buttons.nth(i)).to_be_disabled()
                    await expect(buttons.nth(i)).to_have_attribute("title", "needs an admin key")
            # nothing else on the page acts: every enabled button is a read
            enabled = await page.locator("#app button:enabled").all_inner_texts()
            assert not {t.strip() for t in enabled} & {
                "Save", "Start all", "Stop all", "Start", "Stop", "Create key", "Revoke",
                "Roll back to this",
            }, (view, enabled)  # fmt: skip
    finally:
        async with httpx.AsyncClient() as client:
            await client.delete(
                f"{system.api}/api/keys/{made.json()['id']}", headers=_headers(system)
            )


HOSTILE = "<img src=x onerror=window.__pwned=1>"


async def test_hostile_event_and_config_values_render_as_text(
    page: Page, system: System, saved_config: dict[str, Any]
) -> None:
    await sign_in(page, system, target="/ui/events")
    await expect(page.locator("#live-state")).to_have_text("live")
    async with httpx.AsyncClient() as client:  # the audit event records the path as sent
        bad = await client.delete(f"{system.api}/api/keys/{HOSTILE}", headers=_headers(system))
    assert bad.status_code == 422
    row = page.locator('#event-rows tr[data-type="audit"]', has_text="key.revoke").first
    await expect(row).to_contain_text(HOSTILE, timeout=10_000)  # text, not an element
    await row.locator("td.data").click()
    await expect(row.locator("pre.json")).to_contain_text(HOSTILE)
    assert await page.locator("#event-rows img").count() == 0
    await page.reload()  # and from the listing
    await expect(page.locator("#event-rows tr", has_text=HOSTILE).first).to_be_visible()
    assert await page.locator("#event-rows img").count() == 0

    await page.goto(f"{system.api}/ui/config")
    await expect(page.locator("#config-fields li").first).to_be_visible()
    await _edit(page, {"redact_headers": [HOSTILE], HOSTILE: 1})
    await page.get_by_role("button", name="Save", exact=True).click()
    errors = page.locator("#config-errors")
    await expect(errors).to_contain_text("invalid header name")
    await expect(errors).to_contain_text(HOSTILE)
    await expect(page.locator("#config-fields li", has_text=HOSTILE).first).to_be_visible()
    assert await page.locator("#app img").count() == 0
    assert await page.evaluate("window.__pwned") is None
    assert await _config(system) == saved_config
