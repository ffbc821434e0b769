"""A filter tree (``libs.common.flowfilter``) compiled to a portable SQL condition.

The condition selects a superset of the matching flows; ``exact`` says whether it is
the set itself. Candidates of an inexact condition are rechecked with the same
evaluator the stream uses, so SQL never decides alone what it cannot decide exactly:

- ``~c``, ``~q``, ``~s``, ``~e``, the kind operators: columns, exact;
- ``~m``, ``~d``, ``~replica``, ``~state``, ``~kind``: the regex is run over the
  column's distinct values (an index walk; methods and states are a handful, hosts
  a few thousand) and becomes ``IN (...)``, exact. Too many hosts: a ``LIKE`` on
  literals the regex requires, rechecked;
- ``~u`` (and a bare value): ``LIKE`` on the literals the regex requires, over the
  URL's columns, rechecked;
- ``~rule``, ``~tag``: the ``rules``/``tags`` columns (the ids, space-delimited with a
  space at each end, NULL when none): a plain anchored literal (``^block-ads$``) is
  ``LIKE '% block-ads %'``, exact; a pattern any id matches (``.``) is ``IS NOT NULL``,
  exact; otherwise a ``LIKE`` on the literals the regex requires, rechecked;
- headers, bodies, content types, addresses, marks: no pruning, rechecked.

AND of children is exact when all are; OR likewise, and one unprunable child makes
the OR unprunable; NOT negates only an exact child (an inexact one under NOT cannot
prune, since its superset negated would lose flows). A NULL column makes a leaf
"unknown", which outside a NOT excludes the row as false would; a NOT wraps its child
in ``COALESCE(..., FALSE)`` so that it does there too. Leaves stay bare otherwise, so
the planner can match them to indexes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from libs.common import regexlits
from libs.common.flowfilter import BINARY, And, Leaf, Node, Not, Or, authority_host, leaves
from libs.common.regexlits import required_literals
from services.store.sql import token_like, token_pattern

_DOC_CODES = frozenset(
    {"h", "hq", "hs", "t", "tq", "ts", "a", "src", "dst", "meta", "marker", "comment",
     "marked", "replay", "replayq", "replays"}
)  # fmt: skip
_BODY_CODES = frozenset({"b", "bq", "bs"})
_VOCABULARY = {"m": "method", "replica": "replica", "state": "state", "kind": "kind"}
HTTP = "COALESCE(kind, 'http') IN ('http', 'websocket')"  # one term: no index merge

# distinct values of a column (None: too many to list)
Vocabulary = Callable[[str], list[str] | None]


@dataclass
class Condition:
    """A SQL condition (``?`` placeholders) and whether it is exactly the filter."""

    sql: str
    params: list[object] = field(default_factory=list)
    exact: bool = True

    @property
    def prunes(self) -> bool:
        return self.sql != "TRUE"


@dataclass(frozen=True)
class Compiled:
    condition: Condition
    needs_doc: bool  # the recheck reads headers / addresses / marks
    needs_bodies: bool  # the recheck reads bodies

    @property
    def exact(self) -> bool:
        return self.condition.exact


_TRUE = "TRUE"
_FALSE = "FALSE"


def _wrap(sql: str, params: list[object] | None = None, exact: bool = True) -> Condition:
    return Condition(sql, params or [], exact)


def _unprunable() -> Condition:
    return Condition(_TRUE, [], exact=False)


def compile_tree(tree: Node, vocabulary: Vocabulary) -> Compiled:
    """``tree`` as a condition; ``vocabulary(column)`` lists a column's distinct values."""
    codes = {leaf.code for leaf in leaves(tree)}
    return Compiled(
        _node(tree, vocabulary),
        needs_doc=bool(codes & (_DOC_CODES | _BODY_CODES)),
        needs_bodies=bool(codes & _BODY_CODES),
    )


