"""Secrets kept out of recorded flows: header redaction at serialisation time.

The relay records headers exactly as they crossed the proxy and never looks at
them for this; the capture publisher applies a ``Redaction`` when it turns a
flow into its wire event, i.e. before anything leaves the replica. A
``Redaction`` is compiled once (per config revision, and again whenever the set
of API-key digests changes) into frozensets of lowercase byte names, so each
header costs one ``lower()`` and one set lookup.

Three rules, in order:

1. ``Proxy-Authorization`` is never recorded: it is removed, not masked (it is
   the credential of the proxy itself, and nothing a user would want to see).
2. Headers named in ``redact_headers`` keep their name, their value becomes
   ``MARK``.
3. Our own API keys are never stored in clear, whatever ``redact_headers`` says:
   the values of ``X-API-Key`` and the token of ``Authorization: Bearer <t>``
   are hashed (SHA-256, as the API hashes a presented key) and masked when the
   digest is one the API published (KV ``fleet_keys``, see ``Control``).
   Only those two places are hashed: it is where the API reads keys from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from libs.common.models import DEFAULT_REDACT_HEADERS

MARK = "<redacted>"
NEVER_RECORDED = b"proxy-authorization"

_X_API_KEY = b"x-api-key"
_AUTHORIZATION = b"authorization"
_KEY_HEADERS = frozenset({_X_API_KEY, _AUTHORIZATION})
_sha256 = hashlib.sha256


def _api_key_digest(name: bytes, value: bytes) -> bytes | None:
    """The digest the API would compute for the key in this header, or None if none."""
    if name == _AUTHORIZATION:
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        value = token
    value = value.strip()
    if not value:
        return None
    # the API sees header values as latin-1 text and hashes their UTF-8 (surrogateescape)
    return _sha256(value.decode("latin-1").encode("utf-8", "surrogateescape")).digest()


_KEEP, _DROP, _MASK, _KEYED = 0, 1, 2, 3  # what happens to a header, by its name
_VERDICTS_MAX = 4096  # names remembered per Redaction (header names repeat a lot)


@dataclass(frozen=True, slots=True)
class Redaction:
    """A compiled redaction: header names to mask and API-key digests to recognise.

    The verdict for each header name seen (as the bytes the parser produced, any
    case) is remembered, so a serialised header usually costs one dict lookup.
    """

    names: frozenset[bytes]
    key_digests: frozenset[bytes] = frozenset()
    _verdicts: dict[bytes, int] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def compile(cls, names: Iterable[str], key_digests: Iterable[bytes] = ()) -> Redaction:
        return cls(
            frozenset(n.strip().lower().encode("latin-1") for n in names if n.strip()),
            frozenset(key_digests),
        )

    def with_key_digests(self, key_digests: Iterable[bytes]) -> Redaction:
        return Redaction(self.names, frozenset(key_digests))

    def _verdict(self, name: bytes) -> int:
        low = name.lower()
        if low == NEVER_RECORDED:
            verdict = _DROP
        elif low in self.names:
            verdict = _MASK
        elif low in _KEY_HEADERS and self.key_digests:
            verdict = _KEYED
        else:
            verdict = _KEEP
        verdicts = self._verdicts
        if len(verdicts) >= _VERDICTS_MAX:  # a client sending endless distinct names
            verdicts.clear()
        verdicts[name] = verdict
        return verdict

    def headers(self, pairs: list[tuple[bytes, bytes]]) -> list[list[str]]:
        """``pairs`` as the event's ``[[name, value], ...]``, secrets removed or masked."""
        verdicts = self._verdicts
        out: list[list[str]] = []
        for n, v in pairs:
            verdict = verdicts.get(n)
            if verdict is None:
                verdict = self._verdict(n)
            if verdict == _KEEP:
                out.append([n.decode("latin-1"), v.decode("latin-1")])
            elif verdict == _MASK:
                out.append([n.decode("latin-1"), MARK])
            elif verdict == _KEYED:
                masked = _api_key_digest(n.lower(), v) in self.key_digests
                out.append([n.decode("latin-1"), MARK if masked else v.decode("latin-1")])
        return out


DEFAULT = Redaction.compile(DEFAULT_REDACT_HEADERS)
