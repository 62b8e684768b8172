"""A tiny to-do list stored in PostgreSQL: the example application whose tests use pgsandbox."""

from __future__ import annotations

from typing import Any

import psycopg

SCHEMA = """
CREATE TABLE item (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    title text NOT NULL CHECK (title <> ''),
    done boolean NOT NULL DEFAULT false,
    created timestamptz NOT NULL DEFAULT now()
)
"""


def create_schema(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        conn.execute(SCHEMA)


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
