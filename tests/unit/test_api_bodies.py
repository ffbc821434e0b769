"""Bodies: UTF-8 text inline, anything else base64, raw bytes with the recorded type."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from libs.common.bodies import decode_text, header, inline_body, render_flow
from libs.common.natsserver import EmbeddedNats
from tests.unit.test_api_support import READ, CannedStore, api_client, api_settings


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- pure functions -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "truncated", "expect"),
    [
        (b"", False, ""),
        (b"hello", False, "hello"),
        ("grüße €".encode(), False, "grüße €"),
        (b"\x00\x01 control chars are still text", False, "\x00\x01 control chars are still text"),
        (b"\xff\xfe\x00binary", False, None),
        (b"\x89PNG\r\n\x1a\n", False, None),
        ("abc€".encode()[:-1], True, "abc"),  # cut inside the last character
        ("abc€".encode()[:-1], False, None),  # not truncated: it is just not UTF-8
        (b"\xffabc", True, None),  # invalid in the middle stays binary
    ],
)
def test_decode_text(raw: bytes, truncated: bool, expect: str | None) -> None:
    assert decode_text(raw, truncated) == expect


def test_inline_body_utf8_and_base64() -> None:
    text = inline_body({"size": 5, "truncated": False, "body_b64": b64(b"hello"), "headers": []})
    assert text == {
        "size": 5,
        "truncated": False,
        "headers": [],
        "body": "hello",
        "encoding": "utf-8",
    }
    binary = inline_body({"size": 3, "truncated": False, "body_b64": b64(b"\xff\x00\xfe")})
    assert binary["encoding"] == "base64" and base64.b64decode(binary["body"]) == b"\xff\x00\xfe"
    assert "body_b64" not in binary
    active = inline_body({"size": 0, "truncated": False})
    assert active["body"] is None and active["encoding"] is None


def test_render_flow_keeps_everything_else() -> None:
    flow: dict[str, Any] = {
        "id": "f1",
        "state": "completed",
        "request": {
            "headers": [["Host", "x"]],
            "size": 2,
            "truncated": False,
            "body_b64": b64(b"{}"),
        },
        "response": None,
        "timings": {"start": 1.0},
        "tags": [],
    }
    out = render_flow(flow)
    assert out["request"]["body"] == "{}" and out["response"] is None
    assert out["timings"] == {"start": 1.0} and out["id"] == "f1"
    assert "body_b64" in flow["request"]  # the input is not modified


def test_header_lookup_is_case_insensitive_first_wins() -> None:
    pairs = [["X-A", "1"], ["content-type", "text/html"], ["Content-Type", "text/plain"]]
    assert header(pairs, "Content-Type") == "text/html"
    assert header(pairs, "missing") is None
    assert header(None, "x") is None


# -- through the API ------------------------------------------------------------------------
FLOW: dict[str, Any] = {
    "id": "018f00000000aaaaaa000001",
    "replica": "r1",
    "kind": "http",
    "state": "completed",
    "client": ["127.0.0.1", 50000],
    "server": ["127.0.0.1", 80],
    "scheme": "http",
    "method": "POST",
    "host": "example.com",
    "port": 80,
    "path": "/upload",
    "http_version": "HTTP/1.1",
    "request": {
        "headers": [["Host", "example.com"], ["Content-Type", "application/json"]],
        "size": 13,
        "truncated": False,
        "body_b64": b64(b'{"a": "\xc3\xa9"}'),
    },
    "response": {
        "status": 200,
        "reason": "OK",
        "http_version": "HTTP/1.1",
        "headers": [["Content-Type", "image/png"], ["Content-Encoding", "gzip"]],
        "size": 1000,
        "truncated": True,
        "body_b64": b64(b"\x89PNG\r\n\x1a\n"),
    },
    "timings": {"start": 1.0, "request_sent": 1.1, "first_byte": 1.2, "end": 1.3},
    "error": None,
    "stats": {},
    "trace_id": None,
    "tags": [],
}
NO_TYPE = {
    **FLOW,
    "id": "notype",
    "request": {"headers": [], "size": 3, "truncated": False, "body_b64": b64(b"abc")},
    "response": None,
}
ACTIVE = {
    **FLOW,
    "id": "active",
    "state": "active",
    "request": {"headers": [], "size": 0, "truncated": False},
    "response": None,
}


@pytest.fixture
async def client(
    restartable_nats: EmbeddedNats, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    flows = {f["id"]: f for f in (FLOW, NO_TYPE, ACTIVE)}

    async def answer(verb: str, body: dict[str, Any]) -> dict[str, Any]:
        if verb == "get" and body["id"] in flows:
            return {"flow": flows[body["id"]]}
        return {"error": {"code": "FLOW_NOT_FOUND", "message": "no such flow"}}

    store = await CannedStore(answer).start(restartable_nats.url)
    try:
        async with api_client(api_settings(restartable_nats.url, tmp_path)) as c:
            yield c
    finally:
        await store.stop()


async def test_get_flow_inlines_bodies(client: httpx.AsyncClient) -> None:
    resp = await client.get(f"/api/flows/{FLOW['id']}", headers=READ)
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    flow = resp.json()
    assert flow["request"]["body"] == '{"a": "é"}' and flow["request"]["encoding"] == "utf-8"
    assert flow["response"]["encoding"] == "base64"
    assert base64.b64decode(flow["response"]["body"]) == b"\x89PNG\r\n\x1a\n"
    assert flow["response"]["size"] == 1000 and flow["response"]["truncated"] is True
    assert flow["request"]["headers"][1] == ["Content-Type", "application/json"]
    assert flow["timings"]["first_byte"] == 1.2 and flow["client"] == ["127.0.0.1", 50000]


async def test_raw_bodies_with_recorded_content_type(client: httpx.AsyncClient) -> None:
    resp = await client.get(f"/api/flows/{FLOW['id']}/request/body", headers=READ)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    assert resp.content == b'{"a": "\xc3\xa9"}'
    resp = await client.get(f"/api/flows/{FLOW['id']}/response/body", headers=READ)
    assert resp.content == b"\x89PNG\r\n\x1a\n"
    assert resp.headers["content-type"] == "image/png"
    assert resp.headers["x-flow-body-size"] == "1000"
    assert resp.headers["x-flow-body-truncated"] == "true"
    assert resp.headers["x-flow-content-encoding"] == "gzip"
    assert "content-encoding" not in resp.headers  # bytes as recorded, not to be decoded
    assert resp.headers["x-content-type-options"] == "nosniff"
    resp = await client.get("/api/flows/notype/request/body", headers=READ)
    assert resp.headers["content-type"] == "application/octet-stream" and resp.content == b"abc"


async def test_missing_bodies_and_flows(client: httpx.AsyncClient) -> None:
    resp = await client.get("/api/flows/notype/response/body", headers=READ)
    assert resp.status_code == 404 and resp.json()["code"] == "BODY_NOT_AVAILABLE"
    resp = await client.get("/api/flows/active/request/body", headers=READ)
    assert resp.status_code == 404 and "still active" in resp.json()["detail"]
    flow = (await client.get("/api/flows/active", headers=READ)).json()
    assert flow["request"]["body"] is None and flow["request"]["encoding"] is None
    resp = await client.get("/api/flows/unknown/request/body", headers=READ)
    assert resp.status_code == 404 and resp.json()["code"] == "FLOW_NOT_FOUND"
