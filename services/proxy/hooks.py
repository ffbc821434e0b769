"""The hook seam: where features (addons) look at and change exchanges.

Five synchronous hooks at fixed points of an exchange, each called with the
``Exchange`` (its ``flow`` holds the parsed head):

- ``request_head``: the request head is parsed and routed (``flow.scheme``,
  ``host``, ``port``, ``path`` are set); nothing has been sent upstream. An addon
  may rewrite ``flow.method``, ``flow.path``, ``flow.req_headers`` or the target
  (``flow.scheme``, ``flow.host``, ``flow.port``: the upstream head and connection
  follow them); answer the request itself (``ex.respond``); kill it
  (``ex.kill``); or hold it until resumed (``ex.hold`` / ``ex.resume``). Also
  called for ``CONNECT`` (``flow.method == b"CONNECT"``), where ``ex.tunnel``
  decides between interception and a blind tunnel.
- ``request_end``: the whole request body has been read.
- ``response_head``: the upstream's response head is parsed and not yet sent
  on; ``flow.status`` and ``flow.resp_headers`` may be rewritten (the body keeps
  the framing the upstream gave it), the exchange killed, or held: the upstream
  connection is then not read until ``resume``.
- ``response_end``: the exchange ended normally (also tunnels and WebSockets).
- ``error``: the exchange ended in error or was killed (``flow.error`` says why).

Hooks never await: a feature that must wait (intercept) holds the exchange and
resumes it from a callback. The chain is compiled once per config revision
into one tuple of bound methods per hook, holding only addons that define the
hook, so an empty chain costs the relay one attribute read and a falsy test
per hook point.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.proxy.exchange import Exchange

log = logging.getLogger("proxyfleet.proxy")

HOOKS = ("request_head", "request_end", "response_head", "response_end", "error")

Hook = Callable[["Exchange"], None]


class Addon:
    """A feature on the seam: override the hooks it needs (the others cost nothing)."""

    name = "addon"

    def request_head(self, ex: Exchange) -> None:
        """The request head is in (see the module docstring)."""

    def request_end(self, ex: Exchange) -> None:
        """The request body is in."""

    def response_head(self, ex: Exchange) -> None:
        """The response head is in, not yet sent to the client."""

    def response_end(self, ex: Exchange) -> None:
        """The exchange ended normally."""

    def error(self, ex: Exchange) -> None:
        """The exchange ended in error or was killed."""


class AddonChain:
    """The addons of one config revision, as one tuple of hooks per hook point."""

    __slots__ = ("addons", *HOOKS)

    def __init__(self, addons: Sequence[Addon] = ()) -> None:
        self.addons = tuple(addons)
        for hook in HOOKS:
            base = getattr(Addon, hook)
            bound = tuple(
                getattr(a, hook) for a in self.addons if getattr(type(a), hook) is not base
            )
            setattr(self, hook, bound)

    request_head: tuple[Hook, ...]
    request_end: tuple[Hook, ...]
    response_head: tuple[Hook, ...]
    response_end: tuple[Hook, ...]
    error: tuple[Hook, ...]


def run(hooks: tuple[Hook, ...], ex: Exchange) -> None:
    """Call each hook in order; stop early once one answered, killed or held the exchange.

    An addon that raises is logged and skipped: one broken feature must not take
    the connection down with it.
    """
    for hook in hooks:
        try:
            hook(ex)
        except Exception:
            log.exception("addon hook %s failed", getattr(hook, "__qualname__", hook))
        if ex.verdict:
            return
