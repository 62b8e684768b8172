from __future__ import annotations

from typing import Any

import psycopg
import pytest
import todo

from pgsandbox import Database, Server


def test_add_and_complete(pg_conn: psycopg.Connection[Any]) -> None:
    first = todo.add(pg_conn, "write the README")
    todo.add(pg_conn, "run the tests")
    assert todo.open_items(pg_conn) == ["write the README", "run the tests"]
    assert todo.complete(pg_conn, first)
    assert not todo.complete(pg_conn, first)
    assert todo.open_items(pg_conn) == ["run the tests"]


def test_each_test_starts_from_the_migrations(pg_conn: psycopg.Connection[Any]) -> None:
    assert todo.open_items(pg_conn) == []


def test_the_database_enforces_the_rules(pg_conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        todo.add(pg_conn, "")
    assert todo.open_items(pg_conn) == []


def test_code_under_test_may_commit(pg_conn: psycopg.Connection[Any]) -> None:
    todo.add(pg_conn, "committed")
    pg_conn.commit()  # a savepoint: still rolled back after the test
    assert todo.open_items(pg_conn) == ["committed"]


@pytest.mark.pg(isolation="database")
def test_a_job_with_its_own_connection(pg: Database) -> None:
    assert todo.import_titles(pg.dsn, ["a", "b"]) == 2
    assert pg.fetchval("SELECT count(*) FROM item") == 2


def test_a_real_private_server(pg_server: Server) -> None:
    assert pg_server.version >= (13, 0)
    with pg_server.connect() as conn:
        assert conn.execute("SHOW fsync").fetchone() == ("off",)
