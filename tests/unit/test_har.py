"""Flows -> HAR 1.2 (``libs.common.har``), checked by an independent validator.

The validator is npm har-schema 2.0.0 (vendored under tests/data/har-schema, the
schema har-validator and HTTP Toolkit use) run with jsonschema's Draft 6 validator
and its format checker, plus the rules of the HAR spec that the schema does not
enforce (``check_har``). ``validate_har`` is also used by the integration tests.
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import brotli
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft6Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT6

from libs.common import har

SCHEMA_DIR = Path(__file__).parents[1] / "data" / "har-schema"
TIMING_NAMES = ("blocked", "dns", "connect", "ssl", "send", "wait", "receive")
ENTRY_FIELDS = {
    "pageref",
    "startedDateTime",
    "time",
    "request",
    "response",
    "cache",
    "timings",
    "serverIPAddress",
    "connection",
    "comment",
}


# -- the validator --------------------------------------------------------------------------
@cache
def har_validator() -> Draft6Validator:
    """har-schema's 18 files in one registry (their ``$id``s are relative: ``log.json#``)."""
    resources = []
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        if path.name == "package.json":
            continue
        schema = json.loads(path.read_text())
        resources.append(
            (
                schema["$id"].rstrip("#"),
                Resource.from_contents(schema, default_specification=DRAFT6),
            )
        )
    assert len(resources) == 18, "the vendored har-schema is incomplete"
    root = json.loads((SCHEMA_DIR / "har.json").read_text())
    registry: Registry[Any] = Registry().with_resources(resources)
    # the format checker is needed: without it serverIPAddress's oneOf(ipv4, ipv6) fails
    return Draft6Validator(root, registry=registry, format_checker=Draft6Validator.FORMAT_CHECKER)


def schema_errors(doc: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in har_validator().iter_errors(doc)
    ]


def check_har(doc: dict[str, Any]) -> list[str]:
    """What the HAR 1.2 spec requires and har-schema does not check."""
    problems: list[str] = []
    log = doc["log"]
    if not isinstance(log.get("pages"), list):
        problems.append("log.pages missing (Firefox rejects such a file)")
    for i, e in enumerate(log["entries"]):
        where = f"entries/{i}"
        t = e["timings"]
        for name in ("send", "wait", "receive"):
            if not (isinstance(t.get(name), int | float) and t[name] >= 0):
                problems.append(f"{where}: timings.{name} must be >= 0, is {t.get(name)!r}")
        for name in TIMING_NAMES:
            if name in t and not (t[name] == -1 or t[name] >= 0):
                problems.append(f"{where}: timings.{name} is {t[name]!r}")
        # HAR 1.2: connect includes ssl, so ssl is not counted a second time
        total = sum(t[n] for n in TIMING_NAMES if n in t and t[n] != -1 and n != "ssl")
        if t.get("ssl", -1) >= 0 and not t.get("connect", -1) >= t["ssl"]:
            problems.append(f"{where}: timings.connect {t.get('connect')} excludes ssl")
        if abs(e["time"] - total) > 1e-6:
            problems.append(f"{where}: time {e['time']} != sum of timings {total}")
        started = datetime.fromisoformat(e["startedDateTime"])
        if started.tzinfo is None:
            problems.append(f"{where}: startedDateTime without a time zone")
        for key in e:
            if key not in ENTRY_FIELDS and not key.startswith("_"):
                problems.append(f"{where}: custom field {key!r} without a leading _")
        url = urlsplit(e["request"]["url"])
        if not (url.scheme and url.netloc) or not e["request"]["url"].isascii():
            problems.append(f"{where}: request.url {e['request']['url']!r} is not a URI")
        content = e["response"]["content"]
        if not isinstance(content.get("size"), int) or not isinstance(content.get("mimeType"), str):
            problems.append(f"{where}: response.content needs size and mimeType")
        if content.get("encoding") == "base64":
            base64.b64decode(content["text"], validate=True)
        elif "encoding" in content:
            problems.append(f"{where}: unknown content.encoding {content['encoding']!r}")
        post = e["request"].get("postData")
        if post is not None:
            if "encoding" in post or not isinstance(post.get("text"), str):
                problems.append(f"{where}: postData needs text, and HAR 1.2 has no encoding")
        custom = e["request"].get("_postData")
        if custom is not None:
            if custom.get("encoding") != "base64":
                problems.append(f"{where}: request._postData is not base64")
            base64.b64decode(custom["text"], validate=True)
    return problems


