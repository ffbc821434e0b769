"""The literal substrings a regex requires: a cheap test that rules out a regex search.

Every match of ``abc.*def`` contains ``abc`` and ``def``; a text without one of them
cannot match, and ``"abc" in text`` costs a fraction of a regex search. The store
turns these into ``LIKE`` prefilters and the proxy's rules skip a rule whose required
literal is absent. A literal here must never rule out a text the regex would match, so
anything uncertain yields no literal:

- only top-level runs of literal characters count (a group without alternatives is
  looked into); any other element ends a run;
- the pattern is read by CPython's own parser. The ``regex`` engine that runs it
  (``libs.common.flowfilter``) reads a few things that parser takes as literal text
  differently: fuzzy constraints (``(?:abc){e<=1}``), so runs with braces are dropped,
  and POSIX classes (``[[:alpha:]]``), so runs with brackets are dropped;
- literals with non-ASCII characters are dropped: case-insensitive matching folds more
  of Unicode than ``str.lower`` does (the long s, U+017F, matches ``s``).
"""

from __future__ import annotations

import warnings
from typing import Any

try:  # CPython's own regex parser (best effort: no literal when it is missing)
    from re import _parser as _sre_parser  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - other interpreters
    _sre_parser = None

MIN_LITERAL = 2  # shorter literals rule out too little to be worth a test
_UNSURE = frozenset("[]{}")


def parse(pattern: str) -> Any | None:
    """CPython's parse of ``pattern`` (its list of (op, argument) items), or None when it
    cannot read it (a syntax only the regex engine knows, or no parser)."""
    if _sre_parser is None:
        return None
    try:
        with warnings.catch_warnings():  # "possible nested set": POSIX classes, see above
            warnings.simplefilter("ignore", FutureWarning)
            return _sre_parser.parse(pattern)
    except Exception:
        return None


def required_literals(pattern: str) -> list[str]:
    """Substrings every match of ``pattern`` contains, in order (may be empty)."""
    parsed = parse(pattern)
    if parsed is None:
        return []
    runs: list[str] = []
    current: list[str] = []

    def end_run() -> None:
        if current:
            runs.append("".join(current))
            current.clear()

    def walk(items: object) -> None:
        for op, arg in items:  # type: ignore[attr-defined]
            name = str(op)
            if name == "LITERAL":
                current.append(chr(arg))
            elif name == "SUBPATTERN" and not _has_branch(arg[-1]):
                walk(arg[-1])
            else:
                end_run()

    walk(parsed)
    end_run()
    return [r for r in runs if len(r) >= MIN_LITERAL and r.isascii() and not _UNSURE & set(r)]


def _has_branch(items: object) -> bool:
    for op, arg in items:  # type: ignore[attr-defined]
        name = str(op)
        if name in ("BRANCH", "GROUPREF", "GROUPREF_EXISTS", "ASSERT", "ASSERT_NOT"):
            return True
        if name == "SUBPATTERN" and _has_branch(arg[-1]):
            return True
    return False


_REPEATS = frozenset(
    {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT", "GROUPREF", "GROUPREF_EXISTS"}
)


def cannot_backtrack(pattern: str) -> bool:
    """True when ``pattern`` has no repetition and no back-reference: a search then costs
    at most the text's length times the pattern's, so it needs no time budget. Anything
    the parser cannot read, or braces (the regex engine's fuzzy matching), is False."""
    if "{" in pattern:
        return False
    parsed = parse(pattern)
    return parsed is not None and not _repeats(parsed)


def _repeats(items: object) -> bool:
    for op, arg in items:  # type: ignore[attr-defined]
        if str(op) in _REPEATS or any(_repeats(sub) for sub in _subpatterns(arg)):
            return True
    return False


def _subpatterns(arg: object) -> list[object]:
    """The nested patterns of one element (a group's body, a branch's alternatives)."""
    if not isinstance(arg, tuple | list):
        return []
    out: list[object] = []
    for part in arg:
        if hasattr(part, "data"):
            out.append(part)
        elif isinstance(part, list):
            out.extend(p for p in part if hasattr(p, "data"))
    return out
