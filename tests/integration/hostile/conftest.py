"""Fixtures of the hostile corpus: ``watch`` (flow events of any replica a test
starts) lives in ``tests/integration/conftest.py``; this package adds none of its own."""
