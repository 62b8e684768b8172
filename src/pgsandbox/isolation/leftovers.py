"""What a test leaves that outlives it in either isolation mode: connections still open to its database, and
transactions it prepared. Ended the same way, and reported in the same words (findings.py), by both modes."""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from typing import Any

import psycopg
from psycopg import sql

from pgsandbox.isolation.findings import Finding, left_open, prepared_left
from pgsandbox.server.admin import connections_to, terminate_connections

LEFTOVER_WAIT_SECONDS = 0.2  # how long a connection the test closed may take to leave


def end_left_open(
    admin: psycopg.Connection[Any],
    dbname: str,
    test_id: str,
    ours: Collection[int],
    where: str,
    advice: str = "",
    spare: Collection[int] = (),
) -> list[Finding]:
    """Terminate the connections to ``dbname`` that are not ``ours`` (nor leaving) and say so; those in
    ``spare`` are not terminated (pgsandbox's own, kept open)."""
    left = connections_to(admin, dbname, ours, LEFTOVER_WAIT_SECONDS)
    if not left:
        return []
    terminate_connections(admin, dbname, spare)
    return left_open(test_id, left, where, advice)


def rollback_prepared(conn: psycopg.Connection[Any]) -> list[str]:
    """Roll back the transactions prepared in ``conn``'s database (ROLLBACK PREPARED must run there, outside a
    transaction); return their names."""
    gids = [
        row[0]
        for row in conn.execute(
            "SELECT gid FROM pg_prepared_xact() WHERE dbid = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    ]
    for gid in gids:
        with contextlib.suppress(psycopg.Error):
            conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
    return gids


def end_prepared(conn: psycopg.Connection[Any], test_id: str, where: str) -> list[Finding]:
    """Roll back what the test prepared in ``conn``'s database (an autocommit connection) and say so."""
    gids = rollback_prepared(conn)
    return [prepared_left(test_id, gids, where)]
