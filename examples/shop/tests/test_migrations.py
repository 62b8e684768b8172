"""The schema: built once by the Alembic migrations into pgsandbox's template, cloned for every test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from pgsandbox import Database, Server
from shop.models import Base


def test_the_database_is_at_the_latest_revision(pg: Database) -> None:
    head = ScriptDirectory.from_config(Config(Path(__file__).parents[1] / "alembic.ini")).get_current_head()
    assert pg.fetchval("SELECT version_num FROM alembic_version") == head == "0003"


def test_the_models_match_the_migrations(pg_engine: Engine) -> None:
    """What ``alembic revision --autogenerate`` would find missing: nothing."""
    with pg_engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_the_database_enforces_the_rules(pg_conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.CheckViolation, match="ck_products_stock_not_negative"):
        pg_conn.execute("INSERT INTO products (sku, title, price, stock) VALUES ('X', 'x', 1, -1)")


def test_a_real_private_server(pg_server: Server) -> None:
    assert pg_server.version >= (13, 0)
    with pg_server.connect() as conn:
        assert conn.execute("SHOW fsync").fetchone() == ("off",)
