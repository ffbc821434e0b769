"""EmbeddedNats against a real nats-server: JetStream works and survives restarts."""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.errors import NoServersError
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from libs.common.natsserver import EmbeddedNats, find_binary, free_port


async def _quiet(_: Exception) -> None:
    """Silence nats-py's default error callback (it logs a traceback per refused connect)."""


async def _connect(url: str) -> Client:
    """Connect once, quickly; fail fast with NoServersError when nothing listens.

    (nats-py keeps retrying forever with ``allow_reconnect=False`` or 0 attempts, so the
    "fail fast" setting is one attempt with a short wait.)
    """
    connecting = nats.connect(
        url,
        connect_timeout=1,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.1,
        error_cb=_quiet,
    )
    return await asyncio.wait_for(connecting, 5)


def test_find_binary_and_free_port() -> None:
    assert Path(find_binary()).is_file()
    port = free_port()
    assert port != 4222 and 0 < port < 65536


async def test_jetstream_survives_stop_and_restart(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "store", log_file=tmp_path / "nats.log")
    assert server.port != 4222 and not server.running
    with server:
        assert server.running and server.address == f"nats://127.0.0.1:{server.port}"
        c = server.credentials
        assert server.url == f"nats://{c.user}:{c.password}@127.0.0.1:{server.port}"
        nc = await _connect(server.url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="KEEP", subjects=["keep.>"]))
        ack = await js.publish("keep.one", b"hello")
        assert ack.stream == "KEEP" and ack.seq == 1
        await nc.close()

        server.stop()
        server.stop()  # idempotent
        assert not server.running
        with pytest.raises(NoServersError):
            await _connect(server.url)

        port = server.port
        server.start()
        assert server.port == port
        nc = await _connect(server.url)
        js = nc.jetstream()
        info = await js.stream_info("KEEP")
        assert info.state.messages == 1
        msg = await js.get_msg("KEEP", 1)
        assert msg.data == b"hello" and msg.subject == "keep.one"
        await nc.close()
    assert not server.running


async def test_kill_then_restart_keeps_stream(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "store")
    server.start()
    try:
        nc = await _connect(server.url)
        await nc.jetstream().add_stream(StreamConfig(name="CRASH", subjects=["crash"]))
        await nc.close()
        server.kill()
        assert not server.running
        server.start()
        nc = await _connect(server.url)
        assert (await nc.jetstream().stream_info("CRASH")).config.name == "CRASH"
        await nc.close()
    finally:
        server.stop()


def test_port_taken_is_an_error(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        server = EmbeddedNats(tmp_path / "store", port=port)
        with pytest.raises(RuntimeError, match=str(port)):
            server.start()
        assert not server.running


def test_port_taken_by_another_nats_is_an_error(tmp_path: Path) -> None:
    with EmbeddedNats(tmp_path / "a") as first:
        second = EmbeddedNats(tmp_path / "b", port=first.port)
        with pytest.raises(RuntimeError, match=str(first.port)):
            second.start()
        assert first.running and not second.running


async def test_restartable_nats_fixture(restartable_nats: EmbeddedNats) -> None:
    assert restartable_nats.running
    restartable_nats.stop()
    restartable_nats.start()
    nc = await _connect(restartable_nats.url)
    assert nc.is_connected
    await nc.close()


async def test_nats_url_fixture_has_jetstream(nats_url: str) -> None:
    nc = await _connect(nats_url)
    js = nc.jetstream()
    name = f"T_{uuid.uuid4().hex[:8]}"  # the server is shared by the session
    await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"]))
    try:
        ack = await js.publish(f"{name}.x", b"payload")
        assert ack.stream == name and ack.seq == 1
    finally:
        await js.delete_stream(name)
        with pytest.raises(NotFoundError):
            await js.stream_info(name)
        await nc.close()
