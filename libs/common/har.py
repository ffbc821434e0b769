"""Recorded flows as HAR 1.2 entries (``GET /api/flows/har``, ``/api/flows/{id}/har``).

Pure functions from the store's wire form of a flow (``fleet.store.get``/``export``:
bodies as ``body_b64``) to HAR. HAR's rules that its JSON schema does not enforce are
kept here, because importers (browsers' DevTools, HTTP Toolkit, mitmproxy) rely on them:

- every entry is valid, also one without a response (error, killed, still active):
  status 0 and ``content`` ``{size: 0, mimeType: "x-unknown"}``, as Chrome writes a
  failed request, with the reason in ``_error``;
- ``send``, ``wait`` and ``receive`` are never negative and ``time`` is the sum of the
  phases that are not -1, ``ssl`` excepted (``connect`` includes it). ``dns``,
  ``connect`` and ``ssl`` are measured when the flow opened a new upstream connection
  (-1 on a reused one, ``ssl`` -1 on plain http); ``blocked`` is always -1 (see
  ``har_timings``);
- ``content.text`` is the body with its Content-Encoding undone, UTF-8 text or
  ``encoding: "base64"``; a body that does not decode (corrupt, cut at the capture
  limit) is the recorded bytes in base64 and ``_decode_error`` says why;
- a request body is ``postData.text`` when it is UTF-8 text, for any method. HAR 1.2's
  ``postData`` has no ``encoding``, so a binary request body goes in ``request._postData``
  (``{mimeType, encoding: "base64", text}``, the shape HAR 1.3 proposes) instead of a
  ``postData`` whose text would be mangled.

Sizes: ``bodySize`` is the size on the wire (-1 while unknown), ``content.size`` the
decoded size, ``compression`` the bytes the coding saved; ``headersSize`` is -1 (the
head's exact bytes are not recorded). Custom fields start with ``_``: ``_flow_id``,
``_replica``, ``_state``, ``_error``, ``_kind`` and ``_stats`` (tunnels, WebSockets),
``_truncated`` on a body that capture cut; where the rules policy had a say, ``_policy``
(``{revision, matched: [{rule, phase, action, note}]}``), ``_tags``, ``_intercept``
(``{phase, rule, outcome, by, held_ms, modified}``) and ``_replayOf`` (the replayed
flow's id), bounded as the store's listing shows them (``flowfilter.policy_summary``).
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import math
import re
import time
from collections.abc import Callable, Iterable
from datetime import UTC
from email.utils import parsedate_to_datetime
from importlib import metadata
from typing import Any
from urllib.parse import parse_qsl, quote

import orjson

from libs.common import flowfilter
from libs.common.bodies import Uncoded, b64decode, decode_text, header, undo_coding

HAR_VERSION = "1.2"
UNKNOWN_MIME = "x-unknown"  # what Chrome writes for a response it has no type for
REDACTED = "<redacted>"  # the proxy's mark for a masked header (services.proxy.redact.MARK)
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# characters left as they are in a URL path (RFC 3986 reserved and unreserved, and "%")
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~-._"
_URL_CLEAN = re.compile("[A-Za-z0-9" + re.escape(_URL_SAFE) + "]*")


def _version() -> str:
    try:
        return metadata.version("proxyfleet")
    except metadata.PackageNotFoundError:
        return "0.0.0"


CREATOR = {"name": "proxyfleet", "version": _version()}


# -- the log --------------------------------------------------------------------------------
def log_open() -> bytes:
    """The start of a HAR document, up to the first entry (streamed exports)."""
    head = orjson.dumps({"version": HAR_VERSION, "creator": CREATOR, "pages": []})
    return b'{"log":' + head[:-1] + b',"entries":['


LOG_CLOSE = b"]}}"


def entries_chunk(flows: Iterable[dict[str, Any]], first: bool) -> bytes:
    """The entries of ``flows`` as JSON array elements (a leading comma unless ``first``)."""
    parts = [orjson.dumps(entry(flow)) for flow in flows]
    if not parts:
        return b""
    return (b"" if first else b",") + b",".join(parts)


def document(flows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """A whole HAR document (one flow's export, tests)."""
    return {
        "log": {
            "version": HAR_VERSION,
            "creator": dict(CREATOR),
            "pages": [],
            "entries": [entry(f) for f in flows],
        }
    }


# -- one entry ------------------------------------------------------------------------------
Bodies = Callable[[str], bytes | None]  # "request"/"response" -> recorded bytes (None: unknown)


def wire_bodies(flow: dict[str, Any]) -> Bodies:
    """The bodies of a flow in the store's wire form (base64 in ``body_b64``)."""

    def body(which: str) -> bytes | None:
        part = flow.get(which)
        b64 = part.get("body_b64") if isinstance(part, dict) else None
        return b64decode(b64) if isinstance(b64, str) else None

    return body


def entry(flow: dict[str, Any], bodies: Bodies | None = None) -> dict[str, Any]:
    """The HAR entry of one flow: a flow document with its ``bodies`` (by default the
    ``body_b64`` of the wire form; the store passes the stored bytes, no base64 between)."""
    if bodies is None:
        bodies = wire_bodies(flow)
    raw_timings = flow.get("timings")
    times = raw_timings if isinstance(raw_timings, dict) else {}
    start = _num(times.get("start"))
    timings = har_timings(times)
    state = flow.get("state")
    request_part = flow.get("request")
    response_part = flow.get("response")
    out: dict[str, Any] = {
        "startedDateTime": iso_time(start if start is not None else 0.0),
        "time": har_time(timings),
        "request": request(
            flow,
            request_part if isinstance(request_part, dict) else {},
            bodies("request") if isinstance(request_part, dict) else None,
        ),
        "response": (
            response(flow, response_part, start, bodies("response"))
            if isinstance(response_part, dict)
            else no_response(flow)
        ),
        "cache": {},
        "timings": timings,
    }
    ip = server_ip(flow.get("server"))
    if ip is not None:
        out["serverIPAddress"] = ip
    client = flow.get("client")
    if isinstance(client, list) and len(client) == 2 and isinstance(client[1], int):
        out["connection"] = str(client[1])  # the client port: entries of one connection
    out["_flow_id"] = flow.get("id")
    out["_replica"] = flow.get("replica")
    out["_state"] = state
    if state in ("error", "killed"):
        out["_error"] = flow.get("error") or state
    kind = flow.get("kind")
    if kind not in (None, "http"):
        out["_kind"] = kind
        if isinstance(flow.get("stats"), dict):
            out["_stats"] = flow["stats"]
    _decision(out, flow)
    return out


def _decision(out: dict[str, Any], flow: dict[str, Any]) -> None:
    """The rules policy's account of the flow, where there is one: ``_policy``
    (``{revision, matched}``), ``_tags``, ``_intercept``, ``_replayOf``."""
    policy = flowfilter.policy_summary(flow)
    if policy is not None:
        out["_policy"] = policy
    tags = flowfilter.tag_list(flow)
    if tags:
        out["_tags"] = tags
    intercept = flowfilter.intercept_summary(flow)
    if intercept is not None:
        out["_intercept"] = intercept
    replayed = flowfilter.replay_of(flow)
    if replayed is not None:
        out["_replayOf"] = replayed


def har_timings(times: dict[str, Any]) -> dict[str, float]:
    """HAR timings (ms) from ours (epoch seconds: start, dns, connect, tls, request_sent,
    first_byte, end).

    ``dns``, ``connect`` and ``tls`` are when the upstream name resolution, TCP connect and
    TLS handshake of a connection the flow opened ended; the phases run from the point
    before: ``dns`` from the flow's start (so it also holds the proxy's own work before
    the lookup began; ``blocked`` stays -1, as that start is not measured), ``connect``
    from the end of ``dns``, ``ssl`` from the end of ``connect``. As HAR 1.2 asks,
    ``connect`` includes ``ssl``. A point that is absent makes its phase -1: all three on a
    reused connection, ``ssl`` on plain http. ``send`` then runs from the last of them
    (from the start on a reused connection) to ``request_sent``.

    A phase whose end we lack runs to the next point we have (a flow that failed before
    its request was sent spent its time sending), an active flow ends at its last known
    point, and points out of order (a response before the request was all sent) are
    clamped between the point before and the end, so every phase is >= 0 and they add up
    to the time the flow took (``har_time``: ``ssl`` excluded, being inside ``connect``).
    """
    start = _num(times.get("start"))
    out = {"blocked": -1.0, "dns": -1.0, "connect": -1.0, "ssl": -1.0}
    if start is None:
        return {**out, "send": 0.0, "wait": 0.0, "receive": 0.0}
    dns, connect, tls = (_num(times.get(k)) for k in ("dns", "connect", "tls"))
    sent, first, end = (_num(times.get(k)) for k in ("request_sent", "first_byte", "end"))
    if end is None:
        end = max(p for p in (start, dns, connect, tls, sent, first) if p is not None)
    at = start  # the end of the last phase
    for name, point in (("dns", dns), ("connect", connect), ("ssl", tls)):
        if point is not None:
            point = min(max(at, point), end)
            out[name] = _ms(point - at)
            at = point
    if out["ssl"] >= 0:
        out["connect"] = round(max(out["connect"], 0.0) + out["ssl"], 3)
    if first is None:
        first = end
    if sent is None:
        sent = first
    t = [at]
    for point in (sent, first, end):
        t.append(min(max(t[-1], point), end))
    return {
        **out,
        "send": _ms(t[1] - t[0]),
        "wait": _ms(t[2] - t[1]),
        "receive": _ms(t[3] - t[2]),
    }


def har_time(timings: dict[str, float]) -> float:
    """An entry's ``time``: the sum of its timings that are not -1, less ``ssl`` (which
    ``connect`` includes)."""
    total = sum(v for k, v in timings.items() if k != "ssl" and v >= 0)
    return round(total, 3)


def request(flow: dict[str, Any], part: dict[str, Any], raw: bytes | None) -> dict[str, Any]:
    pairs = _pairs(part.get("headers"))
    size = part.get("size")
    out: dict[str, Any] = {
        "method": str(flow.get("method") or ""),
        "url": url(flow),
        "httpVersion": http_version(flow.get("http_version")),
        "cookies": request_cookies(pairs),
        "headers": _headers(pairs),
        "queryString": query_string(flow.get("path")),
        "headersSize": -1,
        "bodySize": size if isinstance(size, int) and size >= 0 else -1,
    }
    if part.get("body_omitted"):
        out["_body_omitted"] = True
    if raw is None:
        return out  # not known yet (active flow)
    if not raw and not size:
        return out  # no request body
    uncoded = undo_coding(raw, part)
    truncated = bool(part.get("truncated")) and not uncoded.decoded
    mime = header(pairs, "content-type") or "application/octet-stream"
    text = decode_text(uncoded.data, truncated) if uncoded.error is None else None
    body: dict[str, Any] = {"mimeType": mime}
    if text is not None:
        body["text"] = text
    else:
        body["encoding"] = "base64"
        body["text"] = base64.b64encode(uncoded.data).decode("ascii")
    _mark(body, uncoded, truncated)
    out["postData" if text is not None else "_postData"] = body
    return out


def response(
    flow: dict[str, Any], part: dict[str, Any], start: float | None, raw: bytes | None
) -> dict[str, Any]:
    pairs = _pairs(part.get("headers"))
    status = part.get("status")
    size = part.get("size")
    known = raw is not None or bool(part.get("body_omitted"))
    wire_size = size if known and isinstance(size, int) and size >= 0 else -1
    out: dict[str, Any] = {
        "status": status if isinstance(status, int) else 0,
        "statusText": str(part.get("reason") or ""),
        "httpVersion": http_version(part.get("http_version") or flow.get("http_version")),
        "cookies": response_cookies(pairs, start),
        "headers": _headers(pairs),
        "content": content(part, pairs, wire_size, raw),
        "redirectURL": header(pairs, "location") or "",
        "headersSize": -1,
        "bodySize": wire_size,
    }
    if part.get("body_omitted"):
        out["_body_omitted"] = True
    return out


def no_response(flow: dict[str, Any]) -> dict[str, Any]:
    """The response of a flow that has none (failed, killed, or still waiting)."""
    return {
        "status": 0,
        "statusText": "",
        "httpVersion": "",
        "cookies": [],
        "headers": [],
        "content": {"size": 0, "mimeType": UNKNOWN_MIME},
        "redirectURL": "",
        "headersSize": -1,
        "bodySize": -1,
    }


def content(
    part: dict[str, Any], pairs: list[tuple[str, str]], wire_size: int, raw: bytes | None
) -> dict[str, Any]:
    """``response.content``: decoded size and text (base64 when binary or undecodable)."""
    mime = header(pairs, "content-type") or UNKNOWN_MIME
    if raw is None:  # not known yet (active), or left out of the store's reply
        return {"size": max(wire_size, 0), "mimeType": mime}
    uncoded = undo_coding(raw, part)
    truncated = bool(part.get("truncated")) and not uncoded.decoded
    out: dict[str, Any] = {"size": len(uncoded.data), "mimeType": mime}
    if uncoded.decoded:
        if wire_size >= 0:
            out["compression"] = len(uncoded.data) - wire_size
    elif wire_size >= 0:
        out["size"] = max(wire_size, len(raw))  # the real size, also of a truncated body
    text = decode_text(uncoded.data, truncated) if uncoded.error is None else None
    if text is not None:
        out["text"] = text
    else:
        out["text"] = base64.b64encode(uncoded.data).decode("ascii")
        out["encoding"] = "base64"
    _mark(out, uncoded, truncated)
    return out


def _mark(body: dict[str, Any], uncoded: Uncoded, truncated: bool) -> None:
    if truncated:
        body["_truncated"] = True
    if uncoded.error is not None:
        body["_decode_error"] = uncoded.error


# -- pieces ---------------------------------------------------------------------------------
def url(flow: dict[str, Any]) -> str:
    """The absolute URL (a CONNECT tunnel's is ``https://host:port/``, as mitmproxy has it)."""
    scheme = str(flow.get("scheme") or "http").lower()
    host = str(flow.get("host") or "")
    port = flow.get("port")
    path = str(flow.get("path") or "/")
    if str(flow.get("method") or "").upper() == "CONNECT" or flow.get("kind") == "tunnel":
        path = "/"
    elif path.startswith(("http://", "https://")):
        return _quote(path)  # recorded in absolute form
    elif not path.startswith("/"):
        path = "/" + path  # OPTIONS *
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    netloc = host if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{host}:{port}"
    return f"{scheme}://{netloc}{_quote(path)}"


def _quote(text: str) -> str:
    """Bytes outside printable ASCII (recorded as latin-1) percent-encoded, escapes kept."""
    if _URL_CLEAN.fullmatch(text):  # the usual path: nothing to encode
        return text
    return quote(text.encode("latin-1", "replace"), safe=_URL_SAFE)


def query_string(path: Any) -> list[dict[str, str]]:
    if not isinstance(path, str) or "?" not in path:
        return []
    query = path.split("?", 1)[1].split("#", 1)[0]
    if "%" not in query and "+" not in query:  # nothing to unquote: parse_qsl's split, faster
        return [
            {"name": name, "value": value}
            for name, _, value in (piece.partition("=") for piece in query.split("&") if piece)
        ]
    return [
        {"name": k, "value": v}
        for k, v in parse_qsl(query, keep_blank_values=True, errors="replace")
    ]


def http_version(value: Any) -> str:
    """``1.1`` -> ``HTTP/1.1``; an unknown version stays empty."""
    text = str(value or "").strip()
    if not text:
        return ""
    return text if text.upper().startswith("HTTP/") else f"HTTP/{text}"


def request_cookies(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    """The cookies of every ``Cookie`` header (``a=1; b=2``)."""
    out = []
    for name, value in pairs:
        if name.lower() != "cookie" or value == REDACTED:
            continue
        for item in value.split(";"):
            key, _, val = item.strip().partition("=")
            if key or val:
                out.append({"name": key.strip(), "value": val.strip()})
    return out


def response_cookies(pairs: list[tuple[str, str]], start: float | None) -> list[dict[str, Any]]:
    """One cookie per ``Set-Cookie`` header, with its attributes (``Max-Age`` wins over
    ``Expires``, as in RFC 6265; both become an ISO 8601 ``expires``)."""
    out = []
    for name, value in pairs:
        if name.lower() != "set-cookie" or value == REDACTED:
            continue
        first, *attributes = value.split(";")
        key, _, val = first.partition("=")
        cookie: dict[str, Any] = {
            "name": key.strip(),
            "value": val.strip(),
            "httpOnly": False,
            "secure": False,
        }
        expires = max_age = None
        for attribute in attributes:
            attr, _, arg = attribute.partition("=")
            attr, arg = attr.strip().lower(), arg.strip()
            if attr == "path":
                cookie["path"] = arg
            elif attr == "domain":
                cookie["domain"] = arg
            elif attr == "httponly":
                cookie["httpOnly"] = True
            elif attr == "secure":
                cookie["secure"] = True
            elif attr == "samesite":
                cookie["sameSite"] = arg  # as Chrome writes it
            elif attr == "expires":
                expires = _http_date(arg)
            elif attr == "max-age":
                max_age = _int(arg)
        if max_age is not None and start is not None:
            expires = iso_time(start + max_age)
        if expires is not None:
            cookie["expires"] = expires
        out.append(cookie)
    return out


def server_ip(server: Any) -> str | None:
    """The server's IP address (omitted when the recorded address is not one)."""
    if not isinstance(server, list) or not server or not isinstance(server[0], str):
        return None
    return _ip(server[0])


@functools.lru_cache(maxsize=4096)  # an export meets the same few servers again and again
def _ip(address: str) -> str | None:
    text = address.strip("[]").split("%", 1)[0]  # an IPv6 zone is not part of an address
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def iso_time(seconds: float) -> str:
    """Epoch seconds as ISO 8601 in UTC with milliseconds (``2025-01-31T12:00:00.123Z``)."""
    try:
        whole = math.floor(seconds)
        parts = time.gmtime(whole)
        if not 1 <= parts.tm_year <= 9999:
            raise ValueError(seconds)
    except (OverflowError, OSError, ValueError):
        whole, parts = 0, time.gmtime(0)
        seconds = 0.0
    millis = min(int((seconds - whole) * 1000), 999)
    return time.strftime("%Y-%m-%dT%H:%M:%S", parts) + f".{millis:03d}Z"


def _http_date(text: str) -> str | None:
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return iso_time(moment.timestamp())
    except (OverflowError, OSError, ValueError):
        return None


def _pairs(headers: Any) -> list[tuple[str, str]]:
    if not isinstance(headers, list):
        return []
    return [(str(p[0]), str(p[1])) for p in headers if isinstance(p, list | tuple) and len(p) == 2]


def _headers(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"name": n, "value": v} for n, v in pairs]


def _num(value: Any) -> float | None:
    return float(value) if type(value) in (int, float) else None


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def record_entry(
    doc: dict[str, Any],
    request_body: bytes | None,
    response_body: bytes | None,
    max_bytes: int,
) -> bytes:
    """One stored flow's entry as JSON, for the store's ``har`` export (bodies as stored,
    None while not known). An entry over ``max_bytes`` on its own is written without its
    bodies (``_body_omitted``), so that any flow can be exported."""
    stored = {"request": request_body, "response": response_body}
    data = orjson.dumps(entry(doc, stored.get))
    if len(data) <= max_bytes:
        return data
    lean = dict(doc)
    for name in ("request", "response"):
        part = lean.get(name)
        if isinstance(part, dict):
            lean[name] = {**part, "body_omitted": True}
    return orjson.dumps(entry(lean, lambda which: None))
