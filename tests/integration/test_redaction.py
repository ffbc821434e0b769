"""Secrets in proxied traffic are not recorded in clear (issue 7, item 10): real requests
through a replica, the events read off NATS, an in-process API publishing its key digests.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from pathlib import Path

import httpx
import orjson
import pytest

from libs.common import subjects
from libs.common.bus import Bus
from libs.common.models import RuntimeConfig
from libs.common.natsserver import EmbeddedNats
from services.proxy.redact import MARK
from tests.integration.conftest import MakeProxy
from tests.integration.harness import FlowEvents, raw_server
from tests.integration.test_control import eventually
from tests.unit.test_api_support import ADMIN_KEY, READ_KEY, api_client, api_settings

pytestmark = pytest.mark.timeout(60)


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer every request with secret-looking response headers; the body is the request
    head exactly as it arrived (what the upstream was sent)."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nSet-Cookie: session=s3cret\r\nX-Secret: resp-secret\r\n"
                b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(head) + head
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def _headers(event: dict, side: str) -> dict[str, list[str]]:  # type: ignore[type-arg]
    out: dict[str, list[str]] = {}
    for name, value in event[side]["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


async def test_default_redaction(restartable_nats: EmbeddedNats, make_proxy: MakeProxy) -> None:
    url = restartable_nats.url
    p = await make_proxy(nats_url=url)
    rec = FlowEvents()
    await rec.start(url, p.id)
    basic = "Basic " + base64.b64encode(b"user:pass").decode()
    try:
        async with raw_server(_answer) as port, httpx.AsyncClient(proxy=p.url) as client:
            resp = await client.get(
                f"http://127.0.0.1:{port}/d?q=1",
                headers={
                    "Proxy-Authorization": basic,
                    "Authorization": "Bearer abc.def",
                    "Cookie": "sid=1",
                    "X-Api-Key": "third-party-key",
                    "X-Other": "kept",
                },
            )
            assert resp.status_code == 200
            sent = resp.content.lower()
            assert b"proxy-authorization" not in sent  # hop-by-hop: consumed by the proxy
            assert b"authorization: bearer abc.def" in sent  # relayed untouched
        event = await rec.final_for("/d?q=1")
    finally:
        await rec.stop()
    req = _headers(event, "request")
    assert "proxy-authorization" not in req
    assert req["authorization"] == [MARK] and req["cookie"] == [MARK]
    assert req["x-api-key"] == [MARK] and req["x-other"] == ["kept"]
    resp_h = _headers(event, "response")
    assert resp_h["set-cookie"] == [MARK] and resp_h["x-secret"] == ["resp-secret"]
    raw = orjson.dumps([event["request"]["headers"], event["response"]["headers"], event["path"]])
    for secret in (b"abc.def", b"sid=1", b"third-party-key", b"s3cret", basic.encode()):
        assert secret not in raw


async def test_custom_list_and_api_keys_are_masked_even_when_not_listed(
    restartable_nats: EmbeddedNats, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    url = restartable_nats.url
    # authorization and x-api-key deliberately not listed
    p = await make_proxy(nats_url=url, redact_headers="Cookie,Set-Cookie,X-Secret")
    rec = FlowEvents()
    await rec.start(url, p.id)
    bus = await Bus.connect(url, "test", 5)
    admin = hashlib.sha256(ADMIN_KEY.encode()).digest()
    read = hashlib.sha256(READ_KEY.encode()).digest()
    try:
        async with api_client(api_settings(url, tmp_path / "api")):  # publishes its digests

            async def learned() -> bool:
                return {admin, read} <= p.ctx.capture.redaction.key_digests

            await eventually(learned, 10.0, "the replica learns the API's key digests")

        entries = await (await bus.keys_kv()).get(admin.hex())
        assert orjson.loads(entries.value) == {"id": "ops", "scope": "admin"}  # no key in clear

        async with raw_server(_answer) as port, httpx.AsyncClient(proxy=p.url) as client:
            target = f"http://127.0.0.1:{port}"
            headers = {
                "Proxy-Authorization": "Basic eDp5",
                "Authorization": f"Bearer {ADMIN_KEY}",
                "Cookie": "sid=1",
                "X-Secret": "req-secret",
            }
            assert (await client.get(f"{target}/k1", headers=headers)).status_code == 200
            headers = {"X-API-Key": READ_KEY, "Authorization": "Basic dTpw"}
            assert (await client.get(f"{target}/k2", headers=headers)).status_code == 200
            e1 = await rec.final_for("/k1")
            e2 = await rec.final_for("/k2")

            # a new config revision with another list: applied at serialisation from then on
            kv = await bus.config_kv()
            doc = RuntimeConfig(redact_headers=["x-other"])
            revision = await kv.put(subjects.CONFIG_KEY, doc.model_dump_json().encode())

            async def applied() -> bool:
                return bool(p.ctx.config.revision == revision)

            await eventually(applied, 5.0, "config revision applied")
            headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Cookie": "sid=2", "X-Other": "o"}
            assert (await client.get(f"{target}/k3", headers=headers)).status_code == 200
            e3 = await rec.final_for("/k3")
    finally:
        await rec.stop()
        await bus.close()

    r1 = _headers(e1, "request")
    assert "proxy-authorization" not in r1
    assert r1["authorization"] == [MARK]  # our admin key, though not in the list
    assert r1["cookie"] == [MARK] and r1["x-secret"] == [MARK]
    assert _headers(e1, "response")["x-secret"] == [MARK]
    assert _headers(e1, "response")["set-cookie"] == [MARK]
    r2 = _headers(e2, "request")
    assert r2["x-api-key"] == [MARK]  # our read key
    assert r2["authorization"] == ["Basic dTpw"]  # not listed, not one of our keys
    r3 = _headers(e3, "request")
    assert r3["authorization"] == [MARK] and r3["x-other"] == [MARK]
    assert r3["cookie"] == ["sid=2"]  # no longer listed
    assert _headers(e3, "response")["set-cookie"] == ["session=s3cret"]
    for event in (e1, e2, e3):  # bodies are out of scope (here: the echoed request head)
        shown = orjson.dumps({k: v for k, v in event.items() if k not in ("request", "response")})
        shown += orjson.dumps([event["request"]["headers"], event["response"]["headers"]])
        assert ADMIN_KEY.encode() not in shown and READ_KEY.encode() not in shown