def _node(node: Node, vocabulary: Vocabulary) -> Condition:
    if isinstance(node, Leaf):
        return _leaf(node, vocabulary)
    if isinstance(node, Not):
        child = _node(node.child, vocabulary)
        if not child.exact:
            return _unprunable()
        if child.sql == _TRUE:
            return Condition(_FALSE)
        if child.sql == _FALSE:
            return Condition(_TRUE)
        # outside a NOT a NULL already counts as false; under one it must stay false
        return Condition(f"NOT COALESCE(({child.sql}), FALSE)", child.params)
    parts = [_node(c, vocabulary) for c in node.children]
    exact = all(p.exact for p in parts)
    if isinstance(node, And):
        kept = [p for p in parts if p.sql != _TRUE]
        if any(p.sql == _FALSE for p in kept):
            return Condition(_FALSE, [], exact)
        return _join(kept, " AND ", exact, empty=_TRUE)
    assert isinstance(node, Or)
    if any(p.sql == _TRUE for p in parts):
        return Condition(_TRUE, [], exact and all(p.exact for p in parts))
    kept = [p for p in parts if p.sql != _FALSE]
    return _join(kept, " OR ", exact, empty=_FALSE)


def _join(parts: list[Condition], op: str, exact: bool, empty: str) -> Condition:
    if not parts:
        return Condition(empty, [], exact)
    if len(parts) == 1:
        return Condition(parts[0].sql, parts[0].params, exact)
    params: list[object] = []
    for p in parts:
        params += p.params
    return Condition("(" + op.join(f"({p.sql})" for p in parts) + ")", params, exact)


def _leaf(leaf: Leaf, vocabulary: Vocabulary) -> Condition:
    code = leaf.code
    if code == "all":
        return Condition(_TRUE)
    if code in ("udp", "dns"):
        return Condition(_FALSE)
    if code == "http":
        return _wrap(HTTP)
    if code == "websocket":
        return _wrap("kind = 'websocket'")
    if code == "tcp":
        return _wrap("kind = 'tunnel'")
    if code == "q":
        return _wrap(f"{HTTP} AND status IS NULL")
    if code == "s":
        return _wrap(f"{HTTP} AND status IS NOT NULL")
    if code == "c":
        if leaf.number is None or leaf.number >= 1 << 63:  # no stored status is that big
            return Condition(_FALSE)
        return _wrap(f"{HTTP} AND status = ?", [leaf.number])
    if code == "e":
        return _wrap("error IS NOT NULL AND error <> ''")
    if code in _VOCABULARY:
        return _in_vocabulary(leaf, _VOCABULARY[code], vocabulary)
    if code == "d":
        return _domain(leaf, vocabulary)
    if code == "u":
        return _url(leaf)
    if code in _TOKEN_COLUMNS:
        return _token(leaf, _TOKEN_COLUMNS[code])
    return _unprunable()


_TOKEN_COLUMNS = {"rule": "rules", "tag": "tags"}
_ANY_TOKEN = frozenset({"", ".", ".*", ".+", "^", "$", ".?", "\\S", "[^ ]"})


def _token(leaf: Leaf, column: str) -> Condition:
    """``~rule``/``~tag``: a flow with no id never matches (the evaluator searches each
    id), so every condition carries ``column IS NOT NULL`` (the partial index's term)."""
    pattern = leaf.pattern or ""
    present = f"{column} IS NOT NULL"
    if pattern in _ANY_TOKEN:
        return _wrap(present)
    literal = anchored_literal(pattern)
    if literal is not None:
        return _wrap(f"{present} AND {token_like(column)}", [token_pattern(literal)])
    literals = required_literals(pattern)
    if not literals:
        return Condition(present, [], exact=False)
    like = _likes(column, literals)
    return Condition(f"{present} AND {like[0]}", like[1], exact=False)


def anchored_literal(pattern: str) -> str | None:
    """The text a pattern of the form ``^text$`` (``\\A``/``\\Z`` too; escapes allowed)
    matches exactly, when it could be one id or tag (printable ASCII, no space); else None.

    Case folding of ASCII letters is all a case-insensitive match of such a text adds
    (non-ASCII ones, which the regex folds in more ways than SQL, are not taken)."""
    parsed = regexlits.parse(pattern)
    if parsed is None:
        return None
    items = list(parsed)
    if len(items) < 3:
        return None
    (first, start), (last, end) = items[0], items[-1]
    if str(first) != "AT" or str(start) not in ("AT_BEGINNING", "AT_BEGINNING_STRING"):
        return None
    if str(last) != "AT" or str(end) not in ("AT_END", "AT_END_STRING"):
        return None
    chars = []
    for op, arg in items[1:-1]:
        if str(op) != "LITERAL":
            return None
        chars.append(chr(arg))
    text = "".join(chars)
    return text if all("!" <= c <= "~" for c in text) else None


