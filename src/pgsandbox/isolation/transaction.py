"""``transaction`` isolation: every test runs in a transaction on the session database, rolled back after.

One connection serves every test (a new one costs milliseconds, a BEGIN costs microseconds). After each
test pgsandbox checks that nothing escaped the rollback: a raw ``COMMIT`` on the test's connection, or
another connection that wrote to the session database. When something did, the test is reported with
what changed and the session database is cloned again from the template, so the next test starts clean.

Scoped data (``pg_module``, ``pg_class``...): a scope opens a savepoint on that connection, in the same
transaction, and the tests inside it run in a savepoint inside that one: each test is rolled back to the scope's
data, and the scope's data is rolled back when the scope ends. Scopes nest (session > package > module > class).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq, sql

from pgsandbox.common import trace
from pgsandbox.errors import PgSandboxError
from pgsandbox.isolation import findings
from pgsandbox.isolation.base import Begun, GuestConnections, Mode
from pgsandbox.isolation.connection import SandboxConnection
from pgsandbox.isolation.findings import SESSION_DB, TRANSACTION_ADVICE, Finding, clone_failed
from pgsandbox.isolation.guests import SAVEPOINT, Parked, app_name, state_of
from pgsandbox.isolation.leftovers import end_left_open, end_prepared
from pgsandbox.isolation.sequences import SNAPSHOT, SequenceState, restore_sql, snapshot
from pgsandbox.server.admin import terminate_connections
from pgsandbox.server.base import Server
from pgsandbox.server.tags import INTERNAL, OURS_PREFIX

# After the rollback, in the same round trip: how many backends are on the session database (more than
# this one: another connection is there), how many sessions it has had (PostgreSQL 15+: one more means
# another connection came and went), and the next transaction id (rows with a newer xmin were written
# after it). The statistics functions, not the pg_stat_* views: 0.04 ms instead of 0.5 ms per test.
_XMAX = "pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
# And what a rollback does not undo: session-level advisory locks the test took on its connection, and
# transactions it prepared (PREPARE TRANSACTION outlives its session). The functions, not the pg_locks and
# pg_prepared_xacts views, whose joins are planned again every time: 0.13 ms more per test instead of 0.23.
_HELD = (
    ", (SELECT count(*) FROM pg_lock_status() l WHERE l.locktype = 'advisory' AND l.pid = pg_backend_pid()), "
    "(SELECT count(*) FROM pg_prepared_xact() p WHERE p.dbid = {oid})"
)
CHECK = "SELECT pg_stat_get_db_numbackends({oid}) - {ours}, pg_stat_get_db_sessions({oid}), " + _XMAX + _HELD
CHECK_14 = "SELECT pg_stat_get_db_numbackends({oid}) - {ours}, NULL::bigint, " + _XMAX + _HELD
# The savepoint exists only in the test's own transaction: if a raw COMMIT (or END) replaced that
# transaction, rolling back to it fails, and that failure is how an escape is noticed, for free.
ROLLBACK = f"{INTERNAL}ROLLBACK TO SAVEPOINT {SAVEPOINT}; ROLLBACK; "
# Inside a scope the transaction stays open: the test's savepoint goes, the scope's data stays. The statistics
# functions read a snapshot taken once per transaction, so it is cleared for the check to see the present.
# The test's own commit() releases its savepoint into the level above (and makes a new one): inside a scope that
# level is the scope's data, so the test runs under a savepoint of its own that commit() does not touch.
IN_SCOPE = "pgsandbox_test_in_scope"
SCOPED_ROLLBACK = (
    f"{INTERNAL}ROLLBACK TO SAVEPOINT {IN_SCOPE}; RELEASE SAVEPOINT {IN_SCOPE}; SELECT pg_stat_clear_snapshot(); "
)


@dataclass
class Scope:
    """Data made once for a module, class, package or session (``scope_id``: its pytest node id), held by
    ``savepoint`` in the session database's transaction."""

    scope_id: str
    savepoint: str
    sequences: tuple[SequenceState, ...] | None  # pg_reset_sequences: their state when the scope opened
    started_xmax: int  # the next transaction id when it opened: a row it committed by mistake is newer
    lost: str = ""  # why its data is gone (the transaction that held it was ended), if it is


