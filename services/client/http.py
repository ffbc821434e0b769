"""A small synchronous client of the management API: where it is and which key to send,
RFC 9457 problems as ``ClientError``, and Server-Sent Events with resume.

Pure pieces (``problem_lines``, ``SseParser``) are kept apart from the network so that
they can be tested alone.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from libs.common.settings import API_KEY_FILE, ApiSettings, CommonSettings

# where ``proxyfleet up`` (and an API with default settings) listens
DEFAULT_API_URL = f"http://{ApiSettings.model_fields['api_listen'].default}"


def default_data_dir() -> Path:
    """``$FLEET_DATA_DIR``, else the settings' default (``~/.proxyfleet``)."""
    raw = os.environ.get("FLEET_DATA_DIR", "").strip()
    default = CommonSettings.model_fields["data_dir"].default
    return (Path(raw) if raw else Path(default)).expanduser()


class UsageProblem(Exception):
    """Something the user has to fix before any request is sent (exit 2)."""


class ClientError(Exception):
    """An error answer of the API (a problem document) or no answer at all."""

    def __init__(
        self,
        detail: str,
        code: str = "",
        status: int = 0,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code
        self.status = status
        self.errors = errors or []

    @classmethod
    def from_response(cls, status: int, body: bytes, reason: str = "") -> ClientError:
        """The problem document of an error answer (or what can be made of another body)."""
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and ("detail" in doc or "code" in doc):
            errors = doc.get("errors")
            return cls(
                str(doc.get("detail") or doc.get("title") or reason or f"HTTP {status}"),
                str(doc.get("code") or ""),
                int(doc.get("status") or status),
                [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else [],
            )
        text = body.decode("utf-8", "replace").strip()[:200]
        return cls(text or reason or f"HTTP {status}", f"HTTP_{status}", status)


class Unreachable(ClientError):
    """No answer: the API is down, refused the connection, or the connection broke."""


def problem_lines(err: ClientError) -> list[str]:
    """What a person reads: ``error: <detail> (<code>)`` and one line per field error."""
    head = f"error: {err.detail}" + (f" ({err.code})" if err.code else "")
    lines = [head]
    for e in err.errors:
        where = str(e.get("field") or "?")
        msg = str(e.get("message") or e.get("type") or "")
        if msg == err.detail:  # said already (a BAD_FILTER's one error)
            msg = ""
        if e.get("position") is not None:
            msg += f" (at position {e['position']})"
        lines.append(f"  {where}: {msg.strip()}".rstrip(": "))
    return lines


# -- Server-Sent Events ---------------------------------------------------------------------
@dataclass
class SseEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None  # the last event id in force when this event was dispatched

    def json(self) -> Any:
        return json.loads(self.data) if self.data else None


@dataclass
class SseParser:
    """The SSE line protocol (HTML "event stream interpretation"): feed it lines without
    their line ending; it returns an event at each blank line that ends one. Comments
    (``: heartbeat``) are skipped; the last event id persists across events."""

    last_id: str | None = None
    _event: str = ""
    _data: list[str] = field(default_factory=list)
    _has_data: bool = False

    def feed(self, line: str) -> SseEvent | None:
        if line == "":
            if not self._has_data:
                self._event = ""
                return None
            out = SseEvent(self._event or "message", "\n".join(self._data), self.last_id)
            self._event, self._data, self._has_data = "", [], False
            return out
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "id" and "\0" not in value:
            self.last_id = value
        return None  # "retry" and unknown fields are ignored


def parse_sse(lines: list[str]) -> list[SseEvent]:
    parser = SseParser()
    return [e for line in lines if (e := parser.feed(line)) is not None]


# -- the client --------------------------------------------------------------------------------
def _retryable(exc: ClientError) -> bool:
    return isinstance(exc, Unreachable) or exc.status >= 500


class ApiClient:
    """One API, one key. Every error answer raises ``ClientError``; so does a transport
    failure (code ``CONNECTION``). The key only ever goes into a request header."""

    def __init__(self, base_url: str, key: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"X-API-Key": key, "User-Agent": "proxyfleet-cli"},
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def _unreachable(self, exc: httpx.TransportError) -> Unreachable:
        why = str(exc) or type(exc).__name__
        if "Connection refused" in why or "Errno 111" in why:
            why = "connection refused"
        return Unreachable(f"cannot reach the API at {self.base_url}: {why}")

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        kwargs: dict[str, Any] = {"params": _clean(params), "headers": headers}
        if json_body is not None:
            kwargs["json"] = json_body
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if resp.status_code >= 400:
            raise ClientError.from_response(resp.status_code, resp.content, resp.reason_phrase)
        return resp

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params).json()

    @contextmanager
    def stream(
        self,
        path: str,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> Iterator[httpx.Response]:
        """A GET whose body is read as it comes (errors raised before it is yielded)."""
        try:
            with self._http.stream(
                "GET",
                path,
                params=_clean(params),
                headers=headers,
                timeout=timeout if timeout is not None else self._http.timeout,
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise ClientError.from_response(
                        resp.status_code, resp.content, resp.reason_phrase
                    )
                yield resp
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    def events(
        self,
        path: str,
        params: Mapping[str, Any] | None = None,
        last_event_id: str | None = None,
        on_reconnect: Callable[[str, str | None], None] | None = None,
        max_backoff: float = 5.0,
    ) -> Iterator[SseEvent]:
        """Follow an SSE stream for ever, resuming after a disconnect with
        ``Last-Event-ID`` (the id of the last event received, or the one a ``dropped``
        event names). The first connection's failure is raised; later ones are retried
        with backoff (``on_reconnect(reason, last_id)`` is told). ``connected`` events
        are yielded too: the caller decides what to show."""
        last = last_event_id
        delay = 0.2
        connected_once = False
        # no read timeout: heartbeats keep the connection alive, a dead peer ends it
        timeout = httpx.Timeout(10.0, read=None)
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = last
            reason = "the stream ended"
            try:
                with self.stream(path, params, headers, timeout) as resp:
                    connected_once = True
                    delay = 0.2
                    parser = SseParser(last_id=last)
                    for line in resp.iter_lines():
                        event = parser.feed(line)
                        if event is None:
                            continue
                        if event.event == "dropped":
                            data = _loads(event.data)
                            resumed = data.get("last_event_id") if isinstance(data, dict) else None
                            last = str(resumed) if resumed is not None else parser.last_id
                            reason = f"the server dropped the stream ({data.get('reason', '')})"
                            break
                        if event.id is not None and event.event != "connected":
                            last = event.id
                        yield event
            except ClientError as exc:  # transport errors arrive as Unreachable
                if not connected_once or not _retryable(exc):
                    raise
                reason = exc.detail
            if on_reconnect is not None:
                on_reconnect(reason, last)
            time.sleep(delay)
            delay = min(delay * 2, max_backoff)


def _clean(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if params is None:
        return None
    return {k: v for k, v in params.items() if v is not None and v != ()}


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def resolve_key(key_file: Path | None) -> str:
    """``--key-file``, else ``$FLEET_API_KEY``, else ``$FLEET_DATA_DIR/api-key``."""
    if key_file is None:
        env = os.environ.get("FLEET_API_KEY", "").strip()
        if env:
            return env
        key_file = default_data_dir() / API_KEY_FILE
    try:
        key = key_file.read_text().strip()
    except OSError as exc:
        raise UsageProblem(
            f"no API key: set FLEET_API_KEY or --key-file (cannot read {key_file}: "
            f"{exc.strerror or exc})"
        ) from None
    if not key:
        raise UsageProblem(f"no API key: {key_file} is empty")
    return key


def err(line: str) -> None:
    print(line, file=sys.stderr)
