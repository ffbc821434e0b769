"""``replace_body`` rules: a body held back, rewritten whole, sent with a new length.

The relay streams bodies; a rewrite needs the whole of one, so while an exchange
carries a ``BodyRewrite`` for a direction, that body is buffered here (up to
``LIMIT``), then every substitution of the phase runs on it in order and the result
goes out framed by ``Content-Length``. A coded body (gzip, br, ...) is decoded first and
sent decoded, its ``Content-Encoding`` dropped. A body over the limit, or one that
cannot be decoded, is sent as it came, and each rule's line in the flow's decision
says why (``note``).
"""

from __future__ import annotations

from typing import Any

from libs.common import codings

LIMIT = 8 << 20  # bytes of one body a rewrite holds back; larger bodies pass unchanged
SUB_TIMEOUT = 0.5  # seconds one substitution may take on one body


class BodyRewrite:
    """The substitutions of one direction of one exchange, and the body held for them."""

    __slots__ = ("buf", "entries", "framing", "size", "subs")

    def __init__(self) -> None:
        self.subs: list[tuple[Any, bytes]] = []  # (compiled bytes regex, replacement)
        self.entries: list[dict[str, Any]] = []  # the decision line of each substitution
        self.buf: list[bytes] = []
        self.size = 0
        self.framing: Any = None  # the response's framing while its head is held back

    def add(self, rx: Any, replacement: bytes, entry: dict[str, Any]) -> None:
        self.subs.append((rx, replacement))
        self.entries.append(entry)

    def take(self, piece: bytes) -> bool:
        """Hold ``piece`` back; False (nothing kept) when the body would pass ``LIMIT``."""
        if self.size + len(piece) > LIMIT:
            return False
        self.buf.append(piece)
        self.size += len(piece)
        return True

    def give_up(self, why: str) -> list[bytes]:
        """Send the body unchanged: every rule says ``why``; the pieces held so far."""
        for entry in self.entries:
            entry["note"] = why
        held, self.buf = self.buf, []
        return held

    def apply(
        self, headers: list[tuple[bytes, bytes]]
    ) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
        """The rewritten body and the headers to send it with; None when the body
        cannot be decoded (then sent as it came, see ``give_up``)."""
        body = b"".join(self.buf)
        coding = b", ".join(v for n, v in headers if n.lower() == b"content-encoding")
        if codings.codings(coding.decode("latin-1")):
            decoded = codings.decode(body, coding.decode("latin-1"), LIMIT)
            if decoded is None:
                return None
            body = decoded
            headers = [h for h in headers if h[0].lower() != b"content-encoding"]
        for (rx, replacement), entry in zip(self.subs, self.entries, strict=True):
            try:
                body, count = rx.subn(lambda _m, r=replacement: r, body, timeout=SUB_TIMEOUT)
            except TimeoutError:
                entry["note"] = "pattern timed out: not applied"
                continue
            entry["note"] = f"{count} replaced" if count else "no match"
        self.buf = []
        return body, headers
