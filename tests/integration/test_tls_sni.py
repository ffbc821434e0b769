"""The upstream TLS handshake of an intercepted CONNECT names the server the client
asked for in its SNI, not the CONNECT target (issue 7, item 12)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from services.proxy.tls import CertificateAuthority
from tests.integration.conftest import MakeProxy
from tests.integration.harness import FlowEvents, run_curl


async def test_upstream_handshake_uses_the_clients_sni(
    make_proxy: MakeProxy, upstream_ca: CertificateAuthority, flows: FlowEvents
) -> None:
    seen: list[str | None] = []
    ctx = upstream_ca.server_context("sni.test")  # a certificate for the name asked by SNI

    def on_sni(_obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        seen.append(name)

    ctx.sni_callback = on_sni

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nsni")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    proxy = await make_proxy()
    try:
        # CONNECT names 127.0.0.1; the client's SNI (and Host) name sni.test
        rc, out, err = await run_curl(
            "-x", proxy.url, "--cacert", str(proxy.ca_path),
            "--connect-to", f"sni.test:{port}:127.0.0.1:{port}",
            f"https://sni.test:{port}/",
        )  # fmt: skip
    finally:
        server.close()
    assert rc == 0, err
    assert out == b"sni"
    assert seen == ["sni.test"]