def _matching(leaf: Leaf, values: list[str]) -> list[str]:
    search = leaf.searcher()
    if leaf.code in BINARY:
        return [v for v in values if search(v.encode("latin-1", "replace"))]
    return [v for v in values if search(v)]


def _in(column: str, values: list[str]) -> tuple[str, list[object]]:
    if not values:
        return _FALSE, []
    return f"{column} IN ({', '.join('?' for _ in values)})", list(values)


def _matches_nothing_recorded(leaf: Leaf) -> bool:
    """Whether the pattern matches the empty string: the evaluator reads a missing field
    as "", so then rows with the column NULL match too."""
    return _matching(leaf, [""]) == [""]


def _in_vocabulary(leaf: Leaf, column: str, vocabulary: Vocabulary) -> Condition:
    values = vocabulary(column)
    if values is None:
        return _unprunable()
    sql, params = _in(column, _matching(leaf, values))
    if _matches_nothing_recorded(leaf):
        sql = f"{column} IS NULL" if sql == _FALSE else f"({sql} OR {column} IS NULL)"
    if sql == _FALSE:
        return Condition(_FALSE)
    if leaf.code == "m":
        return _wrap(f"{HTTP} AND {sql}", params)
    return _wrap(sql, params)


def _domain(leaf: Leaf, vocabulary: Vocabulary) -> Condition:
    """``~d``: the request's host or the Host header's (``authority``, stored only when
    it differs from the host)."""
    # hosts are listed lowercased (from ``rhost``): a pattern that turns case folding off
    # inline cannot be run over them
    hosts = vocabulary("host") if "(?" not in (leaf.pattern or "") else None
    authorities = vocabulary("authority") if hosts is not None else None
    if hosts is not None and authorities is not None:
        rhosts = [h[::-1] for h in _matching(leaf, hosts)]
        host_sql, host_params = _in("rhost", rhosts)
        search = leaf.searcher()
        auth_sql, auth_params = _in(
            "authority", [a for a in authorities if search(authority_host(a))]
        )
        either = [s for s in (host_sql, auth_sql) if s != _FALSE]
        if _matches_nothing_recorded(leaf):
            either.append("rhost IS NULL")
        if not either:
            return Condition(_FALSE)
        return _wrap(f"{HTTP} AND ({' OR '.join(either)})", host_params + auth_params)
    literals = required_literals(leaf.pattern or "")
    if not literals:
        return _unprunable()
    like = _likes(URL_SEARCH, literals)  # holds the host and the Host header's authority
    return _wrap(f"{HTTP} AND {like[0]}", like[1], exact=False)


# The URL as ~u sees it, spelled twice: with the request's port and without (the real
# URL leaves a default port out, and a literal may span host and path either way); a
# Host header that says otherwise is ``authority``, stored as the URL shows it.
_URL_WITH_PORT = (
    "(COALESCE(scheme, 'http') || '://' || COALESCE(authority, COALESCE(host, '') || ':' "
    "|| COALESCE(CAST(port AS TEXT), '')) || COALESCE(path, ''))"
)
_URL_NO_PORT = (
    "(COALESCE(scheme, 'http') || '://' || COALESCE(authority, host, '') || COALESCE(path, ''))"
)
# What a substring search of ``~u`` and of ``~d`` (past the host vocabulary) runs LIKE over:
# both spellings of the URL and the request's own host, one string. A literal matching it
# may span two parts, which only adds candidates (the recheck drops them); one expression
# means one trigram index on PostgreSQL (``pgschema``), where two or three cost ingest
# a third of its rate each.
URL_SEARCH = f"({_URL_WITH_PORT} || ' ' || {_URL_NO_PORT} || ' ' || COALESCE(host, ''))"


def _url(leaf: Leaf) -> Condition:
    literals = required_literals(leaf.pattern or "")
    if not literals:
        return Condition(_TRUE, [], exact=False) if leaf.pattern else _wrap(HTTP)
    like = _likes(URL_SEARCH, literals)
    return _wrap(f"{HTTP} AND {like[0]}", like[1], exact=False)


def _likes(column: str, literals: list[str]) -> tuple[str, list[object]]:
    """``lower(column) LIKE '%a%b%'``: the literals, in the order the regex requires them
    (ASCII case folded on both sides, as the regex folds it)."""
    pattern = "%" + "%".join(_escape_like(lit.lower()) for lit in literals) + "%"
    return f"lower({column}) LIKE ? ESCAPE '\\'", [pattern]


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
