"""``pg_aconn``: a psycopg 3 ``AsyncConnection`` inside the test's isolation (the async twin of ``pg_conn``)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import pq

from pgsandbox.isolation.connection import AsyncSandboxConnection
from pgsandbox.isolation.transaction import GUEST_ROLLBACK

if TYPE_CHECKING:
    from pgsandbox.sandbox import Database

LABEL = "async psycopg"


async def connect(db: Database) -> psycopg.AsyncConnection[Any]:
    transaction = db.isolation == "transaction"
    kind = AsyncSandboxConnection if transaction else psycopg.AsyncConnection
    conn = await kind.connect(db.dsn, application_name=db.application_name)
    db.joined(conn.info.backend_pid)
    if isinstance(conn, AsyncSandboxConnection):
        await conn.execute(db.guest_begin)  # psycopg sends BEGIN first
        conn._pgsandbox_active = True
    return conn


async def close(db: Database, conn: psycopg.AsyncConnection[Any]) -> None:
    """End the connection's part of the test: roll back (or commit, to keep the database), then close."""
    try:
        if isinstance(conn, AsyncSandboxConnection) and not conn.closed:
            conn._pgsandbox_active = False
            if db.keep:
                if conn.info.transaction_status == pq.TransactionStatus.INERROR:
                    await conn.execute("ROLLBACK TO SAVEPOINT pgsandbox_test")
                await conn.execute("COMMIT")
            else:
                try:
                    await conn.execute(GUEST_ROLLBACK)
                except (psycopg.errors.InvalidSavepointSpecification, psycopg.errors.NoActiveSqlTransaction):
                    db.guest_escaped(LABEL)
    except psycopg.Error:
        pass  # a broken connection: closing it ends its transaction on the server
    finally:
        with contextlib.suppress(psycopg.Error):
            await psycopg.AsyncConnection.close(conn)
