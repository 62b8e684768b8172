"""psycopg connections that keep a test's work inside the test's transaction (sync and async, in step).

While a test runs, ``commit()`` and ``rollback()`` act on a savepoint (``commit()`` keeps the work,
``rollback()`` undoes it back to the last ``commit()``) and ``close()`` is deferred to the end of the test,
so code under test can manage "its" transactions and everything is still rolled back afterwards. Nested
``with conn.transaction():`` blocks are savepoints already: the test's transaction is open.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import pq

from pgsandbox.isolation.guests import SAVEPOINT, after_rollback, is_active, state_of
from pgsandbox.server.tags import INTERNAL

# what stands in for commit() and rollback() says so in the statement log
COMMIT = f"/* commit() */ RELEASE SAVEPOINT {SAVEPOINT}; SAVEPOINT {SAVEPOINT}"
ROLLBACK = f"/* rollback() */ ROLLBACK TO SAVEPOINT {SAVEPOINT}"

AUTOCOMMIT_REFUSED = (
    "pgsandbox: this connection runs inside the test's transaction (transaction isolation), so it cannot switch "
    "to autocommit. Mark the test @pytest.mark.pg(isolation='database') to give it a database of its own."
)
IN_TRANSACTION_BLOCK = {
    "commit": "Explicit commit() forbidden within a Transaction context. "
    "(Transaction will be automatically committed on successful exit from context.)",
    "rollback": "Explicit rollback() forbidden within a Transaction context. "
    "(Either raise Rollback() or allow an exception to propagate out of the context.)",
}


def _savepoint(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> str:
    """The savepoint that ``commit()``/``rollback()`` move: the test's, or the innermost level a client
    library opened on the shared connection (see :func:`_level`)."""
    for name in reversed(state_of(conn).levels):
        if name:
            return str(name)
    return SAVEPOINT


def _savepoint_for(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], action: str) -> str:
    """The statement that stands in for ``commit()``/``rollback()`` while the test runs."""
    if conn._num_transactions:
        raise psycopg.ProgrammingError(IN_TRANSACTION_BLOCK[action])
    name = _savepoint(conn)
    # like COMMIT of a failed transaction: everything since the last commit is rolled back
    if action == "rollback" or conn.info.transaction_status == pq.TransactionStatus.INERROR:
        # a pg.as_role block's role, when set after that savepoint, is undone by it: set again
        return after_rollback(conn, f"/* {action}() */ ROLLBACK TO SAVEPOINT {name}")
    return f"/* commit() */ RELEASE SAVEPOINT {name}; SAVEPOINT {name}"


def _level(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], own: bool) -> str | None:
    """A client library (a SQLAlchemy pool checkout) takes the shared connection: with ``own``, a savepoint
    of its own, so that its rollback undoes only its work, as on a connection of its own. Returns the
    statement to run."""
    levels = state_of(conn).levels
    name = f"pgsandbox_level{len(levels)}" if own and is_active(conn) else None
    levels.append(name)
    return f"{INTERNAL}SAVEPOINT {name}" if name else None


def _unlevel(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> str | None:
    """The library gives the connection back (last taken, first given back): its savepoint goes."""
    levels = state_of(conn).levels
    name = levels.pop() if levels else None
    if not name or not is_active(conn):
        return None
    if conn.info.transaction_status == pq.TransactionStatus.INERROR:
        return f"{INTERNAL}ROLLBACK TO SAVEPOINT {name}; RELEASE SAVEPOINT {name}"
    return f"{INTERNAL}RELEASE SAVEPOINT {name}"


class SandboxConnection(psycopg.Connection[Any]):
    """The test's own connection (``pg.connection``, ``pg_conn``), and what SQLAlchemy's sync engine runs on.
    What pgsandbox keeps about it (inside a test or not, a library setting itself up, the libraries'
    savepoints) is in the table of :func:`pgsandbox.isolation.guests.state_of`."""

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        # every statement goes through a cursor (execute() makes one): what ran between two tests is noticed
        state_of(self).used = True
        return super().cursor(*args, **kwargs)

    def commit(self) -> None:
        if not is_active(self):
            return super().commit()
        self.execute(_savepoint_for(self, "commit"))
        return None

    def rollback(self) -> None:
        if not is_active(self):
            return super().rollback()
        if not state_of(self).quiet_rollback:
            self.execute(_savepoint_for(self, "rollback"))
        return None

    @property
    def autocommit(self) -> bool:
        return super().autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        if value and is_active(self):
            raise psycopg.ProgrammingError(AUTOCOMMIT_REFUSED)
        psycopg.Connection.autocommit.fset(self, value)  # type: ignore[attr-defined]

    def close(self) -> None:
        if is_active(self):
            return  # the session owns it: really closed when the session ends
        super().close()

    def enter_level(self, own: bool = True) -> None:
        statement = _level(self, own)
        if statement:
            self.execute(statement)

    def leave_level(self) -> None:
        statement = _unlevel(self)
        if statement:
            self.execute(statement)

    def reset_levels(self) -> None:
        state_of(self).levels.clear()


class AsyncSandboxConnection(psycopg.AsyncConnection[Any]):
    """A guest's async psycopg connection (``pg_aconn``), and what SQLAlchemy's async engine runs on."""

    async def commit(self) -> None:
        if not is_active(self):
            return await super().commit()
        await self.execute(_savepoint_for(self, "commit"))
        return None

    async def rollback(self) -> None:
        if not is_active(self):
            return await super().rollback()
        if not state_of(self).quiet_rollback:
            await self.execute(_savepoint_for(self, "rollback"))
        return None

    async def set_autocommit(self, value: bool) -> None:
        if value and is_active(self):
            raise psycopg.ProgrammingError(AUTOCOMMIT_REFUSED)
        await super().set_autocommit(value)

    async def close(self) -> None:
        if is_active(self):
            return  # pgsandbox closes it at the end of the test
        await super().close()

    async def enter_level(self, own: bool = True) -> None:
        statement = _level(self, own)
        if statement:
            await self.execute(statement)

    async def leave_level(self) -> None:
        statement = _unlevel(self)
        if statement:
            await self.execute(statement)

    def reset_levels(self) -> None:
        state_of(self).levels.clear()
