"""Header redaction of recorded flows (``services.proxy.redact``), as the publisher applies it."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from libs.common.models import RuntimeConfig
from services.proxy.capture import flow_event
from services.proxy.config import ProxyConfig
from services.proxy.flow import COMPLETED, Flow
from services.proxy.redact import DEFAULT, MARK, Redaction

KEY = "admin-secret-0123456789"
DIGEST = hashlib.sha256(KEY.encode()).digest()


def _flow(req: list[tuple[bytes, bytes]], resp: list[tuple[bytes, bytes]] = ()) -> Flow:  # type: ignore[assignment]
    f = Flow(("127.0.0.1", 1))
    f.method, f.host, f.port, f.path = b"GET", "h.test", 80, b"/p?token=kept"
    f.req_headers = list(req)
    if resp:
        f.status, f.reason, f.resp_headers = 200, b"OK", list(resp)
    f.finish(COMPLETED)
    return f


def test_proxy_authorization_is_never_recorded_even_when_not_listed() -> None:
    red = Redaction.compile([])
    f = _flow([(b"Host", b"h.test"), (b"PROXY-Authorization", b"Basic dTpw"), (b"X-A", b"1")])
    assert red.headers(f.req_headers) == [["Host", "h.test"], ["X-A", "1"]]


def test_default_names_are_masked_in_requests_and_responses_any_case() -> None:
    f = _flow(
        [(b"authorization", b"Basic x"), (b"Cookie", b"sid=1"), (b"X-Api-Key", b"k"), (b"A", b"b")],
        [(b"Set-Cookie", b"sid=2"), (b"Content-Type", b"text/plain")],
    )
    e = flow_event(f, "r")
    assert e["request"]["headers"] == [
        ["authorization", MARK],
        ["Cookie", MARK],
        ["X-Api-Key", MARK],
        ["A", "b"],
    ]
    assert e["response"]["headers"] == [["Set-Cookie", MARK], ["Content-Type", "text/plain"]]
    assert e["path"] == "/p?token=kept"  # only headers are in scope


def test_custom_list_from_the_config_replaces_the_default() -> None:
    cfg = ProxyConfig.build(RuntimeConfig(redact_headers=["X-Secret"]), 1, None)
    f = _flow([(b"x-secret", b"s"), (b"Cookie", b"c")], [(b"X-SECRET", b"t")])
    e = flow_event(f, "r", redaction=cfg.redact)
    assert e["request"]["headers"] == [["x-secret", MARK], ["Cookie", "c"]]
    assert e["response"]["headers"] == [["X-SECRET", MARK]]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"X-API-Key", KEY.encode()),
        (b"x-api-key", b" " + KEY.encode() + b" "),
        (b"Authorization", b"Bearer " + KEY.encode()),
        (b"authorization", b"bearer  " + KEY.encode()),
    ],
)
def test_our_api_keys_are_masked_even_when_not_listed(name: bytes, value: bytes) -> None:
    red = Redaction.compile([], [DIGEST])
    assert red.headers([(name, value)]) == [[name.decode(), MARK]]


def test_other_values_of_key_headers_are_kept_when_not_listed() -> None:
    red = Redaction.compile([], [DIGEST])
    pairs = [
        (b"X-API-Key", b"someone-elses-key"),
        (b"Authorization", b"Basic " + KEY.encode()),  # not where the API reads keys
        (b"X-Other", KEY.encode()),  # only X-API-Key and Bearer tokens are hashed
    ]
    assert red.headers(pairs) == [[n.decode(), v.decode()] for n, v in pairs]


def test_default_redaction_matches_the_runtime_config_default() -> None:
    cfg = ProxyConfig.build(RuntimeConfig(), 0, None)
    assert cfg.redact == DEFAULT
    assert DEFAULT.names == {
        b"authorization",
        b"proxy-authorization",
        b"cookie",
        b"set-cookie",
        b"x-api-key",
    }


def test_redact_headers_are_validated() -> None:
    assert RuntimeConfig(redact_headers=[" X-A ", "x-a", "Cookie"]).redact_headers == [
        "x-a",
        "cookie",
    ]
    with pytest.raises(ValidationError):
        RuntimeConfig(redact_headers=["bad name"])
    with pytest.raises(ValidationError):
        RuntimeConfig(redact_headers=[""])
