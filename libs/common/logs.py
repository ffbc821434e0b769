"""Logging setup shared by every service: one line per lifecycle event.

Two formats (``FLEET_LOG_FORMAT``): ``text``, ``time level service logger: message``,
for people; ``json``, one JSON object per line (``time``, ``level``, ``service``,
``logger``, ``message``, and ``trace_id`` / ``span_id`` when an OpenTelemetry span
is current), for log shippers. Nothing logs per proxied request or per API call.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson
from opentelemetry import trace

LogConfig = tuple[str, str, str]  # level, service, format
_current: LogConfig | None = None


def _utc(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
        f".{int(record.msecs):03d}Z"
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per record; trace context added when a valid span is current."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": _utc(record),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            doc["trace_id"] = format(ctx.trace_id, "032x")
            doc["span_id"] = format(ctx.span_id, "016x")
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(doc, default=str).decode()


def formatter(service: str, fmt: str = "text") -> logging.Formatter:
    """The formatter of ``fmt`` (``text`` or ``json``) for ``service``."""
    if fmt == "json":
        return JsonFormatter(service)
    return logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")


def setup_logging(level: str = "INFO", service: str = "proxyfleet", fmt: str = "text") -> None:
    """Log to stderr in ``fmt`` (``text``: ``time level service logger: message``; ``json``)."""
    global _current
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(service, fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("nats").setLevel(max(logging.WARNING, root.level))
    _current = (level, service, fmt)


def current_config() -> LogConfig | None:
    """What ``setup_logging`` was last called with (for worker processes), or None."""
    return _current


def is_json() -> bool:
    """True when this process logs JSON lines."""
    return _current is not None and _current[2] == "json"