def validate_har(data: bytes) -> dict[str, Any]:
    """Parse a HAR file (UTF-8), validate it both ways, and return it."""
    text = data.decode("utf-8")  # strict: HAR is UTF-8
    doc: dict[str, Any] = json.loads(text)
    assert schema_errors(doc) == []
    assert check_har(doc) == []
    return doc


def test_the_validator_is_not_vacuous() -> None:
    """What mitmproxy writes for a flow without a response fails it, as har-validator
    fails it; negative timings and a wrong time fail the spec checks."""
    good = har.document([ERROR_FLOW])
    assert schema_errors(good) == [] and check_har(good) == []
    bad = json.loads(json.dumps(good))
    bad["log"]["entries"][0]["response"]["content"] = {}  # mitmproxy's error entries
    assert any("size" in e for e in schema_errors(bad))
    bad = json.loads(json.dumps(good))
    bad["log"]["entries"][0]["serverIPAddress"] = "not-an-ip"
    assert schema_errors(bad)
    bad = json.loads(json.dumps(good))
    bad["log"]["entries"][0]["timings"]["wait"] = -3.0
    bad["log"]["entries"][0]["time"] += 99
    del bad["log"]["pages"]
    problems = check_har(bad)
    assert any("wait" in p for p in problems) and any("sum" in p for p in problems)
    assert any("pages" in p for p in problems)


# -- flows ----------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


T0 = 1_700_000_000.25
JSON_BODY = orjson.dumps({"hello": "wörld", "items": list(range(50))})
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe"


