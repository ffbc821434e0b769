"""Task helpers: no fire-and-forget task is lost to the garbage collector, and a
process runs until SIGTERM/SIGINT.

asyncio keeps only weak references to tasks, so a task nobody holds can vanish
mid-flight. ``spawn`` keeps a strong reference until the task ends and logs a
crash instead of letting "Task exception was never retrieved" appear at exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("proxyfleet.tasks")

T = TypeVar("T")
_background: set[asyncio.Task[Any]] = set()


def _done(task: asyncio.Task[Any]) -> None:
    _background.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("background task %s crashed: %r", task.get_name(), exc, exc_info=exc)


def spawn(coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
    """Start ``coro`` as a task that is referenced until it finishes."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _background.add(task)
    task.add_done_callback(_done)
    return task


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel tasks and wait until they have really ended (ignoring their outcome).

    A cancellation can be lost: on Python 3.11 ``asyncio.wait_for`` (used by nats-py
    for every request, JetStream publishes included) returns the result instead of
    raising when its future completes in the same loop turn as the cancel. A task that
    swallowed it would then wait forever, so tasks still running are cancelled again.
    """
    live = [t for t in tasks if t is not None and not t.done()]
    while live:
        for t in live:
            t.cancel()
        done, _ = await asyncio.wait(live, timeout=0.5)
        for t in done:
            if not t.cancelled():
                t.exception()  # retrieved: no "exception was never retrieved" warning
        live = [t for t in live if not t.done()]


def install_signal_handlers(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGTERM or SIGINT (a second signal still ends the process)."""
    loop = asyncio.get_running_loop()

    def _on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", sig.name)
            raise SystemExit(1)
        log.info("received %s, shutting down", sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, sig)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed, else on the stdlib loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency on Linux
        return asyncio.run(main)
    return uvloop.run(main)
