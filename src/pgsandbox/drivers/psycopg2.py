"""``pg_psycopg2``: a psycopg2 connection inside the test's isolation (extra ``[psycopg2]``)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from pgsandbox.drivers import guests, require
from pgsandbox.isolation.connection import AUTOCOMMIT_REFUSED, COMMIT, ROLLBACK
from pgsandbox.isolation.guests import SAVEPOINT, after_rollback, is_active

if TYPE_CHECKING:
    from pgsandbox.sandbox import Database

require("psycopg2", "psycopg2", "pg_psycopg2")  # first: a missing library is named with its extra

import psycopg2  # noqa: E402
import psycopg2.errors  # noqa: E402
import psycopg2.extensions  # noqa: E402

_AUTOCOMMIT: Any = vars(psycopg2.extensions.connection)["autocommit"]  # the C type's attribute


class SandboxPsycopg2Connection(psycopg2.extensions.connection):
    """While the test runs: ``commit()`` moves the test's savepoint, ``rollback()`` returns to it, ``close()``
    waits for the end of the test, and autocommit is refused (it would escape the rollback)."""

    def commit(self) -> None:
        if not is_active(self):
            return super().commit()
        in_error = self.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INERROR
        self._run(after_rollback(self, ROLLBACK) if in_error else COMMIT)
        return None

    def rollback(self) -> None:
        if not is_active(self):
            return super().rollback()
        self._run(after_rollback(self, ROLLBACK))
        return None

    def _run(self, statement: str) -> None:
        with self.cursor() as cursor:
            cursor.execute(statement)

    @property
    def autocommit(self) -> bool:
        return bool(_AUTOCOMMIT.__get__(self))

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        if value and is_active(self):
            raise psycopg2.ProgrammingError(AUTOCOMMIT_REFUSED)
        _AUTOCOMMIT.__set__(self, value)

    def set_session(self, *args: Any, **kwargs: Any) -> None:
        if is_active(self) and (kwargs.get("autocommit") or (len(args) > 3 and args[3])):
            raise psycopg2.ProgrammingError(AUTOCOMMIT_REFUSED)
        super().set_session(*args, **kwargs)

    def close(self) -> None:
        if is_active(self):
            return  # pgsandbox closes it at the end of the test
        super().close()


Connection = psycopg2.extensions.connection


class Psycopg2(guests.Adapter[Connection]):
    """psycopg2's part of the guest protocol: synchronous, so its steps never wait."""

    label = "psycopg2"
    asynchronous = False
    errors = (psycopg2.Error,)
    escaped = (psycopg2.errors.InvalidSavepointSpecification, psycopg2.errors.NoActiveSqlTransaction)

    async def connect(self, db: Database, transaction: bool) -> Connection:
        return psycopg2.connect(
            db.dsn,
            application_name=db.application_name,
            connection_factory=SandboxPsycopg2Connection if transaction else None,
        )

    def ours(self, conn: Connection) -> bool:
        return isinstance(conn, SandboxPsycopg2Connection)

    def is_closed(self, conn: Connection) -> bool:
        return bool(conn.closed)

    def pid(self, conn: Connection) -> int:
        return int(conn.get_backend_pid())

    async def begin(self, conn: Connection, statement: str) -> None:
        with conn.cursor() as cursor:
            cursor.execute(statement)  # psycopg2 sends BEGIN first

    async def commit(self, conn: Connection) -> None:
        Connection.commit(conn)

    async def run(self, conn: Connection, statement: str, fetch: bool) -> Any:
        status = conn.info.transaction_status
        if status == psycopg2.extensions.TRANSACTION_STATUS_INERROR and not is_active(conn):
            Connection.rollback(conn)  # a failed transaction of the app's: nothing else can be done with it
            status = psycopg2.extensions.TRANSACTION_STATUS_IDLE
        switch = status == psycopg2.extensions.TRANSACTION_STATUS_IDLE and not conn.autocommit
        if switch:  # one round trip instead of three (BEGIN, it, COMMIT)
            conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                cursor.execute(statement)
                row = cursor.fetchone() if fetch else None
        finally:
            if switch:
                conn.autocommit = False
        return row[0] if row else None

    async def roll_back(self, conn: Connection, reuse: bool) -> None:
        with conn.cursor() as cursor:
            cursor.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
        Connection.rollback(conn)  # psycopg2's own ROLLBACK: it also learns that the transaction is over

    async def after_escape(self, conn: Connection, reuse: bool) -> None:
        Connection.rollback(conn)

    def reset(self, conn: Connection) -> bool:
        if conn.status != psycopg2.extensions.STATUS_READY or not isinstance(conn, SandboxPsycopg2Connection):
            return False
        conn.set_session(isolation_level="DEFAULT", readonly="DEFAULT", deferrable="DEFAULT")
        conn.cursor_factory = None  # type: ignore[assignment]  # None: psycopg2 cursors
        del conn.notices[:]
        return True

    async def close(self, conn: Connection, ended: bool) -> None:
        self.abort(conn)

    def abort(self, conn: Connection) -> bool:
        with contextlib.suppress(psycopg2.Error):
            Connection.close(conn)
        return True


ADAPTER = Psycopg2()
LABEL = ADAPTER.label


def connect(db: Database) -> Connection:
    """In ``transaction`` isolation the connection a previous test parked, if any: a connect costs ~4 ms."""
    return guests.run_sync(guests.connect(ADAPTER, db))


def close(db: Database, conn: Connection) -> None:
    """End the connection's part of the test: roll back (or commit, to keep the database); then park it for
    the next test, or close it."""
    guests.run_sync(guests.close(ADAPTER, db, conn, park=True))
