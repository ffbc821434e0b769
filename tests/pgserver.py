"""The PostgreSQL server the tests use, and a fresh database per test.

The server, in this order:

1. ``FLEET_TEST_PG_DSN``: used as is (it must allow CREATE DATABASE);
2. a server on this machine (``127.0.0.1:5432``, user ``postgres`` or the current user)
   that answers within two seconds;
3. a testcontainers ``PostgresContainer`` when a Docker engine answers.

None of them: the PostgreSQL tests fail (never skip): the store's PostgreSQL backend
is a shipped feature, and a suite that cannot reach a server has not tested it.
Each test gets its own database (``fleet_test_<random>``), dropped after it.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql


def _answers(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=2).close()
    except psycopg.Error:
        return False
    return True


@contextlib.contextmanager
def server_dsn() -> Iterator[str]:
    """A DSN of a server whose user may create databases (resolution order above)."""
    env = os.environ.get("FLEET_TEST_PG_DSN")
    if env:
        yield env
        return
    for user in ("postgres", getpass.getuser()):
        local = f"postgresql://{user}@127.0.0.1:5432/postgres"
        if _answers(local):
            yield local
            return
    container: Any = None
    with contextlib.suppress(Exception):
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:16-alpine", driver=None).start()
    if container is None:
        raise RuntimeError(
            "no PostgreSQL for the tests: set FLEET_TEST_PG_DSN, run a server on "
            "127.0.0.1:5432, or a Docker engine for testcontainers"
        )
    try:
        yield container.get_connection_url()
    finally:
        container.stop()


def with_database(dsn: str, name: str) -> str:
    """``dsn`` pointing at database ``name`` instead."""
    base, _, query = dsn.partition("?")
    head, _, _db = base.rpartition("/")
    return f"{head}/{name}" + (f"?{query}" if query else "")


@contextlib.contextmanager
def fresh_database(server: str) -> Iterator[str]:
    """A new, empty database for one test; dropped (its connections ended) after it."""
    name = f"fleet_test_{secrets.token_hex(6)}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(server, name)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
