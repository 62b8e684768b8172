"""``schema`` isolation: transaction isolation inside the session's own schema (template/schemas.py).

For a server where tests may not create databases. The session database is the DSN's own database, shared with
whatever else uses it, and every connection the tests get points its search_path at the session's schema. Each
test is a rolled-back transaction there, exactly as in transaction isolation (this class is that machinery with
the database-level parts replaced):

- the check after the rollback cannot count the database's connections and sessions (other sessions, xdist
  workers and the app's other users share it), so an escape is noticed only when the test's own transaction was
  replaced (a raw COMMIT), a driver's was, or pg_admin committed; prepared transactions are not looked for;
- when one may have escaped, the schema is compared with what its build left (row counts, rows and objects
  written since) and, if it changed, dropped and migrated again.
"""

from __future__ import annotations

import contextlib

from pgsandbox.isolation.base import Mode
from pgsandbox.isolation.transaction import _XMAX, TransactionIsolation
from pgsandbox.server.base import Server
from pgsandbox.template.builds import NO_CLAUSE
from pgsandbox.template.schemas import SessionSchema

# No database-wide counts (always 0 others, no session counter) and no prepared transactions (those of the
# database are not this session's to end): the advisory locks the test's connection holds are still released.
SCHEMA_CHECK = (
    "SELECT 0, NULL::bigint, " + _XMAX + ", (SELECT count(*) FROM pg_lock_status() l WHERE l.locktype = 'advisory' "
    "AND l.pid = pg_backend_pid()), 0"
)


class SchemaIsolation(TransactionIsolation):
    """Every test in a transaction on one connection to the DSN's database, search_path on the session's schema
    (an :class:`~pgsandbox.isolation.base.Isolation`). Its handles say ``transaction``: per test, it is."""

    mode: Mode = "transaction"
    first_clone = "the session's schema"
    restored = "pgsandbox migrated the session's schema again"
    own_connections = (
        "give them the test's connection (pg.connection), or use database isolation on a server where the role "
        "may create databases"
    )

    def __init__(self, server: Server, schema: SessionSchema) -> None:
        super().__init__(server, schema.name, NO_CLAUSE)
        self.schema = schema

    def _create_session_db(self) -> None:
        self.dbname = self.schema.dbname
        self._connect()

    def _check_template(self) -> str:
        return SCHEMA_CHECK

    def _sessions(self) -> int | None:
        return None

    def _exists(self) -> bool:
        return True  # the DSN's database: a test that dropped it has no session left to run in anyway

    def _restore_if_changed(self, since_xmax: int) -> list[str]:
        """Compare the schema with what its build left; when it changed, drop and migrate it again."""
        changes = self.schema.changes()
        if changes:
            self._close_parked()
            self._close()
            self.schema.rebuild()
            self._connect()
        return changes

    def close(self) -> None:
        """Close the connections; the schema is the sandbox's to drop (it exists from the session's start)."""
        self._close_parked()
        with contextlib.suppress(Exception):
            self._close()
        self.dbname = None
