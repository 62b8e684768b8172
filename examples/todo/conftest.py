from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import todo

from pgsandbox import Server


@pytest.fixture
def db(pg_server: Server) -> Iterator[psycopg.Connection[Any]]:
    """A fresh database with the schema for each test (the template issue makes this automatic)."""
    name = pg_server.create_database()
    with pg_server.connect(name) as conn:
        todo.create_schema(conn)
        yield conn
    pg_server.drop_database(name)
