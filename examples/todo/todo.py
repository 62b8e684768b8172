"""A tiny to-do list stored in PostgreSQL: the example application whose tests use pgsandbox.

Its schema is in ``migrations/``; ``../pytest.ini`` tells pgsandbox to migrate a template from it.
"""

from __future__ import annotations

from typing import Any

import psycopg


def add(conn: psycopg.Connection[Any], title: str) -> int:
    with conn.transaction():
        row = conn.execute("INSERT INTO item (title) VALUES (%s) RETURNING id", (title,)).fetchone()
    assert row is not None
    return int(row[0])


def complete(conn: psycopg.Connection[Any], item_id: int) -> bool:
    with conn.transaction():
        cursor = conn.execute("UPDATE item SET done = true WHERE id = %s AND NOT done", (item_id,))
    return cursor.rowcount == 1


def open_items(conn: psycopg.Connection[Any]) -> list[str]:
    return [title for (title,) in conn.execute("SELECT title FROM item WHERE NOT done ORDER BY id")]


def import_titles(dsn: str, titles: list[str]) -> int:
    """A batch job that opens its own connection and commits: tested in ``database`` isolation."""
    with psycopg.connect(dsn) as conn:
        for title in titles:
            conn.execute("INSERT INTO item (title) VALUES (%s)", (title,))
    return len(titles)
