"""HAR export end to end: real traffic through a real proxy replica into a real store,
exported through the API in process, checked with the har-schema validator and the
spec's rules (``tests.unit.test_har.validate_har``); then thousands of hand-made flows
published straight into FLOWS, streamed back over many store pages."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from libs.common.bus import Bus
from services.api.routes.har import PAGE_FLOWS
from services.store import sqlite as sqlite_store
from tests.integration.coded import PNG, TEXT, coded_upstream
from tests.integration.conftest import MakeProxy
from tests.integration.harness import Upstream, free_port
from tests.integration.test_api import nats_url  # noqa: F401  (fixture: a NATS of its own)
from tests.integration.test_store import event, new_id, publish, rpc
from tests.unit.test_api_support import READ, eventually
from tests.unit.test_har import validate_har

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("store")]

ROOT = Path(__file__).resolve().parents[2]
# the project's venvs with mitmproxy (bench's, or the filter conformance oracle's)
MITM_PYTHON = next(
    (
        venv / "bin" / "python"
        for venv in (ROOT / "bench" / ".venv-mitm", ROOT / "tests" / "conformance" / ".venv-mitm")
        if (venv / "bin" / "python").exists()
    ),
    ROOT / "bench" / ".venv-mitm" / "bin" / "python",
)
BLOB = bytes(range(256)) * 2


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:  # noqa: F811
    b = await Bus.connect(nats_url, "har-test", timeout=5.0)
    await b.ensure_streams()
    try:
        yield b
    finally:
        await b.close()


async def export(api: httpx.AsyncClient, **params: Any) -> tuple[httpx.Response, dict[str, Any]]:
    resp = await api.get("/api/flows/har", params=params, headers=READ, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp, validate_har(resp.content)


async def record_traffic(proxy_url: str, upstream: Upstream, coded: str) -> None:
    """A gzip response, a binary response, a binary POST, a text PUT, two errors (the
    proxy's 502 for a dead upstream, a client that gave up waiting)."""
    async with httpx.AsyncClient(proxy=proxy_url, timeout=10) as client:
        assert (await client.get(f"{coded}/coded/gzip?lang=fr&x=1")).status_code == 200
        assert (await client.get(f"{coded}/png")).status_code == 200
        posted = await client.post(
            f"{coded}/raw-echo",
            content=BLOB,
            headers={"Content-Type": "application/octet-stream", "Cookie": "a=1; b=2"},
        )
        assert posted.status_code == 200 and posted.content == BLOB
        put = await client.put(
            f"{upstream.http}/echo/put", content=b"some text", headers={"Content-Type": "text/x"}
        )
        assert put.status_code == 200
        dead = await client.get(f"http://127.0.0.1:{free_port()}/nobody-home")
        assert dead.status_code == 502
    async with httpx.AsyncClient(proxy=proxy_url, timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get(f"{upstream.http}/slow?s=3")


async def wait_stored(api: httpx.AsyncClient, replica: str, n: int) -> list[dict[str, Any]]:
    async def probe() -> list[dict[str, Any]] | None:
        resp = await api.get("/api/flows", params={"replica": replica}, headers=READ)
        flows: list[dict[str, Any]] = resp.json()["flows"]
        done = [f for f in flows if f["state"] != "active"]
        return flows if len(done) == n else None

    found: list[dict[str, Any]] = await eventually(probe, 10.0, f"{n} final flows")
    return found


def by_path(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["request"]["url"].split("/", 3)[3].split("?")[0]: e for e in doc["log"]["entries"]}


async def test_export_of_real_traffic(
    api: httpx.AsyncClient, make_proxy: MakeProxy, upstream: Upstream
) -> None:
    proxy = await make_proxy(redact_headers="authorization")  # cookies recorded in clear
    async with coded_upstream() as coded:
        await record_traffic(proxy.url, upstream, coded)
    flows = await wait_stored(api, proxy.id, 6)
    resp, doc = await export(api, replica=proxy.id)
    assert resp.headers["content-disposition"] == 'attachment; filename="flows.har"'
    assert resp.headers["content-type"].startswith("application/json")
    entries = doc["log"]["entries"]
    assert [e["_flow_id"] for e in entries] == [f["id"] for f in flows]  # newest first
    assert doc["log"]["creator"]["name"] == "proxyfleet" and doc["log"]["pages"] == []
    e = by_path(doc)

    gz = e["coded/gzip"]
    assert gz["response"]["content"]["text"] == TEXT.decode()  # the coding undone
    assert gz["response"]["content"]["size"] == len(TEXT)
    assert gz["response"]["bodySize"] == len(gzip.compress(TEXT))  # the wire size
    assert gz["response"]["content"]["compression"] > 0
    assert {"name": "lang", "value": "fr"} in gz["request"]["queryString"]
    assert gz["serverIPAddress"] == "127.0.0.1" and gz["_replica"] == proxy.id

    png = e["png"]["response"]["content"]
    assert png["encoding"] == "base64" and base64.b64decode(png["text"]) == PNG
    assert png["mimeType"] == "image/png"

    post = e["raw-echo"]
    assert post["request"]["method"] == "POST" and "postData" not in post["request"]
    assert base64.b64decode(post["request"]["_postData"]["text"]) == BLOB
    assert post["request"]["bodySize"] == len(BLOB)
    assert post["request"]["cookies"] == [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]
    assert post["response"]["cookies"][0]["name"] == "sid"
    assert post["response"]["cookies"][0]["httpOnly"] is True
    assert base64.b64decode(post["response"]["content"]["text"]) == BLOB

    put = e["echo/put"]
    assert put["request"]["postData"] == {"mimeType": "text/x", "text": "some text"}
    assert json.loads(put["response"]["content"]["text"])["body"] == "some text"

    dead = e["nobody-home"]  # an error flow with the proxy's own 502 as its response
    assert dead["_state"] == "error" and dead["_error"] and dead["response"]["status"] == 502
    gone = e["slow"]  # the client gave up: an error flow without a response
    assert gone["_state"] == "error" and gone["_error"]
    assert gone["response"]["status"] == 0
    assert gone["response"]["content"] == {"size": 0, "mimeType": "x-unknown"}
    assert gone["time"] >= 200  # waited for the answer until the client left

    # filters are the listing's
    _, posts = await export(api, replica=proxy.id, method="post")
    assert [x["request"]["method"] for x in posts["log"]["entries"]] == ["POST"]
    _, posts = await export(api, replica=proxy.id, q="~m POST | ~u coded/gzip")
    assert sorted(x["request"]["method"] for x in posts["log"]["entries"]) == ["GET", "POST"]
    _, none = await export(api, replica=proxy.id, host="*.example.com")
    assert none["log"]["entries"] == []
    _, since = await export(api, replica=proxy.id, since="2999-01-01T00:00:00Z")
    assert since["log"]["entries"] == []
    for bad, field in (({"status": "abc"}, "query.status"), ({"limit": "5"}, "query.limit")):
        resp = await api.get("/api/flows/har", params=bad, headers=READ)
        assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == field
    resp = await api.get("/api/flows/har", params={"bogus": "1"}, headers=READ)
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "query.bogus"

    # one flow
    one = await api.get(f"/api/flows/{post['_flow_id']}/har", headers=READ)
    assert one.status_code == 200
    assert one.headers["content-disposition"] == f'attachment; filename="{post["_flow_id"]}.har"'
    single = validate_har(one.content)
    assert single["log"]["entries"] == [post]
    resp = await api.get(f"/api/flows/{post['_flow_id']}/har", params={"x": "1"}, headers=READ)
    assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "query.x"
    resp = await api.get("/api/flows/000000000000000000000000/har", headers=READ)
    assert resp.status_code == 404 and resp.json()["code"] == "FLOW_NOT_FOUND"


async def test_export_streams_thousands_of_flows_over_many_pages(
    api: httpx.AsyncClient, bus: Bus
) -> None:
    n = 3000
    ids = [new_id() for _ in range(n)]
    body = b"x" * 1500
    for i in range(0, n, 250):
        batch = [event(fid, "completed", replica="bulk", body=body) for fid in ids[i : i + 250]]
        await publish(bus, batch, replica="bulk")

    async def all_stored() -> bool:
        reply = await rpc(bus, "count", {"replica": "bulk"})
        return bool(reply["count"] == n)

    await eventually(all_stored, 30.0, f"{n} flows stored")
    started = time.perf_counter()
    resp = await api.get("/api/flows/har", params={"replica": "bulk"}, headers=READ, timeout=60)
    elapsed = time.perf_counter() - started
    assert resp.status_code == 200, resp.text
    doc = validate_har(resp.content)
    entries = doc["log"]["entries"]
    assert [e["_flow_id"] for e in entries] == sorted(ids, reverse=True)
    assert all(e["response"]["content"]["text"] == "x" * 1500 for e in entries)
    assert n > 3 * PAGE_FLOWS  # more pages than one
    print(
        f"\nHAR export: {n} flows, {len(resp.content) / 1e6:.1f} MB in {elapsed:.2f}s "
        f"= {n / elapsed:.0f} flows/s"
    )


@pytest.mark.parametrize("verb", ["export", "har"])
async def test_store_export_pages_end_at_the_reply_limit(
    bus: Bus, verb: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flows too big for one reply come over several pages, each under max_payload; also
    when the page is split over the ingest workers (small shares here, to split 25)."""
    monkeypatch.setattr(sqlite_store, "EXPORT_SPLIT_MIN", 4)
    big = os.urandom(600_000)  # ~800 KB in base64: an 8 MiB reply holds about ten
    ids = [new_id() for _ in range(25)]
    for fid in ids:
        await publish(bus, [event(fid, "completed", replica="huge", body=big)], replica="huge")

    async def all_stored() -> bool:
        return bool((await rpc(bus, "count", {"replica": "huge"}))["count"] == len(ids))

    await eventually(all_stored, 30.0, "big flows stored")
    seen: list[str] = []
    pages = 0
    cursor = None
    while True:
        msg = await bus.request(
            f"fleet.store.{verb}",
            orjson.dumps({"replica": "huge", "limit": 1000, "cursor": cursor}),
            timeout=10.0,
        )
        assert len(msg.data) <= bus.max_payload
        reply = orjson.loads(msg.data)
        pages += 1
        if verb == "export":
            for flow in reply["flows"]:
                assert base64.b64decode(flow["response"]["body_b64"]) == big
                seen.append(flow["id"])
        else:
            for entry in reply["entries"]:
                content = entry["response"]["content"]
                assert content["encoding"] == "base64"
                assert base64.b64decode(content["text"]) == big
                seen.append(entry["_flow_id"])
        cursor = reply["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True) and pages >= 3
    bad = await rpc(bus, verb, {"cursor": "!!"})
    assert bad["error"]["code"] == "BAD_QUERY" and bad["error"]["field"] == "cursor"


MITM_READER = """
import json, sys
from mitmproxy import io
out = []
with open(sys.argv[1], "rb") as f:
    for flow in io.FlowReader(f).stream():
        r = flow.response
        out.append({"method": flow.request.method, "url": flow.request.url,
                    "status": r.status_code if r else None,
                    "request_body": flow.request.get_content(strict=False).hex(),
                    "body": r.get_content(strict=False).hex() if r else None})
print(json.dumps(out))
"""


async def test_mitmproxy_reads_our_har(
    api: httpx.AsyncClient, make_proxy: MakeProxy, upstream: Upstream, tmp_path: Path
) -> None:
    if not MITM_PYTHON.exists():  # `make test` creates it (`make mitm`)
        pytest.fail("no venv with mitmproxy: run `make mitm`", pytrace=False)
    proxy = await make_proxy()
    async with coded_upstream() as coded:
        await record_traffic(proxy.url, upstream, coded)
    await wait_stored(api, proxy.id, 6)
    resp, doc = await export(api, replica=proxy.id)
    path = tmp_path / "flows.har"
    path.write_bytes(resp.content)
    child = await asyncio.create_subprocess_exec(
        str(MITM_PYTHON),
        "-c",
        MITM_READER,
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode == 0, err.decode()
    read = json.loads(out)
    assert len(read) == len(doc["log"]["entries"])
    for flow, e in zip(read, doc["log"]["entries"], strict=True):
        assert flow["method"] == e["request"]["method"]
        assert flow["url"] == e["request"]["url"]
        assert flow["status"] == e["response"]["status"]
        content = e["response"]["content"]
        text = content.get("text", "")
        want = base64.b64decode(text) if content.get("encoding") == "base64" else text.encode()
        assert bytes.fromhex(flow["body"]) == want, e["request"]["url"]
        post = e["request"].get("postData")
        if post is not None:  # text request bodies come back too (binary ones are ours only)
            assert bytes.fromhex(flow["request_body"]) == post["text"].encode()
    assert any("postData" in e["request"] for e in doc["log"]["entries"])
