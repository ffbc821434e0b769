"""Small pure parts of the proxy: WebSocket frame counting, host globs, flow ids, settings."""

from __future__ import annotations

import os
import struct

import pytest

from libs.common.settings import ProxySettings, SettingsError, load
from services.proxy.config import compile_host_globs
from services.proxy.flow import new_flow_id
from services.proxy.tunnel import FrameCounter


def _frame(payload: bytes, fin: bool = True, opcode: int = 1, mask: bool = True) -> bytes:
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = bytes([b0, (0x80 if mask else 0) | n])
    elif n < 65536:
        head = bytes([b0, (0x80 if mask else 0) | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, (0x80 if mask else 0) | 127]) + struct.pack(">Q", n)
    return head + (b"abcd" if mask else b"") + payload


@pytest.mark.parametrize("split", [1, 2, 3, 7, 1000])
def test_frame_counter_counts_messages_across_any_split(split: int) -> None:
    stream = (
        _frame(b"hi")
        + _frame(b"x" * 300)
        + _frame(b"y" * 70000, mask=False, opcode=2)
        + _frame(b"part1", fin=False)
        + _frame(b"part2", fin=True, opcode=0)
        + _frame(b"", opcode=9)  # ping: a frame, not a message
    )
    c = FrameCounter()
    for i in range(0, len(stream), split):
        c.feed(stream[i : i + split])
    assert c.frames == 6
    assert c.messages == 4


def test_host_globs() -> None:
    r = compile_host_globs(["*.bank.example", "10.0.0.1:8443"])
    assert r is not None
    assert r.match("api.bank.example") and r.match("API.BANK.EXAMPLE")
    assert not r.match("bank.example.evil")
    assert r.match("10.0.0.1:8443") and not r.match("10.0.0.1:443")
    assert compile_host_globs([]) is None


def test_flow_ids_sort_by_creation() -> None:
    ids = [new_flow_id() for _ in range(1000)]
    assert ids == sorted(ids) and len(set(ids)) == 1000


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_IGNORE_HOSTS", "a.example, *.b.example")
    monkeypatch.setenv("FLEET_PROXY_MODE", "reverse:https://api.example:8443")
    s = load(ProxySettings)
    assert s.ignore_hosts == ["a.example", "*.b.example"]
    assert s.proxy_mode == "reverse:https://api.example:8443"
    assert s.data_dir == s.data_dir.expanduser()
    monkeypatch.setenv("FLEET_PROXY_MODE", "upstream:http://corp.example:3128")
    assert load(ProxySettings).proxy_mode == "upstream:http://corp.example:3128"


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("FLEET_PROXY_LISTEN", "nonsense"),
        ("FLEET_PROXY_MODE", "sideways"),
        ("FLEET_PROXY_MODE", "upstream:https://corp:3128"),  # only an http:// upstream proxy
        ("FLEET_PROXY_MODE", "upstream:http://user:secret@corp:3128"),  # no credentials
        ("FLEET_PROXY_MODE", "upstream:http://"),
        ("FLEET_CLIENT_BODY_MIN_RATE", "0"),
        ("FLEET_REPLICA_ID", "has.dot"),
        ("FLEET_CAPTURE_BODY_LIMIT", "-1"),
    ],
)
def test_bad_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as err:
        load(ProxySettings)
    assert var in str(err.value)
    assert "\n" not in str(err.value)
    os.environ.pop(var, None)
