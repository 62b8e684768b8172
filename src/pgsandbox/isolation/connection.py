"""A psycopg connection that keeps a test's work inside the test's transaction.

While a test runs, ``commit()`` and ``rollback()`` act on a savepoint (``commit()`` keeps the work,
``rollback()`` undoes it back to the last ``commit()``) and ``close()`` is deferred to the end of the test,
so code under test can manage "its" transactions and everything is still rolled back afterwards. Nested
``with conn.transaction():`` blocks are savepoints already: the test's transaction is open.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import pq

SAVEPOINT = "pgsandbox_test"


class SandboxConnection(psycopg.Connection[Any]):
    _pgsandbox_active = False

    def commit(self) -> None:
        if not self._pgsandbox_active:
            return super().commit()
        if self._num_transactions:
            raise psycopg.ProgrammingError(
                "Explicit commit() forbidden within a Transaction context. "
                "(Transaction will be automatically committed on successful exit from context.)"
            )
        if self.info.transaction_status == pq.TransactionStatus.INERROR:
            # like COMMIT of a failed transaction: everything since the last commit is rolled back
            self.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
        else:
            self.execute(f"RELEASE SAVEPOINT {SAVEPOINT}; SAVEPOINT {SAVEPOINT}")
        return None

    def rollback(self) -> None:
        if not self._pgsandbox_active:
            return super().rollback()
        if self._num_transactions:
            raise psycopg.ProgrammingError(
                "Explicit rollback() forbidden within a Transaction context. "
                "(Either raise Rollback() or allow an exception to propagate out of the context.)"
            )
        self.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
        return None

    @property
    def autocommit(self) -> bool:
        return super().autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        if value and self._pgsandbox_active:
            raise psycopg.ProgrammingError(
                "pgsandbox: this connection runs inside the test's transaction (transaction isolation), so it "
                "cannot switch to autocommit. Mark the test @pytest.mark.pg(isolation='database') to give it a "
                "database of its own."
            )
        psycopg.Connection.autocommit.fset(self, value)  # type: ignore[attr-defined]

    def close(self) -> None:
        if self._pgsandbox_active:
            return  # the session owns it: really closed when the session ends
        super().close()