def flow(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event": "completed",
        "id": "018bcfe5684000000000aaaa",
        "replica": "r1",
        "kind": "http",
        "state": "completed",
        "client": ["127.0.0.1", 50123],
        "server": ["93.184.216.34", 443],
        "scheme": "https",
        "method": "GET",
        "host": "example.com",
        "port": 443,
        "path": "/search?q=caf%C3%A9&empty=&x=1&x=2",
        "http_version": "1.1",
        "request": {
            "headers": [["Host", "example.com"], ["Cookie", "a=1; b=two=2"]],
            "size": 0,
            "truncated": False,
            "body_b64": "",
        },
        "response": {
            "status": 200,
            "reason": "OK",
            "http_version": "1.1",
            "headers": [
                ["Content-Type", "application/json; charset=utf-8"],
                ["Content-Encoding", "gzip"],
                ["Set-Cookie", "sid=abc; Path=/; Max-Age=3600; HttpOnly; Secure; SameSite=Lax"],
                ["Set-Cookie", "old=1; Expires=Wed, 21 Oct 2015 07:28:00 GMT; Domain=.ex.com"],
            ],
            "size": 0,
            "truncated": False,
            "body_b64": "",
        },
        "timings": {
            "start": T0,
            "request_sent": T0 + 0.010,
            "first_byte": T0 + 0.110,
            "end": T0 + 0.125,
        },
        "error": None,
        "stats": None,
        "trace_id": None,
        "traceparent": None,
        "tags": [],
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


GZIPPED = gzip.compress(JSON_BODY)
GZIP_FLOW = flow(response={"size": len(GZIPPED), "body_b64": b64(GZIPPED)})
PNG_FLOW = flow(
    id="png",
    path="/logo.png",
    response={"headers": [["Content-Type", "image/png"]], "size": len(PNG), "body_b64": b64(PNG)},
)
BINARY_POST = flow(
    id="binpost",
    method="POST",
    path="/upload",
    request={
        "headers": [["Content-Type", "application/octet-stream"]],
        "size": 6,
        "body_b64": b64(b"\xff\xfe\x00bin"),
    },
    response={"headers": [], "size": 0, "body_b64": ""},
)
TEXT_DELETE = flow(
    id="textdelete",
    method="DELETE",
    path="/thing",
    request={"headers": [["Content-Type", "text/plain"]], "size": 7, "body_b64": b64(b"because")},
)
ERROR_FLOW = flow(
    id="err",
    event="error",
    state="error",
    error="upstream connect failed: connection refused",
    server=None,
    response=None,
    timings={"start": T0, "request_sent": None, "first_byte": None, "end": T0 + 0.5},
)
KILLED_FLOW = flow(id="killed", event="killed", state="killed", error=None, response=None)
ACTIVE_FLOW = flow(
    id="active",
    event="started",
    state="active",
    method="PUT",
    request={"headers": [["Content-Type", "text/plain"]], "size": 0, "body_b64": None},
    response={"headers": [["Content-Type", "text/plain"]], "body_b64": None, "size": 0},
    timings={"start": T0, "request_sent": T0 + 0.01, "first_byte": T0 + 0.02, "end": None},
)
# a flow that opened a new upstream connection: resolved, connected, TLS, then its request
FRESH_HTTPS = flow(
    timings={
        "start": T0,
        "dns": T0 + 0.002,
        "connect": T0 + 0.007,
        "tls": T0 + 0.020,
        "request_sent": T0 + 0.021,
        "first_byte": T0 + 0.121,
        "end": T0 + 0.125,
    },
)
FRESH_HTTP = flow(
    scheme="http",
    port=80,
    timings={
        "start": T0,
        "dns": T0 + 0.002,
        "connect": T0 + 0.007,
        "tls": None,
        "request_sent": T0 + 0.008,
        "first_byte": T0 + 0.108,
        "end": T0 + 0.110,
    },
)
ALL = [
    GZIP_FLOW,
    PNG_FLOW,
    BINARY_POST,
    TEXT_DELETE,
    ERROR_FLOW,
    KILLED_FLOW,
    ACTIVE_FLOW,
    FRESH_HTTPS,
    FRESH_HTTP,
]


def one(f: dict[str, Any]) -> dict[str, Any]:
    doc = har.document([f])
    assert schema_errors(doc) == [] and check_har(doc) == []
    e: dict[str, Any] = doc["log"]["entries"][0]
    return e


def test_log_header() -> None:
    doc = har.document([])
    assert doc["log"]["version"] == "1.2" and doc["log"]["pages"] == []
    assert doc["log"]["creator"]["name"] == "proxyfleet" and doc["log"]["creator"]["version"]
    assert schema_errors(doc) == [] and check_har(doc) == []


def test_streamed_form_is_the_same_document() -> None:
    data = har.log_open() + har.entries_chunk(ALL[:3], True) + har.entries_chunk([], False)
    data += har.entries_chunk(ALL[3:], False) + har.LOG_CLOSE
    assert validate_har(data) == json.loads(orjson.dumps(har.document(ALL)))


def test_gzip_response_is_decoded_with_sizes_and_compression() -> None:
    e = one(GZIP_FLOW)
    content = e["response"]["content"]
    assert content["text"] == JSON_BODY.decode() and "encoding" not in content
    assert content["size"] == len(JSON_BODY)
    assert e["response"]["bodySize"] == len(GZIPPED)  # the wire size
    assert content["compression"] == len(JSON_BODY) - len(GZIPPED)
    assert content["mimeType"] == "application/json; charset=utf-8"
    assert e["response"]["httpVersion"] == "HTTP/1.1" and e["response"]["statusText"] == "OK"
    assert e["request"]["headers"][0] == {"name": "Host", "value": "example.com"}
    assert e["request"]["headersSize"] == -1 and e["response"]["headersSize"] == -1


def test_request_line_query_and_custom_fields() -> None:
    e = one(GZIP_FLOW)
    assert e["request"]["url"] == "https://example.com/search?q=caf%C3%A9&empty=&x=1&x=2"
    assert e["request"]["queryString"] == [
        {"name": "q", "value": "café"},
        {"name": "empty", "value": ""},
        {"name": "x", "value": "1"},
        {"name": "x", "value": "2"},
    ]
    assert e["startedDateTime"] == "2023-11-14T22:13:20.250Z"
    assert e["serverIPAddress"] == "93.184.216.34" and e["connection"] == "50123"
    assert e["_flow_id"] == GZIP_FLOW["id"] and e["_replica"] == "r1"
    assert e["_state"] == "completed" and "_error" not in e
    assert "postData" not in e["request"] and e["request"]["bodySize"] == 0


def test_cookies() -> None:
    e = one(GZIP_FLOW)
    assert e["request"]["cookies"] == [
        {"name": "a", "value": "1"},
        {"name": "b", "value": "two=2"},
    ]
    sid, old = e["response"]["cookies"]
    assert sid == {
        "name": "sid",
        "value": "abc",
        "path": "/",
        "httpOnly": True,
        "secure": True,
        "sameSite": "Lax",
        "expires": "2023-11-14T23:13:20.250Z",  # Max-Age from the flow's start
    }
    assert old["expires"] == "2015-10-21T07:28:00.000Z" and old["domain"] == ".ex.com"
    assert old["httpOnly"] is False and old["secure"] is False
    redacted = flow(
        request={"headers": [["Cookie", "<redacted>"]]},
        response={"headers": [["Set-Cookie", "<redacted>"]]},
    )
    e = one(redacted)
    assert e["request"]["cookies"] == [] and e["response"]["cookies"] == []


def test_timings_add_up() -> None:
    e = one(GZIP_FLOW)
    t = e["timings"]
    assert (t["send"], t["wait"], t["receive"]) == (10.0, 100.0, 15.0)
    assert t["blocked"] == t["dns"] == t["connect"] == t["ssl"] == -1
    assert e["time"] == 125.0


def test_fresh_https_connection_has_dns_connect_and_ssl() -> None:
    e = one(FRESH_HTTPS)
    t = e["timings"]
    assert t["blocked"] == -1
    assert (t["dns"], t["ssl"]) == (2.0, 13.0)
    assert t["connect"] == 18.0  # 5 ms of TCP connect and the 13 ms of TLS (HAR 1.2)
    assert (t["send"], t["wait"], t["receive"]) == (1.0, 100.0, 4.0)
    assert e["time"] == 125.0  # ssl counted once, inside connect


def test_fresh_plain_http_connection_has_no_ssl() -> None:
    e = one(FRESH_HTTP)
    t = e["timings"]
    assert (t["dns"], t["connect"], t["ssl"]) == (2.0, 5.0, -1)
    assert (t["send"], t["wait"], t["receive"]) == (1.0, 100.0, 2.0)
    assert e["time"] == 110.0


def test_reused_connection_has_no_connection_phases() -> None:
    reused = {**FRESH_HTTPS["timings"], "dns": None, "connect": None, "tls": None}
    e = one({**FRESH_HTTPS, "timings": reused})
    t = e["timings"]
    assert t["blocked"] == t["dns"] == t["connect"] == t["ssl"] == -1
    assert t["send"] == 21.0 and e["time"] == 125.0  # send runs from the start


@pytest.mark.parametrize(
    ("times", "expect"),
    [
        # failed in the TLS handshake: resolved, connected, then "sending" until the end
        ({"start": 10.0, "dns": 10.1, "connect": 10.2, "end": 10.5}, (100, 100, -1, 300)),
        # connection points out of order or after the end (a kill racing the connect)
        ({"start": 10.0, "dns": 9.0, "connect": 10.2, "tls": 10.1, "end": 10.3}, (0, 200, 0, 100)),
        ({"start": 10.0, "dns": 10.1, "connect": 11.0, "tls": 12.0, "end": 10.5}, (100, 400, 0, 0)),
        # still active, connecting: ends at its last known point
        ({"start": 10.0, "dns": 10.1, "connect": 10.3}, (100, 200, -1, 0)),
    ],
)
def test_connection_phases_are_clamped(times: dict[str, Any], expect: tuple[int, ...]) -> None:
    t = har.har_timings(times)
    assert (t["dns"], t["connect"], t["ssl"], t["send"]) == pytest.approx(expect)
    e = one({**flow(), "timings": times})
    assert e["time"] == pytest.approx(sum(v for v in expect if v > 0))
    assert e["time"] == pytest.approx((times.get("end") or 10.3) * 1000 - 10_000)


@pytest.mark.parametrize(
    ("times", "expect"),
    [
        # failed before the request went out: the time was spent sending
        ({"start": 10.0, "request_sent": None, "first_byte": None, "end": 10.5}, (500, 0, 0)),
        # sent, then no answer until the error
        ({"start": 10.0, "request_sent": 10.1, "first_byte": None, "end": 11.0}, (100, 900, 0)),
        # an early response (first byte before the request was all sent) is clamped
        ({"start": 10.0, "request_sent": 10.3, "first_byte": 10.2, "end": 10.4}, (300, 0, 100)),
        # still active: ends at its last known point
        ({"start": 10.0, "request_sent": 10.1, "first_byte": None, "end": None}, (100, 0, 0)),
        ({"start": None}, (0, 0, 0)),
        ({}, (0, 0, 0)),
    ],
)
def test_timings_are_never_negative(times: dict[str, Any], expect: tuple[int, ...]) -> None:
    t = har.har_timings(times)
    assert (t["send"], t["wait"], t["receive"]) == pytest.approx(expect)
    e = one({**flow(), "timings": times})  # replaced, not merged
    assert e["time"] == pytest.approx(sum(expect))


def test_binary_response_is_base64() -> None:
    content = one(PNG_FLOW)["response"]["content"]
    assert content["encoding"] == "base64" and base64.b64decode(content["text"]) == PNG
    assert content["size"] == len(PNG) and "compression" not in content


def test_binary_request_body_is_a_custom_field() -> None:
    e = one(BINARY_POST)
    assert "postData" not in e["request"]  # HAR 1.2 postData cannot hold bytes
    custom = e["request"]["_postData"]
    assert custom["encoding"] == "base64" and custom["mimeType"] == "application/octet-stream"
    assert base64.b64decode(custom["text"]) == b"\xff\xfe\x00bin"
    assert e["request"]["bodySize"] == 6
    assert e["response"]["content"] == {"size": 0, "mimeType": "x-unknown", "text": ""}


@pytest.mark.parametrize("method", ["DELETE", "GET", "POST", "OPTIONS"])
def test_text_request_body_for_any_method(method: str) -> None:
    e = one({**TEXT_DELETE, "method": method})
    assert e["request"]["postData"] == {"mimeType": "text/plain", "text": "because"}


def test_flows_without_a_response_are_valid_entries() -> None:
    e = one(ERROR_FLOW)
    assert e["response"]["status"] == 0
    assert e["response"]["content"] == {"size": 0, "mimeType": "x-unknown"}
    assert e["_error"] == ERROR_FLOW["error"] and e["_state"] == "error"
    assert "serverIPAddress" not in e and e["time"] == 500.0
    killed = one(KILLED_FLOW)
    assert killed["_error"] == "killed" and killed["response"]["status"] == 0


def test_active_flow_bodies_are_not_invented() -> None:
    e = one(ACTIVE_FLOW)
    assert e["_state"] == "active" and "postData" not in e["request"]
    assert e["response"]["status"] == 200 and e["response"]["bodySize"] == -1
    assert e["response"]["content"] == {"size": 0, "mimeType": "text/plain"}


def test_truncated_gzip_is_served_as_recorded_with_the_reason() -> None:
    body = gzip.compress(bytes(range(256)) * 100)
    cut = body[: len(body) // 2]
    e = one(
        flow(response={"size": len(body), "truncated": True, "body_b64": b64(cut)}),
    )
    content = e["response"]["content"]
    assert content["encoding"] == "base64" and base64.b64decode(content["text"]) == cut
    assert content["_decode_error"] == "truncated" and content["_truncated"] is True
    assert content["size"] == len(body) and "compression" not in content


def test_corrupt_and_unknown_codings() -> None:
    corrupt = flow(
        response={
            "headers": [["Content-Type", "text/plain"], ["Content-Encoding", "br"]],
            "size": 9,
            "body_b64": b64(b"not br at"),
        }
    )
    content = one(corrupt)["response"]["content"]
    assert content["_decode_error"] == "invalid" and content["encoding"] == "base64"
    assert base64.b64decode(content["text"]) == b"not br at"
    unknown = flow(
        response={
            "headers": [["Content-Encoding", "compress"]],
            "size": 3,
            "body_b64": b64(b"abc"),
        }
    )
    content = one(unknown)["response"]["content"]
    assert content["_decode_error"] == "unsupported" and content["mimeType"] == "x-unknown"


def test_layered_and_repeated_content_encoding() -> None:
    layered = brotli.compress(zlib.compress(b"layered text"))
    for headers in (
        [["Content-Encoding", "deflate, br"]],
        [["Content-Encoding", "deflate"], ["Content-Encoding", "br"]],
    ):
        f = flow(response={"headers": headers, "size": len(layered), "body_b64": b64(layered)})
        assert one(f)["response"]["content"]["text"] == "layered text"


def test_urls() -> None:
    assert har.url({"scheme": "http", "host": "a.b", "port": 80, "path": "/x"}) == "http://a.b/x"
    assert (
        har.url({"scheme": "https", "host": "a.b", "port": 8443, "path": "/"})
        == "https://a.b:8443/"
    )
    assert har.url({"scheme": "http", "host": "::1", "port": 8080, "path": "/"}) == (
        "http://[::1]:8080/"
    )
    connect = {
        "scheme": "https",
        "host": "a.b",
        "port": 443,
        "method": "CONNECT",
        "path": "a.b:443",
    }
    assert har.url(connect) == "https://a.b/"
    assert har.url({"scheme": "http", "host": "a.b", "path": "/é s"}) == "http://a.b/%E9%20s"
    assert har.url({"scheme": "http", "host": "a.b", "path": "*", "method": "OPTIONS"}) == (
        "http://a.b/*"
    )


def test_ipv6_server_and_other_kinds() -> None:
    tunnel = flow(
        kind="tunnel",
        method="CONNECT",
        path="example.com:443",
        server=["2001:db8::1", 443],
        stats={"bytes_client_to_server": 10, "bytes_server_to_client": 20},
        response={"headers": [], "size": 0, "body_b64": ""},
    )
    e = one(tunnel)
    assert e["serverIPAddress"] == "2001:db8::1" and e["_kind"] == "tunnel"
    assert e["_stats"]["bytes_server_to_client"] == 20
    assert e["request"]["url"] == "https://example.com/"
    assert har.server_ip(["proxy.internal", 3128]) is None


def test_a_flow_too_big_for_the_store_reply_keeps_its_sizes() -> None:
    omitted = flow(
        request={"body_omitted": True, "body_b64": None, "size": 10},
        response={"body_omitted": True, "body_b64": None, "size": 20},
    )
    e = one(omitted)
    assert e["request"]["_body_omitted"] is True and e["response"]["_body_omitted"] is True
    assert e["request"]["bodySize"] == 10 and e["response"]["bodySize"] == 20
    assert e["response"]["content"]["size"] == 20 and "text" not in e["response"]["content"]


def test_the_redaction_mark_is_the_proxys() -> None:
    from services.proxy.redact import MARK

    assert har.REDACTED == MARK


def test_empty_body_with_a_coding_is_empty_not_an_error() -> None:
    head = flow(method="HEAD")  # GZIP_FLOW's headers (Content-Encoding: gzip), no bytes
    content = one(head)["response"]["content"]
    assert content == {"size": 0, "mimeType": "application/json; charset=utf-8", "text": ""}


@given(st.text(alphabet="ab=&%+2F#x ", max_size=30))
def test_query_strings_are_parsed_as_parse_qsl_parses_them(query: str) -> None:
    """The fast path (no escapes) and the general one agree with the standard library."""
    expected = [
        {"name": k, "value": v}
        for k, v in parse_qsl(query.split("#", 1)[0], keep_blank_values=True, errors="replace")
    ]
    assert har.query_string("/p?" + query) == expected


def test_policy_fields_are_custom_fields() -> None:
    """What the rules policy did: ``_policy``, ``_tags``, ``_intercept``, ``_replayOf``,
    bounded, and absent where there is nothing to say (schema-valid either way)."""
    held = flow(
        id="held",
        policy={
            "revision": 12,
            "matched": [
                {"rule": "tag-all", "phase": "request", "action": "tag"},
                {"rule": "hold-post", "phase": "request", "action": "intercept", "note": "n"},
                "not an entry",
            ],
        },
        tags=["seen", "team:web", 7],
        intercept={
            "phase": "request",
            "rule": "hold-post",
            "outcome": "modified",
            "by": "ops",
            "held_ms": 1520.5,
            "modified": ["headers", "body"],
        },
        replay_of="018bcfe5684000000000aaaa",
        is_replay="request",
    )
    e = one(held)
    assert e["_policy"] == {
        "revision": 12,
        "matched": [
            {"rule": "tag-all", "phase": "request", "action": "tag"},
            {"rule": "hold-post", "phase": "request", "action": "intercept", "note": "n"},
        ],
    }
    assert e["_tags"] == ["seen", "team:web"]
    assert e["_intercept"] == {
        "phase": "request",
        "rule": "hold-post",
        "outcome": "modified",
        "by": "ops",
        "held_ms": 1520.5,
        "modified": ["headers", "body"],
    }
    assert e["_replayOf"] == "018bcfe5684000000000aaaa"
    plain = one(GZIP_FLOW)
    assert not {"_policy", "_tags", "_intercept", "_replayOf"} & set(plain)
    no_rule = one(flow(policy={"revision": 3, "matched": []}, tags=[], intercept=None))
    assert no_rule["_policy"] == {"revision": 3, "matched": []} and "_tags" not in no_rule
    hostile = one(
        flow(
            policy={"revision": "x", "matched": [{"rule": "r" * 999, "note": {"a": 1}}] * 999},
            tags=[f"t{i}" for i in range(5000)],
            intercept={"held_ms": "soon", "modified": "all", "by": 5},
            replay_of={"id": 1},
        )
    )
    assert hostile["_policy"]["revision"] is None and len(hostile["_policy"]["matched"]) == 256
    assert hostile["_policy"]["matched"][0] == {"rule": "r" * 128}
    assert len(hostile["_tags"]) == 256 and "_replayOf" not in hostile
    assert hostile["_intercept"]["held_ms"] is None and hostile["_intercept"]["modified"] == []
    stored = orjson.loads(har.record_entry(held, b"", b"", 1 << 20))
    assert stored["_policy"] == e["_policy"] and stored["_intercept"] == e["_intercept"]
