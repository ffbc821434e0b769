"""The filter language's view of a live exchange (rules match on the relay's ``Flow``).

``libs.common.flowfilter`` evaluates expressions over a ``FlowView``: accessors that
the operators call (``url()``, ``header_block()``, ``text("host")`` ...). The store
and the stream build one over a recorded flow event; the relay has no event, only its
``Flow`` with bytes headers, so ``LiveView`` answers the same accessors from it,
computing each at most once per phase (the URL, a header block) and allocating
nothing for operators a policy does not use. Bodies are never seen here: rules match
on heads (``libs.common.policy``).
"""

from __future__ import annotations

from typing import Any

from libs.common.flowfilter import HTTP_KINDS, FlowView, authority_parts, pretty_url
from services.proxy.flow import Flow


class LiveView(FlowView):
    """A ``FlowView`` over the relay's ``Flow`` of one exchange."""

    __slots__ = ("_flow", "_replica")

    def __init__(self, flow: Flow, replica: str) -> None:  # no super(): no document
        self._flow = flow
        self._replica = replica
        self._cache: dict[str, Any] = {}
        self._bodies = None

    @property
    def doc(self) -> dict[str, Any]:  # type: ignore[override]
        """What the operators without an accessor read (``~e``, ``~replay``, ``~meta``)."""
        doc = self._cache.get("doc")
        if doc is None:
            f = self._flow
            doc = self._cache["doc"] = {
                "kind": f.kind,
                "error": f.error,
                "is_replay": "request" if f.replay_of else None,
                "policy": None if f.policy is None else {"matched": f.policy[1]},
                "tags": f.tags or [],
            }
        return doc

    @property
    def is_http(self) -> bool:
        return self._flow.kind in HTTP_KINDS

    @property
    def response(self) -> dict[str, Any] | None:
        status = self._flow.status
        return {"status": status} if status > 0 else None

    def status(self) -> int | None:
        return self._flow.status or None

    def text(self, name: str) -> str:
        f = self._flow
        if name == "host":
            return f.host
        if name == "method":
            return f.method.decode("latin-1")
        if name == "path":
            return f.path.decode("latin-1")
        if name == "scheme":
            return f.scheme
        if name == "kind":
            return f.kind
        if name == "state":
            return f.state
        if name == "replica":
            return self._replica
        return ""

    def _raw_headers(self, which: str) -> list[tuple[bytes, bytes]]:
        f = self._flow
        return f.req_headers if which == "request" else f.resp_headers

    def headers(self, which: str) -> list[Any]:
        return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self._raw_headers(which)]

    def header_block(self, which: str) -> bytes:
        key = "hb" + which
        block = self._cache.get(key)
        if block is None:
            block = self._cache[key] = b"".join(
                [n + b": " + v + b"\r\n" for n, v in self._raw_headers(which)]
            )
        return block

    def content_types(self, which: str) -> list[bytes]:
        return [v for n, v in self._raw_headers(which) if n.lower() == b"content-type"]

    def body(self, which: str) -> bytes | None:
        return None

    def host_header(self) -> str | None:
        for name, value in self._flow.req_headers:
            if name.lower() == b"host":
                return value.decode("latin-1")
        return None

    def pretty_host(self) -> str:
        host = self._cache.get("ph")
        if host is None:
            header = self.host_header()
            host = self._cache["ph"] = (authority_parts(header)[0] if header else "") or (
                self._flow.host
            )
        return str(host)

    def url(self) -> str:
        url = self._cache.get("url")
        if url is None:
            f = self._flow
            url = self._cache["url"] = pretty_url_cached(
                f.scheme, f.host, f.port, f.path, f.method.decode("latin-1"), self.host_header()
            )
        return str(url)

    def address(self, name: str) -> str | None:
        f = self._flow
        value = f.client_addr if name == "client" else f.server_addr
        if isinstance(value, list | tuple) and len(value) >= 2 and value[0]:
            return f"{value[0]}:{value[1]}"
        return None

    def destination(self) -> str | None:
        f = self._flow
        return f"{f.host}:{f.port}" if f.server_addr and f.host else None


_AUTHORITIES: dict[tuple[str, str, int, str | None], str] = {}
_AUTHORITIES_MAX = 4096


def pretty_url_cached(
    scheme: str, host: str, port: int, path: bytes, method: str, host_header: str | None
) -> str:
    """``flowfilter.pretty_url`` with its ``scheme://authority`` remembered per target and
    Host header (one connection sends the same ones over and over)."""
    if method == "CONNECT":
        return pretty_url(scheme, host, port, "", method, host_header)
    key = (scheme, host, port, host_header)
    prefix = _AUTHORITIES.get(key)
    if prefix is None:
        if len(_AUTHORITIES) >= _AUTHORITIES_MAX:
            _AUTHORITIES.clear()
        prefix = _AUTHORITIES[key] = pretty_url(scheme, host, port, "", method, host_header)
    return prefix + path.decode("latin-1")
