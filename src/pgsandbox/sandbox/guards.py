"""What a test can do on the server itself, beyond its database, that neither isolation mode undoes: create
databases, roles and tablespaces (isolation/server_objects.py), or change the logging the statement log needs
(ALTER SYSTEM). Checked after the tests that could, undone, and said (findings.py)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from psycopg import sql

from pgsandbox.isolation.findings import Finding, logging_changed
from pgsandbox.isolation.server_objects import created_since, made_by_test, outside_finding
from pgsandbox.sandbox.database import Database
from pgsandbox.server import Server
from pgsandbox.server.statement_log import StatementLogError
from pgsandbox.server.statement_log import server_settings as statement_log_settings

LOG_SETTINGS = frozenset(statement_log_settings(Path(), "jsonlog"))  # what the statement log needs


class ServerGuards:
    """The server-level guards of one sandbox."""

    def __init__(self, server: Server, attached: bool, throwaway: bool) -> None:
        """``attached``: an xdist worker, whose server the other workers use at the same time; ``throwaway``: a
        server of this run (or of the xdist controller's), where nobody else creates objects."""
        self.server = server
        self.attached = attached
        self.throwaway = throwaway
        self._auto_conf_stamp: tuple[int, int, int] | None = None  # postgresql.auto.conf when last read

    def check(self, db: Database) -> list[Finding]:
        """What ``db``'s test did on the server, undone."""
        found = self._outside(db) if db._test.server_objects is not None else []
        if self._may_change_logging(db):
            found += self._restore_logging(db.test_id)
        return found

    def _outside(self, db: Database) -> list[Finding]:
        """Databases, roles and tablespaces the test created on the server (server_objects.py)."""
        assert db._test.server_objects is not None
        new = created_since(self.server.admin, db._test.server_objects)
        if new and self.attached:
            # an xdist worker: the others create objects at the same time; the test's are those it made
            log = self.server.statement_log
            if log is None or db._test.log_start is None:
                return []  # nothing says whose they are: not this test's to report, nor to drop
            try:
                entries, _, _ = log.collect(db._test.log_start, self.server.admin)
            except StatementLogError:
                return []
            new = made_by_test(new, entries, db._test.scope)
        return outside_finding(self.server.admin, new, db.test_id, drop=self.throwaway)

    def _may_change_logging(self, db: Database) -> bool:
        """Whether ``db``'s test could have changed the statement log's settings (ALTER SYSTEM needs a
        superuser: pg_admin, or tests that connect as the admin) on a server whose log pgsandbox reads."""
        return (
            self.throwaway
            and self.server.statement_log is not None
            and ("pg_admin" in db._test.guests.committing or self.server.login is None)
        )

    def _restore_logging(self, test_id: str) -> list[Finding]:
        """Put back the logging settings the statement log needs if a test changed them with ALTER SYSTEM
        (``log_destination = stderr`` and a reload would silently take the SQL section from every later
        failure): ALTER SYSTEM RESET them and reload. One query when nothing changed (a few ms: it reads the
        configuration files), only after tests that could have."""
        assert self.server.statement_log is not None
        # ALTER SYSTEM rewrites postgresql.auto.conf: a stat (microseconds) instead of a query (0.8 ms) per test
        auto_conf = self.server.statement_log.directory.parent / "data" / "postgresql.auto.conf"
        with contextlib.suppress(OSError):
            stat = auto_conf.stat()
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if stamp == self._auto_conf_stamp:
                return []
            self._auto_conf_stamp = stamp
        admin = self.server.admin
        names = sorted(LOG_SETTINGS)
        changed = [
            str(name)
            for (name,) in admin.execute(
                "SELECT DISTINCT name FROM pg_file_settings WHERE sourcefile LIKE '%%/postgresql.auto.conf' "
                "AND name = ANY(%s) ORDER BY 1",
                [names],
            ).fetchall()
        ]
        if not changed:
            return []
        for name in changed:
            admin.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
        admin.execute("SELECT pg_reload_conf()")
        return [logging_changed(test_id, changed)]
