"""Store repository fixtures: the same tests against each backend.

``make_repo(**options)`` opens a repository of the test's backend (``backend``: SQLite
in the test's temporary directory, or PostgreSQL in a database of the test's own) and
closes it after the test; repositories made twice in one test share the database, as
store replicas do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from services.store.repository import FlowRepository

MakeRepo = Callable[..., Awaitable[FlowRepository]]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_repo(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[MakeRepo]:
    opened: list[FlowRepository] = []
    dsn = request.getfixturevalue("pg_dsn") if backend == "postgres" else ""

    async def make(**options: Any) -> FlowRepository:
        repo: FlowRepository
        if backend == "postgres":
            from services.store.postgres import PostgresRepository

            options.pop("ingest_workers", None)  # the database does the writing
            repo = PostgresRepository(dsn, **options)
        else:
            from services.store.sqlite import SQLiteRepository

            repo = SQLiteRepository(tmp_path / "flows.db", **options)
        await repo.open()
        opened.append(repo)
        return repo

    try:
        yield make
    finally:
        for repo in opened:
            await repo.close()
