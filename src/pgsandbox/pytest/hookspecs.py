"""Hooks a conftest.py can implement."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.hookspec
def pytest_pgsandbox_migrate(conn: Any, session: Any, url: str, dsn: str) -> None:
    """Build the schema: called once per template build, after the migrations pg_migrations names. An
    implementation names what it takes: ``conn`` (a psycopg connection to the template, committed
    afterwards), ``session`` (a SQLAlchemy Session bound to it, committed and closed by pgsandbox), ``url``
    or ``dsn``; an ``async def`` one gets an AsyncConnection/AsyncSession on an event loop of its own.
    Files it reads are watched (a change rebuilds the template); list them in pg_migrations_inputs to make
    them part of the template's hash."""


@pytest.hookspec
def pytest_pgsandbox_seed(conn: Any, session: Any, url: str, dsn: str) -> None:
    """Add seed data on top of the migrations, once per template build (a cached layer of its own); takes
    the same arguments as pytest_pgsandbox_migrate."""
