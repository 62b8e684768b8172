"""``pg_aconn``: a psycopg 3 ``AsyncConnection`` inside the test's isolation (the async twin of ``pg_conn``)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import pq

from pgsandbox.drivers import guests
from pgsandbox.isolation.connection import AsyncSandboxConnection
from pgsandbox.isolation.guests import GUEST_ROLLBACK, SAVEPOINT

if TYPE_CHECKING:
    from pgsandbox.sandbox import Database

Connection = psycopg.AsyncConnection[Any]


class AsyncPsycopg(guests.Adapter[Connection]):
    """psycopg 3's async part of the guest protocol."""

    label = "async psycopg"
    asynchronous = True
    errors = (psycopg.Error,)
    escaped = (psycopg.errors.InvalidSavepointSpecification, psycopg.errors.NoActiveSqlTransaction)

    async def connect(self, db: Database, transaction: bool) -> Connection:
        kind = AsyncSandboxConnection if transaction else psycopg.AsyncConnection
        return await kind.connect(db.dsn, application_name=db.application_name)

    def ours(self, conn: Connection) -> bool:
        return isinstance(conn, AsyncSandboxConnection)

    def is_closed(self, conn: Connection) -> bool:
        return conn.closed

    def pid(self, conn: Connection) -> int:
        return conn.info.backend_pid

    async def begin(self, conn: Connection, statement: str) -> None:
        await conn.execute(statement)  # psycopg sends BEGIN first

    async def commit(self, conn: Connection) -> None:
        if conn.info.transaction_status == pq.TransactionStatus.INERROR:
            await conn.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
        await conn.commit()

    async def run(self, conn: Connection, statement: str, fetch: bool) -> Any:
        status = conn.info.transaction_status
        if status == pq.TransactionStatus.INERROR and not isinstance(conn, AsyncSandboxConnection):
            await conn.rollback()  # a failed transaction of the app's: nothing else can be done with it
            status = pq.TransactionStatus.IDLE
        switch = status == pq.TransactionStatus.IDLE and not conn.autocommit
        if switch:  # one round trip instead of three (BEGIN, it, COMMIT)
            await conn.set_autocommit(True)
        try:
            cursor = await conn.execute(statement)
            row = await cursor.fetchone() if fetch else None
        finally:
            if switch:
                await conn.set_autocommit(False)
        return row[0] if row else None

    async def roll_back(self, conn: Connection, reuse: bool) -> None:
        await conn.execute(GUEST_ROLLBACK)

    async def after_escape(self, conn: Connection, reuse: bool) -> None:
        await conn.rollback()

    def reset(self, conn: Connection) -> bool:
        conn.row_factory = psycopg.rows.tuple_row
        return True

    async def close(self, conn: Connection, ended: bool) -> None:
        with contextlib.suppress(psycopg.Error):
            await psycopg.AsyncConnection.close(conn)

    def abort(self, conn: Connection) -> bool:
        """libpq's own goodbye, without the event loop."""
        conn.pgconn.finish()
        return True


ADAPTER = AsyncPsycopg()
LABEL = ADAPTER.label


async def connect(db: Database) -> Connection:
    """In ``transaction`` isolation, the connection a previous test in this event loop left parked, if any."""
    return await guests.connect(ADAPTER, db)


async def close(db: Database, conn: Connection, park: bool = False) -> None:
    """End the connection's part of the test: roll back (or commit, to keep the database); then close it, or
    ``park`` it for the next test in this event loop."""
    await guests.close(ADAPTER, db, conn, park)
