"""Hooks a conftest.py can implement."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.hookspec
def pytest_pgsandbox_migrate(conn: Any) -> None:
    """Build the schema: called once per template build with a psycopg connection to the template
    (committed afterwards), after the migrations pg_migrations names. Files it reads beyond its own
    module belong in pg_migrations_inputs, so that changing them rebuilds the template."""


@pytest.hookspec
def pytest_pgsandbox_seed(conn: Any) -> None:
    """Add seed data on top of the migrations, once per template build (a cached layer of its own)."""
