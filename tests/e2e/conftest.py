"""End-to-end fixtures reuse the integration ones (upstream servers, test CA)."""

from tests.integration.conftest import upstream

__all__ = ["upstream"]
