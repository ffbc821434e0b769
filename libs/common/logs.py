"""Logging setup shared by every service: one line per lifecycle event."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO", service: str = "proxyfleet") -> None:
    """Log to stderr as ``time level service logger: message``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("nats").setLevel(max(logging.WARNING, root.level))
