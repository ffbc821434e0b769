"""The client's pure pieces (problem lines, the SSE parser, where the key comes from) and
its SSE resume against a small real HTTP server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from services.client.http import (
    ApiClient,
    ClientError,
    Unreachable,
    UsageProblem,
    default_data_dir,
    parse_sse,
    problem_lines,
    resolve_key,
)


# -- problems --------------------------------------------------------------------------------
def test_a_problem_document_becomes_detail_code_and_field_lines() -> None:
    body = json.dumps(
        {
            "type": "urn:proxyfleet:problem:config-invalid",
            "title": "Invalid configuration",
            "status": 422,
            "detail": "invalid config: body.capture_body_limit",
            "code": "CONFIG_INVALID",
            "errors": [
                {
                    "field": "body.capture_body_limit",
                    "message": "Input should be a valid integer",
                    "type": "int_parsing",
                }
            ],
        }
    ).encode()
    err = ClientError.from_response(422, body)
    assert (err.status, err.code) == (422, "CONFIG_INVALID")
    assert problem_lines(err) == [
        "error: invalid config: body.capture_body_limit (CONFIG_INVALID)",
        "  body.capture_body_limit: Input should be a valid integer",
    ]


def test_a_field_error_that_repeats_the_detail_says_only_where() -> None:
    detail = "invalid filter at column 1 (found '~')"
    err = ClientError(
        detail,
        "BAD_FILTER",
        422,
        [{"field": "query.q", "message": detail, "type": "bad_filter", "position": 0}],
    )
    assert problem_lines(err) == [
        f"error: {detail} (BAD_FILTER)",
        "  query.q: (at position 0)",
    ]


def test_a_body_that_is_not_a_problem_still_reads() -> None:
    err = ClientError.from_response(502, b"<html>Bad Gateway</html>", "Bad Gateway")
    assert err.code == "HTTP_502" and err.detail == "<html>Bad Gateway</html>"
    assert ClientError.from_response(500, b"", "Internal Server Error").detail == (
        "Internal Server Error"
    )
    assert problem_lines(Unreachable("cannot reach the API")) == ["error: cannot reach the API"]


# -- SSE -------------------------------------------------------------------------------------
def test_sse_events_ids_comments_and_multiline_data() -> None:
    events = parse_sse(
        [
            "event: connected",
            'data: {"resumed_after":null}',
            "",
            ": heartbeat",
            "",
            "id: 7:0",
            'data: {"a":',
            "data: 1}",
            "",
            "id: 7:1",
            "data:no-space",
            "retry: 1000",
            "",
            "data: no id of its own",
            "",
        ]
    )
    assert [(e.event, e.data, e.id) for e in events] == [
        ("connected", '{"resumed_after":null}', None),
        ("message", '{"a":\n1}', "7:0"),
        ("message", "no-space", "7:1"),
        ("message", "no id of its own", "7:1"),  # the last id persists
    ]
    assert events[1].json() == {"a": 1}


def test_an_event_without_data_is_not_dispatched() -> None:
    assert parse_sse(["event: lonely", "", "id: 3", ""]) == []


# -- the key ---------------------------------------------------------------------------------
def test_the_key_comes_from_the_flag_then_the_env_then_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEET_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("FLEET_API_KEY", raising=False)
    assert default_data_dir() == tmp_path
    with pytest.raises(UsageProblem, match="no API key"):
        resolve_key(None)
    (tmp_path / "api-key").write_text("from-the-file\n")
    assert resolve_key(None) == "from-the-file"
    monkeypatch.setenv("FLEET_API_KEY", "from-the-env")
    assert resolve_key(None) == "from-the-env"
    flag = tmp_path / "other"
    flag.write_text("from-the-flag")
    assert resolve_key(flag) == "from-the-flag"
    flag.write_text("")
    with pytest.raises(UsageProblem, match="empty"):
        resolve_key(flag)


def test_the_data_dir_defaults_to_the_settings_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEET_DATA_DIR", raising=False)
    assert default_data_dir() == Path("~/.proxyfleet").expanduser()


# -- resume against a real server ------------------------------------------------------------
class _Feed(BaseHTTPRequestHandler):
    """First connection: two events, then the connection ends. Second: ``dropped`` naming
    an id. Third: one more event. Records each ``Last-Event-ID`` and key it got."""

    seen: list[tuple[str | None, str | None]] = []

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.seen.append((self.headers.get("Last-Event-ID"), self.headers.get("X-API-Key")))
        n = len(self.seen)
        if n == 4:
            self.send_response(401)
            self.send_header("Content-Type", "application/problem+json")
            body = b'{"detail": "the API key is not valid", "code": "AUTH_REQUIRED"}'
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        frames = {
            1: 'event: connected\ndata: {"resumed_after":null}\n\n'
            'id: 1:0\ndata: {"n":1}\n\n: heartbeat\n\nid: 1:1\ndata: {"n":2}\n\n',
            2: 'event: connected\ndata: {"resumed_after":"1:1"}\n\n'
            'event: dropped\ndata: {"reason":"slow","last_event_id":"5:0"}\n\n',
            3: 'event: connected\ndata: {"resumed_after":"5:0"}\n\nid: 6:0\ndata: {"n":3}\n\n',
        }
        self.wfile.write(frames[n].encode())
        self.wfile.flush()


@pytest.fixture
def feed() -> Iterator[str]:
    _Feed.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Feed)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_stream_resumes_with_last_event_id_and_after_dropped(feed: str) -> None:
    client = ApiClient(feed, "secret-key")
    notes: list[tuple[str, str | None]] = []
    got = []
    with pytest.raises(ClientError) as refused:  # the 4th connect is refused: not retried
        for event in client.events("/s", on_reconnect=lambda r, last: notes.append((r, last))):
            if event.event != "connected":
                got.append(event.json()["n"])
    assert got == [1, 2, 3]
    assert [last for last, _ in _Feed.seen] == [None, "1:1", "5:0", "6:0"]
    assert {key for _, key in _Feed.seen} == {"secret-key"}
    assert [last for _, last in notes] == ["1:1", "5:0", "6:0"]
    assert "dropped" in notes[1][0]
    assert refused.value.code == "AUTH_REQUIRED" and refused.value.status == 401


def test_a_first_connection_that_fails_is_raised_not_retried() -> None:
    client = ApiClient("http://127.0.0.1:1", "k")
    with pytest.raises(Unreachable, match="cannot reach the API at http://127\\.0\\.0\\.1:1"):
        next(iter(client.events("/s")))