class TransactionIsolation:
    """One session database for every test, each test in a transaction on one connection to it (an
    :class:`~pgsandbox.isolation.base.Isolation`)."""

    mode: Mode = "transaction"
    first_clone = "the session database"
    keeps_in_place = False  # a kept test's session database is renamed, and a new one cloned

    def __init__(self, server: Server, template: str, clone_clause: sql.Composable, drop_at_close: bool = True) -> None:
        self.server = server
        self._drop_at_close = drop_at_close
        self.template = template
        self.clone_clause = clone_clause
        self.dbname: str | None = None
        self.conn: SandboxConnection | None = None
        self.sessions: int | None = None  # the session database's session counter, after our own connect
        self._snapshot_xmax = 0
        self._prepared: str | None = None  # the test whose transaction the last rollback opened
        self._begin = f"{INTERNAL}SAVEPOINT {SAVEPOINT}; SET application_name = ".encode()
        self._check = ""
        self.parked: dict[str, Parked] = {}  # by driver
        self._held = (0, 0)  # advisory locks and prepared transactions the last rollback left
        self.state: dict[str, Any] = {}  # what driver adapters keep for the session (SQLAlchemy engines)
        self._kept = 0
        self._restores = 0
        self.scopes: list[Scope] = []  # open scopes, outermost first
        self._test_sequences: tuple[SequenceState, ...] | None = None  # the running test's, with reset_sequences
        self._sequences_now: tuple[SequenceState, ...] | None = None  # known current (restored, nothing ran since)

    # -- the session database ------------------------------------------------------------------------
    def _create_session_db(self) -> None:
        try:
            self.dbname = self.server.create_database("session", template=self.template, clause=self.clone_clause)
        except psycopg.errors.InvalidCatalogName as error:  # the template was dropped (by a test?)
            raise clone_failed(self.template, error) from None
        trace.mark("session database: created")
        self._connect()
        trace.mark("session database: connected")

    def _connect(self) -> None:
        assert self.dbname
        self._lose_scopes(
            "the session database's connection was replaced (after an escape, a dropped database or a kept failed test)"
        )
        self._sequences_now = None
        # named, so that what it runs between tests is not taken for the app's statements (Scope.shared)
        self.conn = SandboxConnection.connect(
            self.server.login_dsn_for(self.dbname), autocommit=True, application_name=OURS_PREFIX
        )
        if self.server.version[0] >= 15:
            # count this connection in pg_stat_database now, so that the counter moves only for others (the
            # tests' role may call the function where a template granted it; elsewhere the count comes later)
            with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
                self.conn.execute("SELECT pg_stat_force_next_flush()")
            self.conn.execute("SELECT 1")
        row = self.conn.execute(f"SELECT {_XMAX}, oid FROM pg_database WHERE datname = current_database()").fetchone()
        assert row is not None
        self._snapshot_xmax = int(row[0])
        self._check = self._check_template().replace("{oid}", str(int(row[1])))
        self.conn.autocommit = False
        self.sessions = self._sessions()

    def _check_template(self) -> str:
        """The statement read in the rollback's round trip ({oid}: the session database's, {ours}: our backends)."""
        return CHECK if self.server.version[0] >= 15 else CHECK_14

    def _sessions(self) -> int | None:
        if self.server.version[0] < 15:
            return None
        row = self.server.admin.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = %s", [self.dbname]
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def _fresh_clone(self) -> str:
        self._restores += 1
        try:
            return self.server.create_database(
                f"session{self._restores}", template=self.template, clause=self.clone_clause
            )
        except psycopg.errors.InvalidCatalogName as error:  # the template was dropped (by a test?)
            raise clone_failed(self.template, error) from None

    def _exists(self) -> bool:
        row = self.server.admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [self.dbname]).fetchone()
        return row is not None

    def _replace_dropped(self, test_id: str) -> None:
        """Someone dropped the session database during ``test_id``: clone a new one, and say so."""
        dropped = self.dbname
        assert dropped
        self._close_parked()
        self._close()
        self.server.forget_database(dropped)
        self.dbname = self._fresh_clone()
        self._connect()
        raise findings.session_db_dropped(test_id, dropped, self.dbname)

    def _switch_to(self, fresh: str) -> None:
        """Use ``fresh`` (a new clone of the template) as the session database from now on."""
        self._close_parked()
        self._close()
        if self.dbname:
            self.server.drop_database(self.dbname)
        self.dbname = fresh
        self._connect()

    def _unprepare(self) -> None:
        """Roll back a transaction opened ahead for the next test."""
        if self._prepared is not None and self.conn is not None and not self.conn.broken:
            self.conn.rollback()
        self._prepared = None

    def _lose_scopes(self, reason: str) -> None:
        for scope in self.scopes:
            scope.lost = scope.lost or reason

    def _close(self) -> None:
        self._prepared = None
        if self.conn is not None:
            state_of(self.conn).active = False
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
        self.conn = None

    # -- per test --------------------------------------------------------------------------------------
    def begin(self, test_id: str, reset_sequences: bool = False) -> Begun:
        """``reset_sequences``: set back, after the test, the sequences it moved (pg_reset_sequences)."""
        if self.dbname is None:
            self._create_session_db()
        elif self.conn is None or self.conn.closed or self.conn.broken:
            self._close()
            self._connect()
        conn = self.conn
        assert conn is not None
        self._check_scopes(test_id)
        conn.row_factory = psycopg.rows.tuple_row
        conn.reset_levels()
        prepared, self._prepared = self._prepared, None
        # the sequences as the last test's restore left them, if nothing ran on the connection since (a scoped
        # fixture set up between two tests may have moved them): no need to read them again
        known = self._sequences_now if not state_of(conn).used else None
        self._sequences_now = None
        read = reset_sequences and known is None
        sequences = None
        if self.scopes:
            if conn.info.transaction_status == pq.TransactionStatus.INERROR:  # a scoped fixture's failed statement
                conn.execute(f"{INTERNAL}ROLLBACK TO SAVEPOINT {SAVEPOINT}")
            sequences = self._begin_in(conn, test_id, read, f"SAVEPOINT {IN_SCOPE}; ")
        elif prepared != test_id or conn.info.transaction_status != pq.TransactionStatus.INTRANS:
            if conn.info.transaction_status != pq.TransactionStatus.IDLE:
                conn.rollback()
            # psycopg sends BEGIN first: the connection is not in autocommit
            sequences = self._begin_in(conn, test_id, read)
        elif read:
            sequences = snapshot(conn.execute(SNAPSHOT).fetchall())
        self._test_sequences = (known or sequences) if reset_sequences else None
        state_of(conn).active = True
        assert self.dbname
        return Begun(self.dbname, conn)

    def _begin_in(
        self, conn: SandboxConnection, test_id: str, reset_sequences: bool, first: str = ""
    ) -> tuple[SequenceState, ...] | None:
        """The test's savepoint (and application_name), with the sequences' state in the same round trip;
        ``first``: a statement before them."""
        query = first.encode() + self._begin + self._app_name(test_id)
        if not reset_sequences:
            conn.execute(query)
            return None
        cursor = conn.execute(query + b"; " + SNAPSHOT.encode())
        for _ in range(2 + first.count(";")):
            cursor.nextset()
        return snapshot(cursor.fetchall())

    def _check_scopes(self, test_id: str) -> None:
        lost = next((scope for scope in self.scopes if scope.lost), None)
        if lost is not None:
            raise findings.scope_lost(test_id, lost.scope_id, lost.lost)

    def _app_name(self, test_id: str) -> bytes:
        assert self.conn is not None
        escaped = pq.Escaping(self.conn.pgconn).escape_literal(app_name(test_id).encode())
        return bytes(escaped)

    def end(
        self,
        test_id: str,
        dbname: str,
        *,
        guests: GuestConnections,
        ours: Collection[int] = (),
        keep_as: str | None = None,
        next_test_id: str | None = None,
    ) -> list[Finding]:
        """Roll the test back and check what escaped. Returns findings to warn about; raises
        :class:`IsolationError` (after restoring the database) when committed writes escaped.

        ``next_test_id``: the test that runs next, if it is known to use this isolation. Its transaction
        is then opened in the same round trip as this rollback, and its :meth:`begin` costs none.
        ``guests``: the driver connections the test used, already rolled back (or committed, to keep)."""
        conn = self.conn
        assert conn is not None and self.dbname  # ``dbname``: the session database when the test began
        state_of(conn).active = False
        if keep_as is not None:
            self._keep(conn, keep_as)
            return []
        started_xmax = self._snapshot_xmax  # the next transaction id when this test began
        scoped = bool(self.scopes)
        if scoped:
            next_test_id = None  # what runs between two tests of a scope may be a scoped fixture's setup
        try:
            own_escape, suspects, sessions = self._rollback(conn, next_test_id, scoped)
        except psycopg.OperationalError:  # the connection was cut (terminated, its database dropped): as broken
            own_escape, suspects, sessions = True, True, None
        if scoped and own_escape:
            self._lose_scopes(
                f"{test_id} ended the transaction that held it (a COMMIT or ROLLBACK statement on the "
                "test's connection, or the connection was cut)"
            )
        state_of(conn).active = any(not scope.lost for scope in self.scopes)  # scoped fixtures' commits stay inside
        if (conn.broken or conn.closed) and not self._exists():
            self._replace_dropped(test_id)
        # an autocommit guest (pg_admin) may have written only if some transaction took an id meanwhile
        committed = guests.committing if self._snapshot_xmax > started_xmax else []
        expected_sessions = None if self.sessions is None else self.sessions + guests.connects
        more_sessions = sessions is not None and expected_sessions is not None and sessions > expected_sessions
        if conn.broken or conn.closed:
            self._close()
            self._connect()
        else:
            # a guest's session may reach the statistics only when its backend exits: count it now
            self.sessions = expected_sessions
        if suspects or own_escape or guests.escaped or committed or more_sessions:
            self._unprepare()  # the checks below need the connection outside a transaction
        assert self.dbname
        found = self._release_held(test_id) if any(self._held) else []
        ours = [*self._ours(), *guests.pids, *ours]
        left_open = (
            end_left_open(self.server.admin, self.dbname, test_id, ours, SESSION_DB, TRANSACTION_ADVICE, spare=ours)
            if suspects
            else []
        )
        found += left_open
        other_sessions = bool(left_open) or more_sessions
        if not (own_escape or guests.escaped or committed or other_sessions):
            return found
        changes = self._restore_if_changed(started_xmax)
        if not changes:
            self.sessions = self._sessions()
            return found
        raise findings.escaped(
            test_id,
            changes,
            own=own_escape,
            guests=guests.escaped,
            committed=committed,
            others=other_sessions,
            restored=self.restored,
            own_connections=self.own_connections,
        )

    restored = "pgsandbox cloned the session database again from the template"  # after an escape, said so
    own_connections = "use @pytest.mark.pg(isolation='database')"  # the advice for code that connects itself

    def _restore_if_changed(self, since_xmax: int) -> list[str]:
        """Something may have escaped: compare with a fresh clone of the template, which replaces the session
        database if anything did. Returns what changed (nothing: the session database stays)."""
        assert self.dbname
        fresh = self._fresh_clone()
        from pgsandbox.isolation.changes import what_changed  # only after an escape

        changes = what_changed(self.server, self.dbname, fresh, since_xmax)
        if not changes:
            self.server.drop_database(fresh)
            return []
        self._switch_to(fresh)
        return changes

    def _rollback(
        self, conn: SandboxConnection, next_test_id: str | None, scoped: bool = False
    ) -> tuple[bool, bool, int | None]:
        """Roll back, in one round trip in the common case. Returns whether the test's transaction had been
        replaced (a raw COMMIT or END), whether other connections are open to the database, and the
        database's session counter (PostgreSQL 15+). ``scoped``: back to the scope's savepoint, not out of the
        transaction."""
        sequences, self._test_sequences = self._test_sequences, None
        if conn.closed or conn.broken:
            return True, True, self._sessions()
        replaced = False
        restore = restore_sql(sequences) if sequences is not None else None
        head = SCOPED_ROLLBACK if scoped else ROLLBACK
        statements = head.count(";") + (restore is not None)
        query = (head + (restore + "; " if restore else "") + self._check_query()).encode()
        if next_test_id is not None:
            query += b"; BEGIN; " + self._begin + self._app_name(next_test_id)
        try:
            cursor = conn.execute(query)
            for _ in range(statements):
                cursor.nextset()
            if next_test_id is not None:
                self._prepared = next_test_id
            self._sequences_now = sequences
            state_of(conn).used = False
        except psycopg.errors.InvalidSavepointSpecification:
            replaced = True
            conn.rollback()
            if restore:
                conn.execute(restore)
            cursor = conn.execute(self._check_query())
            conn.rollback()
        row = cursor.fetchone()
        assert row is not None
        self._snapshot_xmax = int(row[2])
        self._held = (int(row[3]), int(row[4]))
        return replaced, bool(row[0]), row[1]

    # -- scoped data -----------------------------------------------------------------------------------
    def open_scope(self, scope_id: str, reset_sequences: bool = False) -> Begun:
        """Open a scope inside the current one (or in a new transaction): what is written on the session
        connection until :meth:`close_scope` is there for every test begun meanwhile. ``reset_sequences``: the
        sequences are set back to their state of now when the scope closes."""
        if self.dbname is None:
            self._create_session_db()
        elif self.conn is None or self.conn.closed or self.conn.broken:
            self._close()
            self._connect()
        self._check_scopes(scope_id)
        conn = self.conn
        assert conn is not None and self.dbname
        self._unprepare()
        self._sequences_now = None
        conn.row_factory = psycopg.rows.tuple_row
        conn.reset_levels()
        if conn.info.transaction_status == pq.TransactionStatus.INERROR:  # a scoped fixture's failed statement
            conn.execute(f"{INTERNAL}ROLLBACK TO SAVEPOINT {SAVEPOINT}")
        savepoint = f"pgsandbox_scope{len(self.scopes)}"
        # the scope's own pgsandbox_test savepoint is what its fixtures' commit() moves
        query = f"{INTERNAL}SAVEPOINT {savepoint}; ".encode() + self._begin + self._app_name(scope_id)
        sequences = None
        if reset_sequences:
            cursor = conn.execute(query + b"; " + SNAPSHOT.encode())
            for _ in range(3):
                cursor.nextset()
            sequences = snapshot(cursor.fetchall())
        else:
            conn.execute(query)
        self.scopes.append(Scope(scope_id, savepoint, sequences, self._snapshot_xmax))
        state_of(conn).active = True
        return Begun(self.dbname, conn)

    def close_scope(self, scope_id: str) -> list[Finding]:
        """Roll back what the scope ``scope_id`` made (and scopes inside it, if any were left open). Raises
        :class:`IsolationError` (after restoring the session database) when its writes escaped."""
        while self.scopes and self.scopes[-1].scope_id != scope_id:
            self.scopes.pop()
        if not self.scopes:
            return []
        scope = self.scopes.pop()
        conn = self.conn
        outermost = not self.scopes
        if conn is None or conn.closed or conn.broken or scope.lost:
            if outermost and conn is not None:
                state_of(conn).active = False
            return []
        self._unprepare()
        self._sequences_now = None
        restore = restore_sql(scope.sequences) if scope.sequences is not None else None
        query = f"{INTERNAL}ROLLBACK TO SAVEPOINT {scope.savepoint}; RELEASE SAVEPOINT {scope.savepoint}"
        if outermost:
            query += "; ROLLBACK"
        if restore:
            query += "; " + restore
        try:
            conn.execute(query.encode())
        except psycopg.errors.InvalidSavepointSpecification:
            # a scoped fixture ran COMMIT (or ROLLBACK): what it made may be committed in the session database
            state_of(conn).active = False  # a real rollback, not one to the test's savepoint
            conn.rollback()
            if restore:
                conn.execute(restore)
            self._lose_scopes(f"{scope_id} ended the transaction that held it")
            changes = self._restore_if_changed(scope.started_xmax)
            if changes:
                raise findings.escaped(
                    scope_id, changes, own=True, restored=self.restored, own_connections=self.own_connections
                ) from None
        finally:
            if outermost and self.conn is not None:
                state_of(self.conn).active = False
        return []

    def _release_held(self, test_id: str) -> list[Finding]:
        """Release what the rollback left (advisory locks, prepared transactions) and say so."""
        advisory, prepared = self._held
        self._held = (0, 0)
        conn = self.conn
        if conn is None or conn.closed or conn.broken:
            return []
        found: list[Finding] = []
        if advisory:
            conn.execute(INTERNAL + "SELECT pg_advisory_unlock_all()")
            found.append(findings.advisory_left(test_id, advisory))
        if prepared:
            self._unprepare()
            conn.autocommit = True
            try:
                found += end_prepared(conn, test_id, SESSION_DB)
            finally:
                conn.autocommit = False
        return found

    def _check_query(self) -> str:
        return INTERNAL + self._check.replace("{ours}", str(1 + len(self.parked)))

    def _ours(self) -> list[int]:
        own = [self.conn.info.backend_pid] if self.conn is not None and not self.conn.closed else []
        return own + [parked.pid for parked in self.parked.values()]

    # -- driver connections kept between tests ---------------------------------------------------------
    def park(self, driver: str, parked: Parked) -> None:
        """Keep a connection (rolled back, outside a transaction) for the next test that uses ``driver``."""
        old = self.parked.pop(driver, None)
        if old is not None and old.conn is not parked.conn:
            self._discard(old)
        self.parked[driver] = parked

    def unpark(self, driver: str, loop: Any = None) -> Parked | None:
        """The parked connection of ``driver`` if it can serve a test running in ``loop`` (None: sync)."""
        parked = self.parked.pop(driver, None)
        if parked is not None and parked.loop is not loop:
            self._discard(parked)
            return None
        return parked

    def _discard(self, parked: Parked) -> None:
        closed = False
        with contextlib.suppress(Exception):
            closed = parked.close()
        if not closed:
            # its client cannot say goodbye: end the server side, or it would count as a leak
            with contextlib.suppress(psycopg.Error):
                self.server.admin.execute("SELECT pg_terminate_backend(%s)", [parked.pid])

    def close_quietly(self) -> None:
        """The server is gone: close the clients' ends, and ask it nothing."""
        for parked in self.parked.values():
            with contextlib.suppress(Exception):
                parked.close()
        self.parked.clear()
        self._close()

    def _close_parked(self) -> None:
        for parked in self.parked.values():
            self._discard(parked)
        self.parked.clear()

    def _keep(self, conn: SandboxConnection, keep_as: str) -> None:
        """Commit the failed test's work and keep the database under ``keep_as``; start a fresh one."""
        if conn.info.transaction_status == pq.TransactionStatus.INERROR:
            conn.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
        if conn.info.transaction_status != pq.TransactionStatus.IDLE:
            conn.execute("COMMIT")
        self._close_parked()
        self._close()
        assert self.dbname
        terminate_connections(self.server.admin, self.dbname)  # driver connections may still be exiting
        self.server.rename_database(self.dbname, keep_as)
        self._kept += 1
        self.dbname = self.server.create_database(
            f"session_after{self._kept}", template=self.template, clause=self.clone_clause
        )
        self._connect()

    def close(self) -> None:
        self._close_parked()
        self._close()
        # not on a local server about to be removed: the database goes with it, and its DROP would wait up to
        # 100 ms for the backend of the connection just closed to exit (PostgreSQL polls at that interval)
        if self.dbname and self._drop_at_close and not self.server.drops_databases_later:
            with contextlib.suppress(psycopg.Error, PgSandboxError):
                self.server.drop_database(self.dbname)
        self.dbname = None
