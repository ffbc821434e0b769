"""``GET /api/events`` parameters without a NATS: the time_range shorthand, its conflict
with since/until, and the "at least" severity filter."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError

from services.api.params import validate_query
from services.api.routes.events import EventListParams, parse_time_range


def params(**query: Any) -> EventListParams:
    return validate_query(EventListParams, {k: str(v) for k, v in query.items()})


def refused(**query: Any) -> list[str]:
    with pytest.raises(RequestValidationError) as info:
        params(**query)
    return [".".join(map(str, e["loc"])) for e in info.value.errors()]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m", 300), ("1h", 3600), ("24h", 86400), ("7d", 7 * 86400), ("30s", 30), ("all", None)],
)
def test_time_range_shorthands(text: str, seconds: float | None) -> None:
    assert parse_time_range(text) == seconds
    assert parse_time_range(text.upper()) == seconds


@pytest.mark.parametrize(
    "text", ["5x", "0m", "-5m", "5", "m", "1.5h", "5 m", "1h30m", "9999999d", "", "al", "1w"]
)
def test_bad_time_ranges_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="5m, 1h, 24h, 7d"):
        parse_time_range(text)
    assert refused(time_range=text) == ["query.time_range"]


def test_time_range_is_a_window_before_now() -> None:
    assert params(time_range="1h").window(10_000.0) == (6_400.0, None)
    assert params(time_range="all").window(10_000.0) == (None, None)
    assert params(since=5, until=9).window(10_000.0) == (5.0, 9.0)
    assert params().window(10_000.0) == (None, None)


@pytest.mark.parametrize(
    "query",
    [
        {"time_range": "1h", "since": 5},
        {"time_range": "all", "until": 5},
        {"time_range": "5m", "since": "2025-01-01T00:00:00Z", "until": 9e9},
    ],
)
def test_time_range_with_since_or_until_is_a_422(query: dict[str, Any]) -> None:
    assert refused(**query) == ["query.time_range"]


def test_severity_is_at_least() -> None:
    records = [{"severity": s} for s in ("info", "warning", "error", "critical")] + [{}]
    assert params().keep() is None and params(severity="info").keep() is None
    warning = params(severity="warning").keep()
    error = params(severity="error").keep()
    assert warning is not None and error is not None
    assert [r.get("severity") for r in records if warning(r)] == ["warning", "error"]
    assert [r.get("severity") for r in records if error(r)] == ["error"]


@pytest.mark.parametrize("value", ["debug", "ERROR", "", "warn", "critical"])
def test_unknown_severities_are_refused(value: str) -> None:
    assert refused(severity=value) == ["query.severity"]
