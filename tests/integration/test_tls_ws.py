"""HTTPS interception, upstream certificate verification, untouched tunnels (ignore_hosts)
and WebSocket relaying (ws:// and wss://), end to end with curl, httpx, aiohttp and a
hand-driven TLS client."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from cryptography import x509

from services.proxy.tls import CertificateAuthority
from tests.integration.conftest import MakeProxy, Watch
from tests.integration.harness import FlowEvents, ProxyUnderTest, Upstream

pytestmark = pytest.mark.timeout(30)


async def run_cmd(*args: str, timeout: float = 15.0) -> tuple[int, bytes, bytes]:
    """Run a program without blocking the loop (the proxy under test runs on it)."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out, err


def trusting(cafile: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cafile))


def b64(data: str) -> bytes:
    return base64.b64decode(data)


def ski(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def aki(cert: x509.Certificate) -> bytes | None:
    return cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier


def final_with(events: FlowEvents, **fields: Any) -> Awaitable[dict[str, Any]]:
    return events.wait_for(
        lambda e: e["event"] != "started" and all(e.get(k) == v for k, v in fields.items())
    )


# -- HTTPS interception ---------------------------------------------------------------------
async def test_curl_https_is_intercepted_and_recorded(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    rc, out, err = await run_cmd(
        "curl", "-sS", "--max-time", "10", "--cacert", str(proxy.ca_path), "-x", proxy.url,
        f"{upstream.https}/echo/x?q=1",
    )  # fmt: skip
    assert rc == 0, err.decode()
    body = orjson.loads(out)
    assert body["path"] == "/echo/x?q=1"
    assert body["method"] == "GET"

    event = await flows.final_for("/echo/x?q=1")
    assert event["event"] == "completed"
    assert event["state"] == "completed"
    assert event["kind"] == "http"
    assert event["scheme"] == "https"
    assert event["host"] == "127.0.0.1"
    assert event["port"] == upstream.https_port
    assert event["method"] == "GET"
    assert event["response"]["status"] == 200
    assert orjson.loads(b64(event["response"]["body_b64"])) == body
    assert event["response"]["size"] == len(out)
    assert event["request"]["size"] == 0
    assert event["error"] is None
    assert event["server"] == ["127.0.0.1", upstream.https_port]


async def test_httpx_https_post_and_keep_alive_inside_the_tunnel(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    payload = b"hello over tls " * 100
    async with httpx.AsyncClient(proxy=proxy.url, verify=trusting(proxy.ca_path)) as client:
        first = await client.post(f"{upstream.https}/echo/post", content=payload)
        second = await client.get(f"{upstream.https}/echo/again")
    assert first.status_code == 200
    assert first.json()["body"] == payload.decode()
    assert first.json()["method"] == "POST"
    assert second.status_code == 200
    assert second.json()["path"] == "/echo/again"

    post = await flows.final_for("/echo/post")
    get = await flows.final_for("/echo/again")
    assert post["scheme"] == get["scheme"] == "https"
    assert post["method"] == "POST"
    assert b64(post["request"]["body_b64"]) == payload
    assert post["request"]["size"] == len(payload)
    assert post["request"]["truncated"] is False
    assert post["response"]["status"] == 200
    assert orjson.loads(b64(post["response"]["body_b64"]))["body_len"] == len(payload)
    # Both requests went through one CONNECT tunnel: same client connection.
    assert post["client"] == get["client"]


async def test_request_sent_with_the_tls_finished_message(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    """aiohttp writes its first request in the same segment as its TLS 1.3 Finished, so
    the decrypted request reaches the proxy before ``start_tls()`` has returned."""
    connector = aiohttp.TCPConnector(force_close=True)  # a new tunnel for each request
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(3):
            async with session.get(
                f"{upstream.https}/echo/early{i}", proxy=proxy.url, ssl=trusting(proxy.ca_path)
            ) as resp:
                assert resp.status == 200
                assert (await resp.json())["path"] == f"/echo/early{i}"
    event = await flows.final_for("/echo/early0")
    assert event["scheme"] == "https"
    assert event["response"]["status"] == 200


async def test_curl_without_the_proxy_ca_fails_and_is_recorded(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    rc, _, err = await run_cmd(
        "curl", "-sS", "--max-time", "10", "-x", proxy.url, f"{upstream.https}/echo/untrusted"
    )  # fmt: skip
    assert rc == 60, err.decode()  # CURLE_PEER_FAILED_VERIFICATION
    assert b"certificate" in err.lower()

    event = await flows.wait_for(
        lambda e: e["event"] != "started" and "TLS handshake" in (e["error"] or "")
    )
    assert event["state"] == "error"
    assert event["host"] == "127.0.0.1"
    assert event["port"] == upstream.https_port
    assert event["scheme"] == "https"


# -- upstream certificate verification ------------------------------------------------------
async def test_upstream_not_trusted_by_system_store_is_502(
    make_proxy: MakeProxy, upstream: Upstream, watch: Watch
) -> None:
    p = await make_proxy(upstream_ca_bundle=None)
    events = await watch(p)
    async with httpx.AsyncClient(proxy=p.url, verify=trusting(p.ca_path)) as client:
        resp = await client.get(f"{upstream.https}/echo/verify")
    assert resp.status_code == 502
    assert "certificate" in resp.text
    event = await events.final_for("/echo/verify")
    assert event["state"] == "error"
    assert event["response"]["status"] == 502
    assert "certificate" in event["error"]


async def test_upstream_verification_off_accepts_any_certificate(
    make_proxy: MakeProxy, upstream: Upstream, watch: Watch
) -> None:
    p = await make_proxy(upstream_ca_bundle=None, upstream_verify_tls=False)
    events = await watch(p)
    async with httpx.AsyncClient(proxy=p.url, verify=trusting(p.ca_path)) as client:
        resp = await client.get(f"{upstream.https}/echo/noverify")
    assert resp.status_code == 200
    assert resp.json()["path"] == "/echo/noverify"
    event = await events.final_for("/echo/noverify")
    assert event["state"] == "completed"
    assert event["scheme"] == "https"


# -- untouched tunnels ----------------------------------------------------------------------
async def open_connect(p: ProxyUnderTest, port: int) -> tuple[Any, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    writer.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


@pytest.mark.parametrize("pattern", ["127.0.0.1", "*.0.0.1", "127.0.0.*"])
async def test_ignored_host_is_tunnelled_untouched(
    make_proxy: MakeProxy,
    upstream: Upstream,
    upstream_ca: CertificateAuthority,
    watch: Watch,
    pattern: str,
) -> None:
    p = await make_proxy(ignore_hosts=[pattern])
    events = await watch(p)

    # The client sees the ORIGINAL server certificate, issued by the upstream test CA.
    reader, writer = await open_connect(p, upstream.https_port)
    await writer.start_tls(trusting(upstream_ca.cert_path), server_hostname="127.0.0.1")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    leaf = x509.load_der_x509_certificate(der)
    proxy_ca = x509.load_pem_x509_certificate(p.ca_path.read_bytes())
    assert aki(leaf) == ski(upstream_ca.cert)
    assert aki(leaf) != ski(proxy_ca)
    writer.write(b"GET /echo/raw HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    response = await asyncio.wait_for(reader.read(), 5)
    assert response.startswith(b"HTTP/1.1 200")
    assert b'"/echo/raw"' in response
    writer.close()

    first = await final_with(events, kind="tunnel")
    assert first["state"] == "completed"
    assert first["host"] == "127.0.0.1"
    assert first["port"] == upstream.https_port
    assert first["stats"]["bytes_client_to_server"] > 0
    assert first["stats"]["bytes_server_to_client"] > len(response)  # + the TLS overhead
    assert first["request"]["body_b64"] == ""  # nothing decrypted, nothing recorded

    # curl trusting only the upstream CA works through the tunnel too.
    rc, out, err = await run_cmd(
        "curl", "-sS", "--max-time", "10", "--cacert", str(upstream_ca.cert_path),
        "-x", p.url, f"{upstream.https}/echo/curl-tunnel",
    )  # fmt: skip
    assert rc == 0, err.decode()
    assert orjson.loads(out)["path"] == "/echo/curl-tunnel"
    second = await events.wait_for(
        lambda e: e["event"] != "started" and e["kind"] == "tunnel" and e["id"] != first["id"]
    )
    assert second["stats"]["bytes_client_to_server"] > 0
    assert second["stats"]["bytes_server_to_client"] > len(out)
    # The decrypted path never reaches the recorder.
    assert not any(e["path"] == "/echo/curl-tunnel" for e in events.events)


# -- WebSocket ------------------------------------------------------------------------------
async def ws_exchange(url: str, proxy_url: str, sslctx: ssl.SSLContext | None = None) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, proxy=proxy_url, ssl=sslctx or True) as ws,
    ):
        for i in range(3):
            await ws.send_str(f"msg{i}")
            reply = await asyncio.wait_for(ws.receive(), 5)
            assert reply.type == aiohttp.WSMsgType.TEXT
            assert reply.data == f"echo:msg{i}"
        await ws.send_bytes(b"\x00\x01binary" * 50)
        reply = await asyncio.wait_for(ws.receive(), 5)
        assert reply.type == aiohttp.WSMsgType.BINARY
        assert reply.data == b"\x00\x01binary" * 50
        await ws.close()


def assert_websocket_flow(event: dict[str, Any]) -> None:
    assert event["kind"] == "websocket"
    assert event["state"] == "completed"
    assert event["response"]["status"] == 101
    stats = event["stats"]
    assert stats["messages_client_to_server"] >= 4
    assert stats["messages_server_to_client"] >= 4
    assert stats["bytes_client_to_server"] > 400
    assert stats["bytes_server_to_client"] > 400


async def test_websocket_echo_through_the_proxy(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    await ws_exchange(f"ws://127.0.0.1:{upstream.http_port}/ws", proxy.url)
    event = await flows.final_for("/ws")
    assert event["scheme"] == "http"
    assert event["port"] == upstream.http_port
    assert_websocket_flow(event)


async def test_secure_websocket_through_intercepted_tls(
    proxy: ProxyUnderTest, upstream: Upstream, flows: FlowEvents
) -> None:
    await ws_exchange(
        f"wss://127.0.0.1:{upstream.https_port}/ws", proxy.url, trusting(proxy.ca_path)
    )
    event = await flows.final_for("/ws")
    assert event["scheme"] == "https"
    assert event["port"] == upstream.https_port
    assert_websocket_flow(event)
