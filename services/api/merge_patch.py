"""RFC 7396 JSON merge patch: what ``PATCH /api/config`` applies to the saved document.

A merge patch is the changed part of the document: members present replace, ``null``
removes (for the config: the field returns to its default), objects merge member by
member, and anything else (arrays included) replaces whole. A pure function, so the
route can re-apply the same patch to a newer document when a compare-and-set loses.
"""

from __future__ import annotations

from typing import Any


def apply(target: Any, patch: Any) -> Any:
    """``target`` with ``patch`` merged in (RFC 7396 section 2); neither is modified."""
    if not isinstance(patch, dict):
        return patch
    out: dict[str, Any] = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = apply(out.get(name), value)
    return out
