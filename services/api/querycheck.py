"""Unknown query parameters are refused on every ``/api`` route, in one place.

FastAPI ignores a query parameter a route does not declare, so ``?replcia=a`` (a typo)
silently returns the whole fleet. ``known_query`` is a dependency of the ``/api``
router: it reads the parameters the matched route declares (its own and its
dependencies', by alias) and answers a 422 naming ``query.<param>`` for any other.

Routes that validate their query string themselves (a pydantic model with
``extra="forbid"`` through ``params.validate_query``) document it with
``openapi_extra={"parameters": ...}``; those are left alone, so their own, more
specific messages stay theirs. The allowed names are worked out once per route.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

_CACHE = "query_names"  # on app.state: id(route) -> allowed names (None: the route checks)


def _declared(dependant: Dependant) -> set[str]:
    names: set[str] = set()
    stack = [dependant]
    while stack:
        current = stack.pop()
        names.update(field.alias for field in current.query_params)
        stack.extend(current.dependencies)
    return names


def allowed_parameters(route: APIRoute) -> frozenset[str] | None:
    """The query parameters ``route`` declares; None when it validates its own."""
    extra: dict[str, Any] = route.openapi_extra or {}
    return None if "parameters" in extra else frozenset(_declared(route.dependant))


async def known_query(request: Request) -> None:
    """422 naming each query parameter the matched route does not declare."""
    if not request.scope.get("query_string"):
        return
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    # routes are not hashable; the app holds them, so their ids are stable while it lives
    cache: dict[int, frozenset[str] | None] | None = getattr(request.app.state, _CACHE, None)
    if cache is None:
        cache = {}
        setattr(request.app.state, _CACHE, cache)
    if id(route) not in cache:
        cache[id(route)] = allowed_parameters(route)
    allowed = cache[id(route)]
    if allowed is None:
        return
    unknown = [name for name in dict.fromkeys(request.query_params) if name not in allowed]
    if unknown:
        hint = ", ".join(sorted(allowed)) or "none"
        raise RequestValidationError(
            [
                {
                    "loc": ("query", name),
                    "msg": f"unknown query parameter (this route takes: {hint})",
                    "type": "extra_forbidden",
                }
                for name in unknown
            ]
        )
