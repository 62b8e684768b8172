"""``pg_aconn``: a psycopg 3 ``AsyncConnection`` inside the test's isolation (the async twin of ``pg_conn``)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import pq

from pgsandbox.drivers import closer
from pgsandbox.isolation.connection import SAVEPOINT, AsyncSandboxConnection
from pgsandbox.isolation.transaction import GUEST_ROLLBACK

if TYPE_CHECKING:
    from pgsandbox.sandbox import Database

LABEL = "async psycopg"
ESCAPED = (psycopg.errors.InvalidSavepointSpecification, psycopg.errors.NoActiveSqlTransaction)


async def connect(db: Database) -> psycopg.AsyncConnection[Any]:
    """In ``transaction`` isolation, the connection a previous test in this event loop left parked, if any."""
    transaction = db.isolation == "transaction"
    conn: psycopg.AsyncConnection[Any] | None = None
    if transaction:
        conn = db.unpark(LABEL, asyncio.get_running_loop())
    if conn is None or conn.closed:
        kind = AsyncSandboxConnection if transaction else psycopg.AsyncConnection
        conn = await kind.connect(db.dsn, application_name=db.application_name)
        db.joined(conn.info.backend_pid)
    if isinstance(conn, AsyncSandboxConnection):
        conn.reset_levels()
        await conn.execute(db.guest_begin)  # psycopg sends BEGIN first
        conn._pgsandbox_active = True
    return conn


async def close(db: Database, conn: psycopg.AsyncConnection[Any], park: bool = False) -> None:
    """End the connection's part of the test: roll back (or commit, to keep the database); then close it, or
    ``park`` it for the next test in this event loop."""
    reusable = False
    try:
        if isinstance(conn, AsyncSandboxConnection) and not conn.closed:
            conn._pgsandbox_active = False
            if db.keep:
                if conn.info.transaction_status == pq.TransactionStatus.INERROR:
                    await conn.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
                await conn.commit()
            else:
                try:
                    await conn.execute(GUEST_ROLLBACK)
                    reusable = True
                except ESCAPED:
                    db.guest_escaped(LABEL)
                    await conn.rollback()
            # what the test set on the connection object (the server's SETs were rolled back)
            conn.row_factory = psycopg.rows.tuple_row
    except psycopg.Error:
        reusable = False  # a broken connection: closing it ends its transaction on the server
    loop = asyncio.get_running_loop()
    if park and reusable and db.park(LABEL, conn, conn.info.backend_pid, closer(loop, _close, _finish, conn), loop):
        return
    await _close(conn)


async def _close(conn: psycopg.AsyncConnection[Any]) -> None:
    with contextlib.suppress(psycopg.Error):
        await psycopg.AsyncConnection.close(conn)


def _finish(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Close without the event loop: libpq's own goodbye."""
    conn.pgconn.finish()
    return True
