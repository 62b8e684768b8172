"""What explains a failed test, for its report: the sessions holding locks on its database, PostgreSQL's
deadlock detail with the test each process belonged to, and the SQL it ran (from the statement log). It
changes nothing."""

from __future__ import annotations

import contextlib
import re

import psycopg

from pgsandbox.sandbox.database import Database
from pgsandbox.server import Server
from pgsandbox.server.statement_log import Position, StatementLogError
from pgsandbox.server.statements import Statement
from pgsandbox.server.statements import statements as statements_in


class Diagnostics:
    """Forensics on one sandbox's server (``sandbox.diagnostics``)."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def lock_holders(self, dbname: str) -> list[str]:
        """Sessions in a transaction on ``dbname`` and the locks they hold, described for a failure report
        (from a connection to that database: relation names resolve only there)."""
        try:
            with self.server.connect(dbname, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT a.pid, a.application_name, a.state, "
                    "round(extract(epoch FROM now() - a.xact_start)::numeric, 1), left(a.query, 300), "
                    "string_agg(DISTINCT l.mode || CASE WHEN l.relation IS NOT NULL "
                    "THEN ' on ' || l.relation::regclass::text ELSE ' (' || l.locktype || ')' END, ', ') "
                    "FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid AND l.granted "
                    "WHERE a.datname = current_database() AND a.xact_start IS NOT NULL "
                    "AND a.pid <> pg_backend_pid() AND l.locktype <> 'virtualxid' "
                    "GROUP BY 1, 2, 3, 4, 5 ORDER BY 4 DESC"
                ).fetchall()
        except psycopg.Error as error:
            return [f"(could not look: {error})"]
        return [
            f"pid {pid} ({app or 'no application_name'}), {state}, in a transaction for {age} s, "
            f"holding {locks}; its last statement: {query!r}"
            for pid, app, state, age, query, locks in rows
        ]

    def sql_of(self, db: Database, since: Position | None = None) -> tuple[list[Statement], Position, bool]:
        """The statements ``db``'s test ran since ``since`` (default: its start) in the order they ran, from
        the server's statement log; where the log stands after them; whether the log was complete since then.
        Raises :class:`StatementLogError` when there is no statement log (an external server, pg_sql_log=off)."""
        log = self.server.statement_log
        start = since or db._test.log_start
        if log is None or start is None:
            why = "pg_sql_log is off" if self.server.owns_cluster or log else "the server is external"
            raise StatementLogError(
                f"there is no statement log to read: {why}.",
                "pgsandbox logs statements on the local server it starts (pg_sql_log = auto); drop pg_dsn "
                "and pg_server = external for these tests.",
            )
        entries, end, complete = log.collect(start, self.server.admin)
        return statements_in(entries, db._test.scope), end, complete

    def describe_deadlock(self, detail: str) -> str:
        """PostgreSQL's deadlock detail (each process, what it waited for and its statement), with the
        ``application_name`` of each process that is still connected: which test it belonged to."""
        pids = sorted({int(pid) for pid in re.findall(r"[Pp]rocess (\d+)", detail)})
        found: dict[int, tuple[str, str]] = {}
        if pids:
            with contextlib.suppress(psycopg.Error):
                rows = self.server.admin.execute(
                    "SELECT pid, application_name, left(query, 300) FROM pg_stat_activity WHERE pid = ANY(%s)",
                    [pids],
                ).fetchall()
                found = {int(pid): (str(name), str(query)) for pid, name, query in rows}
        who = [
            f"process {pid} ({found[pid][0] or 'no application_name'}), its last statement: {found[pid][1]!r}"
            if pid in found
            else f"process {pid}: gone (its connection was closed)"
            for pid in pids
        ]
        return (detail or "(PostgreSQL gave no detail)") + ("\n" + "\n".join(who) if who else "")
