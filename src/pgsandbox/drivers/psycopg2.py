"""``pg_psycopg2``: a psycopg2 connection inside the test's isolation (extra ``[psycopg2]``)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from pgsandbox.drivers import require
from pgsandbox.isolation.connection import AUTOCOMMIT_REFUSED, COMMIT, ROLLBACK, SAVEPOINT

if TYPE_CHECKING:
    from pgsandbox.sandbox import Database

require("psycopg2", "psycopg2", "pg_psycopg2")  # first: a missing library is named with its extra

import psycopg2  # noqa: E402
import psycopg2.errors  # noqa: E402
import psycopg2.extensions  # noqa: E402

LABEL = "psycopg2"
_AUTOCOMMIT: Any = vars(psycopg2.extensions.connection)["autocommit"]  # the C type's attribute


class SandboxPsycopg2Connection(psycopg2.extensions.connection):
    """While the test runs: ``commit()`` moves the test's savepoint, ``rollback()`` returns to it, ``close()``
    waits for the end of the test, and autocommit is refused (it would escape the rollback)."""

    _pgsandbox_active = False

    def commit(self) -> None:
        if not self._pgsandbox_active:
            return super().commit()
        in_error = self.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_INERROR
        self._run(ROLLBACK if in_error else COMMIT)
        return None

    def rollback(self) -> None:
        if not self._pgsandbox_active:
            return super().rollback()
        self._run(ROLLBACK)
        return None

    def _run(self, statement: str) -> None:
        with self.cursor() as cursor:
            cursor.execute(statement)

    @property
    def autocommit(self) -> bool:
        return bool(_AUTOCOMMIT.__get__(self))

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        if value and self._pgsandbox_active:
            raise psycopg2.ProgrammingError(AUTOCOMMIT_REFUSED)
        _AUTOCOMMIT.__set__(self, value)

    def set_session(self, *args: Any, **kwargs: Any) -> None:
        if self._pgsandbox_active and (kwargs.get("autocommit") or (len(args) > 3 and args[3])):
            raise psycopg2.ProgrammingError(AUTOCOMMIT_REFUSED)
        super().set_session(*args, **kwargs)

    def close(self) -> None:
        if self._pgsandbox_active:
            return  # pgsandbox closes it at the end of the test
        super().close()


def connect(db: Database) -> psycopg2.extensions.connection:
    """In ``transaction`` isolation the connection a previous test parked, if any: a connect costs ~4 ms."""
    transaction = db.isolation == "transaction"
    conn: psycopg2.extensions.connection | None = db.unpark(LABEL) if transaction else None
    if conn is None or conn.closed:
        conn = psycopg2.connect(
            db.dsn,
            application_name=db.application_name,
            connection_factory=SandboxPsycopg2Connection if transaction else None,
        )
        db.joined(conn.get_backend_pid())
    if isinstance(conn, SandboxPsycopg2Connection):
        with conn.cursor() as cursor:
            cursor.execute(db.guest_begin)  # psycopg2 sends BEGIN first
        conn._pgsandbox_active = True
    return conn


def close(db: Database, conn: psycopg2.extensions.connection) -> None:
    """End the connection's part of the test: roll back (or commit, to keep the database); then park it for
    the next test, or close it."""
    reusable = False
    try:
        if isinstance(conn, SandboxPsycopg2Connection) and not conn.closed:
            conn._pgsandbox_active = False
            if db.keep:
                psycopg2.extensions.connection.commit(conn)
            else:
                try:
                    conn._run(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
                    reusable = True
                except (psycopg2.errors.InvalidSavepointSpecification, psycopg2.errors.NoActiveSqlTransaction):
                    db.guest_escaped(LABEL)
                # psycopg2's own ROLLBACK: it also learns that the transaction is over
                psycopg2.extensions.connection.rollback(conn)
            if reusable and conn.status == psycopg2.extensions.STATUS_READY:
                # what the test set on the connection object (the server's SETs were rolled back)
                conn.set_session(isolation_level="DEFAULT", readonly="DEFAULT", deferrable="DEFAULT")
                conn.cursor_factory = None  # type: ignore[assignment]  # None: psycopg2 cursors
                del conn.notices[:]
            else:
                reusable = False
    except psycopg2.Error:
        reusable = False  # a broken connection: closing it ends its transaction on the server
    if reusable and db.park(LABEL, conn, conn.get_backend_pid(), lambda: _really_close(conn)):
        return
    _really_close(conn)


def _really_close(conn: psycopg2.extensions.connection) -> bool:
    with contextlib.suppress(psycopg2.Error):
        psycopg2.extensions.connection.close(conn)
    return True
