from __future__ import annotations

from typing import Any

import psycopg
import pytest
import todo

from pgsandbox import Server


def test_add_and_complete(db: psycopg.Connection[Any]) -> None:
    first = todo.add(db, "write the README")
    todo.add(db, "run the tests")
    assert todo.open_items(db) == ["write the README", "run the tests"]
    assert todo.complete(db, first)
    assert not todo.complete(db, first)
    assert todo.open_items(db) == ["run the tests"]


def test_each_test_starts_empty(db: psycopg.Connection[Any]) -> None:
    assert todo.open_items(db) == []


def test_the_database_enforces_the_rules(db: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        todo.add(db, "")
    assert todo.open_items(db) == []


def test_a_real_private_server(pg_server: Server) -> None:
    assert pg_server.version >= (13, 0)
    with pg_server.connect() as conn:
        assert conn.execute("SHOW fsync").fetchone() == ("off",)
