"""``transaction`` isolation: every test runs in a transaction on the session database, rolled back after.

One connection serves every test (a new one costs milliseconds, a BEGIN costs microseconds). After each
test pgsandbox checks that nothing escaped the rollback: a raw ``COMMIT`` on the test's connection, or
another connection that wrote to the session database. When something did, the test is reported with
what changed and the session database is cloned again from the template, so the next test starts clean.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import pq, sql

from pgsandbox.errors import PgSandboxError
from pgsandbox.isolation.connection import SAVEPOINT, SandboxConnection
from pgsandbox.isolation.database import clone_failed
from pgsandbox.isolation.guests import Guests, Parked, state_of
from pgsandbox.isolation.guests import app_name as app_name  # re-exported: sandbox/core.py takes it from here
from pgsandbox.server.base import Server, Session, connections_to, terminate_connections
from pgsandbox.server.statements import INTERNAL, OURS_PREFIX

LEFTOVER_WAIT_SECONDS = 0.2
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


class Finding(str):
    """A teardown finding: its message, and its ``kind`` for the session report."""

    kind = "other"

    @classmethod
    def of(cls, kind: str, message: str) -> Finding:
        finding = cls(message)
        finding.kind = kind
        return finding


LEFT_OPEN = "connections left open"
IDLE_IN_TRANSACTION = "sessions left idle in transaction"
ADVISORY = "advisory locks left held"
PREPARED = "prepared transactions left"


def rollback_prepared(conn: psycopg.Connection[Any]) -> list[str]:
    """Roll back the transactions prepared in ``conn``'s database (ROLLBACK PREPARED must run there, outside a
    transaction); return their names."""
    gids = [
        row[0]
        for row in conn.execute(
            "SELECT gid FROM pg_prepared_xact() WHERE dbid = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    ]
    for gid in gids:
        with contextlib.suppress(psycopg.Error):
            conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
    return gids


def left_open(test_id: str, sessions: list[Session], where: str, advice: str = "") -> list[str]:
    """Findings for connections a test left open on ``where`` (pgsandbox terminates them): those idle in a
    transaction they never ended apart, as they also held locks and a snapshot."""
    idle = [session for session in sessions if session.idle_in_transaction]
    other = [session for session in sessions if not session.idle_in_transaction]
    findings: list[str] = []
    if idle:
        findings.append(
            Finding.of(
                IDLE_IN_TRANSACTION,
                f"{test_id} left {len(idle)} session(s) idle in transaction on {where} "
                f"({'; '.join(map(str, idle))}): a transaction was begun and never committed or rolled back (its "
                "locks and snapshot were held until then); pgsandbox terminated them." + advice,
            )
        )
    if other:
        findings.append(
            Finding.of(
                LEFT_OPEN,
                f"{test_id} left {len(other)} connection(s) open to {where} ({'; '.join(map(str, other))}); "
                "pgsandbox terminated them." + advice,
            )
        )
    return findings


class IsolationError(PgSandboxError):
    """A test broke its isolation (a commit escaped the rollback); the database was restored."""


@dataclass(frozen=True)
class Contents:
    """Rows per table, those written from a transaction id on, and the number of relations: enough to say what a
    test changed."""

    rows: dict[str, int] = field(default_factory=dict)
    relations: int = 0
    written: dict[str, int] = field(default_factory=dict)


def contents(conn: psycopg.Connection[Any], since_xid: int = 0) -> Contents:
    """Count the rows of every table, and those inserted or updated by transactions from ``since_xid`` on, in one
    scan per table (autocommit connection). Only run when an escape is suspected."""
    tables = conn.execute(
        "SELECT format('%I.%I', n.nspname, c.relname) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' ORDER BY 1"
    ).fetchall()
    rows: dict[str, int] = {}
    written: dict[str, int] = {}
    since = sql.Literal(since_xid % (1 << 32))
    for start in range(0, len(tables), 200):
        chunk = [t[0] for t in tables[start : start + 200]]
        query = sql.SQL(" UNION ALL ").join(
            sql.SQL("SELECT {}, count(*), count(*) FILTER (WHERE xmin::text::bigint >= {}) FROM {}").format(
                sql.Literal(name), since, sql.SQL(name)
            )
            for name in chunk
        )
        for name, count, new in conn.execute(query).fetchall():
            rows[name], written[name] = count, new
    relations = conn.execute("SELECT count(*) FROM pg_class").fetchone()
    return Contents(rows, int(relations[0]) if relations else 0, written)


# What else a commit can leave in a database: the objects of its catalogs (a function, a schema, a view, a
# trigger, a policy, a grant...). A clone keeps the template's object ids, so the session database and a fresh
# clone are compared by (catalog, oid), and only what differs is named. Only user objects (oid >=
# FirstNormalObjectId), not those PostgreSQL made as part of another (a dependency of type internal: a table's
# row type, a view's rule, a range's constructors) or of an extension (which is named), and not the temporary
# schemas a connection leaves behind nor what is in them (``temp``).
_OBJECT_CATALOGS: tuple[tuple[str, str], ...] = (
    # (pg_user_mapping is not here: only superusers may read it)
    ("pg_namespace", "t.oid NOT IN (SELECT oid FROM temp)"),
    ("pg_class", "relnamespace NOT IN (SELECT oid FROM temp)"),
    ("pg_proc", "pronamespace NOT IN (SELECT oid FROM temp)"),
    ("pg_type", "typnamespace NOT IN (SELECT oid FROM temp)"),
    ("pg_constraint", "connamespace NOT IN (SELECT oid FROM temp)"),
    ("pg_collation", "collnamespace NOT IN (SELECT oid FROM temp)"),
    *(
        (catalog, "true")
        for catalog in (
            *("pg_trigger", "pg_policy", "pg_rewrite", "pg_attrdef", "pg_event_trigger", "pg_operator"),
            *("pg_opclass", "pg_opfamily", "pg_cast", "pg_conversion", "pg_ts_config", "pg_ts_dict"),
            *("pg_ts_parser", "pg_ts_template", "pg_extension", "pg_publication", "pg_statistic_ext"),
            *("pg_default_acl", "pg_foreign_data_wrapper", "pg_foreign_server"),
            *("pg_language", "pg_am", "pg_transform", "pg_largeobject_metadata"),
        )
    ),
)
_CLASS_OF = {"pg_largeobject_metadata": "pg_largeobject"}  # the class pg_identify_object knows them by
_OBJECT_ROWS = (
    INTERNAL
    + "WITH temp AS (SELECT oid FROM pg_namespace WHERE nspname LIKE 'pg\\_temp\\_%' OR nspname LIKE 'pg\\_toast%') "
    + " UNION ALL ".join(
        f"SELECT '{_CLASS_OF.get(catalog, catalog)}'::regclass::oid, t.oid, t.xmin::text::bigint "
        f"FROM {catalog} t WHERE t.oid >= 16384 AND {condition}"
        for catalog, condition in _OBJECT_CATALOGS
    )
)
_DESCRIBE = (
    INTERNAL + "SELECT s.classid, s.objid, o.type, o.identity, "
    "EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = s.classid AND d.objid = s.objid "
    "AND d.deptype IN ('i', 'e')), p.type, p.identity "
    "FROM unnest(%s::oid[], %s::oid[]) s(classid, objid) "
    "CROSS JOIN LATERAL pg_identify_object(s.classid, s.objid, 0) o "
    # the object it goes with (an index or a sequence with its table, a default with its column's table)
    "LEFT JOIN LATERAL (SELECT r.type, r.identity "
    "FROM pg_depend d, pg_identify_object(d.refclassid, d.refobjid, 0) r "
    "WHERE d.classid = s.classid AND d.objid = s.objid AND d.deptype = 'a' LIMIT 1) p ON true"
)
MAX_NAMED = 30  # objects named in a message; the rest are counted

CatalogRow = tuple[int, int]  # (catalog, oid)
ObjectKey = tuple[str, str]  # (type, identity), as pg_identify_object gives them


@dataclass(frozen=True)
class Described:
    """An object of the catalogs, named."""

    key: ObjectKey
    made_with_another: bool  # PostgreSQL made it as part of another object, or it is an extension's
    part_of: ObjectKey | None  # the object it goes with (an index with its table...)


def catalog_rows(conn: psycopg.Connection[Any]) -> dict[CatalogRow, int]:
    """The database's user objects, with the transaction that last wrote each one's catalog row (its raw
    ``xmin``, which freezing keeps: the same in every clone of a template). Only run when an escape is
    suspected (autocommit connection)."""
    return {(int(classid), int(objid)): int(xid) for classid, objid, xid in conn.execute(_OBJECT_ROWS).fetchall()}


def describe(conn: psycopg.Connection[Any], rows: list[CatalogRow]) -> list[Described]:
    """What the objects of ``rows`` are (in ``conn``'s database), in one query."""
    if not rows:
        return []
    found = conn.execute(_DESCRIBE, [[r[0] for r in rows], [r[1] for r in rows]]).fetchall()
    return [
        Described((str(kind), str(identity)), bool(made_with), (str(of_kind), str(of)) if of_kind else None)
        for _, _, kind, identity, made_with, of_kind, of in found
    ]


def object_changes(now: psycopg.Connection[Any], then: psycopg.Connection[Any], tables: set[str]) -> list[str]:
    """Objects created, dropped or altered (its catalog row written again: another ``xmin`` than the template's)
    in ``now``'s database compared with ``then``'s (a fresh clone); not those created or dropped with the object
    they go with, nor the ``tables`` whose rows already say so. About 10 ms for 50 tables (550 objects)."""
    rows_now, rows_then = catalog_rows(now), catalog_rows(then)
    came = [row for row in rows_now if row not in rows_then]
    went = [row for row in rows_then if row not in rows_now]
    altered = [row for row, xid in rows_now.items() if row in rows_then and xid != rows_then[row]]
    created = {d.key: d for d in describe(now, came) if not d.made_with_another}
    dropped = {d.key: d for d in describe(then, went) if not d.made_with_another}
    changed = {d.key for d in describe(now, altered) if not d.made_with_another}
    changed |= set(created) & set(dropped)  # dropped and made again
    new_or_gone = set(created) | set(dropped)
    found = []
    for key in sorted(new_or_gone | changed):
        kind, identity = key
        if key in changed:
            found.append(f"{kind} {identity} (altered)")
            continue
        part_of = (created.get(key) or dropped[key]).part_of
        if (kind == "table" and identity in tables) or (part_of is not None and part_of in new_or_gone):
            continue  # its rows, or the object it goes with, say so
        found.append(f"{kind} {identity} ({'created' if key in created else 'dropped'})")
    return found


class TransactionIsolation:
    def __init__(self, server: Server, template: str, clone_clause: sql.Composable) -> None:
        self.server = server
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

    # -- the session database ------------------------------------------------------------------------
    def _create_database(self) -> None:
        try:
            self.dbname = self.server.create_database("session", template=self.template, clause=self.clone_clause)
        except psycopg.errors.InvalidCatalogName as error:  # the template was dropped (by a test?)
            raise clone_failed(self.template, error) from None
        self._connect()

    def _connect(self) -> None:
        assert self.dbname
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
        self._check = (CHECK if self.server.version[0] >= 15 else CHECK_14).replace("{oid}", str(int(row[1])))
        self.conn.autocommit = False
        self.sessions = self._sessions()

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
        raise IsolationError(
            f"the session database {dropped} was dropped during {test_id} (DROP DATABASE through another "
            "connection, such as pg_server.connect() or a framework's own teardown); pgsandbox cloned a new one "
            f"from the template ({self.dbname}): the next test starts clean.",
            "leave the session database to pgsandbox; a test that drops its database needs one of its own: "
            "@pytest.mark.pg(isolation='database').",
        )

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

    def _close(self) -> None:
        self._prepared = None
        if self.conn is not None:
            state_of(self.conn).active = False
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
        self.conn = None

    # -- per test --------------------------------------------------------------------------------------
    def begin(self, test_id: str) -> SandboxConnection:
        if self.dbname is None:
            self._create_database()
        elif self.conn is None or self.conn.closed or self.conn.broken:
            self._close()
            self._connect()
        conn = self.conn
        assert conn is not None
        conn.row_factory = psycopg.rows.tuple_row
        conn.reset_levels()
        prepared, self._prepared = self._prepared, None
        if prepared != test_id or conn.info.transaction_status != pq.TransactionStatus.INTRANS:
            if conn.info.transaction_status != pq.TransactionStatus.IDLE:
                conn.rollback()
            # psycopg sends BEGIN first: the connection is not in autocommit
            conn.execute(self._begin + self._app_name(test_id))
        state_of(conn).active = True
        return conn

    def _app_name(self, test_id: str) -> bytes:
        assert self.conn is not None
        escaped = pq.Escaping(self.conn.pgconn).escape_literal(app_name(test_id).encode())
        return bytes(escaped)

    def end(
        self,
        test_id: str,
        keep_as: str | None = None,
        next_test_id: str | None = None,
        guests: Guests | None = None,
    ) -> list[str]:
        """Roll the test back and check what escaped. Returns findings to warn about; raises
        :class:`IsolationError` (after restoring the database) when committed writes escaped.

        ``next_test_id``: the test that runs next, if it is known to use this isolation. Its transaction
        is then opened in the same round trip as this rollback, and its :meth:`begin` costs none.
        ``guests``: the driver connections the test used, already rolled back (or committed, to keep)."""
        conn = self.conn
        assert conn is not None and self.dbname
        state_of(conn).active = False
        guests = guests or Guests()
        if keep_as is not None:
            self._keep(conn, keep_as)
            return []
        started_xmax = self._snapshot_xmax  # the next transaction id when this test began
        try:
            own_escape, suspects, sessions = self._rollback(conn, next_test_id)
        except psycopg.OperationalError:  # the connection was cut (terminated, its database dropped): as broken
            own_escape, suspects, sessions = True, True, None
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
        findings: list[str] = self._release_held(test_id) if any(self._held) else []
        ours = [*self._ours(), *guests.pids]
        others = connections_to(self.server.admin, self.dbname, ours, LEFTOVER_WAIT_SECONDS) if suspects else []
        if others:
            findings += left_open(
                test_id,
                others,
                "the session database",
                " In transaction mode only the connections pgsandbox gives (pg, pg_conn, pg_session, "
                "pg_asyncpg...) are rolled back: use those, or isolation='database'.",
            )
            terminate_connections(self.server.admin, self.dbname, ours)
        other_sessions = bool(others) or more_sessions
        if not (own_escape or guests.escaped or committed or other_sessions):
            return findings
        # Something may have escaped: compare with a fresh clone of the template, which replaces the
        # session database if anything did.
        fresh = self._fresh_clone()
        changes = self._changes(fresh, started_xmax)
        if not changes:
            self.server.drop_database(fresh)
            self.sessions = self._sessions()
            return findings
        causes = []
        if own_escape:
            causes.append("its transaction was ended by a COMMIT (or END) statement run on the test's connection")
        causes.extend(
            f"the transaction of its {label} connection was ended by a COMMIT (or END) statement"
            for label in guests.escaped
        )
        causes.extend(f"its {label} connection, outside the test's transaction, committed" for label in committed)
        if other_sessions:
            causes.append("another connection to the session database committed")
        self._switch_to(fresh)
        raise IsolationError(
            f"{test_id} committed outside its transaction, so its writes escaped the rollback: "
            + "; ".join(causes)
            + ".\n  Changed: "
            + ", ".join(changes)
            + ".\n  pgsandbox cloned the session database again from the template: the next test starts clean.",
            "call conn.commit() on the connection pgsandbox gave you (it becomes a savepoint) instead of running "
            "COMMIT; for code that opens its own connections, use @pytest.mark.pg(isolation='database').",
        )

    def _rollback(self, conn: SandboxConnection, next_test_id: str | None) -> tuple[bool, bool, int | None]:
        """Roll back, in one round trip in the common case. Returns whether the test's transaction had been
        replaced (a raw COMMIT or END), whether other connections are open to the database, and the
        database's session counter (PostgreSQL 15+)."""
        if conn.closed or conn.broken:
            return True, True, self._sessions()
        replaced = False
        query = (ROLLBACK + self._check_query()).encode()
        if next_test_id is not None:
            query += b"; BEGIN; " + self._begin + self._app_name(next_test_id)
        try:
            cursor = conn.execute(query)
            cursor.nextset()
            cursor.nextset()
            if next_test_id is not None:
                self._prepared = next_test_id
        except psycopg.errors.InvalidSavepointSpecification:
            replaced = True
            conn.rollback()
            cursor = conn.execute(self._check_query())
            conn.rollback()
        row = cursor.fetchone()
        assert row is not None
        self._snapshot_xmax = int(row[2])
        self._held = (int(row[3]), int(row[4]))
        return replaced, bool(row[0]), row[1]

    def _release_held(self, test_id: str) -> list[str]:
        """Release what the rollback left (advisory locks, prepared transactions) and say so."""
        advisory, prepared = self._held
        self._held = (0, 0)
        conn = self.conn
        if conn is None or conn.closed or conn.broken:
            return []
        findings: list[str] = []
        if advisory:
            conn.execute(INTERNAL + "SELECT pg_advisory_unlock_all()")
            findings.append(
                Finding.of(
                    ADVISORY,
                    f"{test_id} left {advisory} advisory lock(s) held on its connection (pg_advisory_lock without "
                    "pg_advisory_unlock; a rollback does not release session-level locks); pgsandbox released them.",
                )
            )
        if prepared:
            self._unprepare()
            conn.autocommit = True
            try:
                gids = rollback_prepared(conn)
            finally:
                conn.autocommit = False
            findings.append(
                Finding.of(
                    PREPARED,
                    f"{test_id} left {len(gids)} prepared transaction(s) ({', '.join(gids)}): PREPARE TRANSACTION "
                    "outlives the test's rollback; pgsandbox rolled them back.",
                )
            )
        return findings

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

    def _close_parked_quietly(self) -> None:
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

    def _changes(self, fresh: str, since_xid: int) -> list[str]:
        """What differs between the session database and ``fresh``, a clone of the template: rows, and catalog
        objects (functions, schemas, views...). Both are read as the admin, who may read what an escaped
        commit made (a table pg_admin created) and whom row-level security does not hide rows from."""
        assert self.dbname
        # the second is named: its end (the database may be dropped as it exits) is not the test's in the log
        with (
            self.server.connect(fresh, autocommit=True) as pristine,
            self.server.connect(self.dbname, autocommit=True, application_name=OURS_PREFIX) as current,
        ):
            then = contents(pristine)
            now = contents(current, since_xid)
            objects = object_changes(current, pristine, set(now.rows) | set(then.rows))
        changes = []
        for table in sorted(set(now.rows) | set(then.rows)):
            before, after = then.rows.get(table), now.rows.get(table)
            if before is None:
                changes.append(f"{table} (created, {after} rows)")
            elif after is None:
                changes.append(f"{table} (dropped)")
            else:
                written = now.written[table]
                if after != before or written:
                    delta = f"{after - before:+d} rows" if after != before else "same row count"
                    changes.append(f"{table} ({delta}, {written} rows written)")
        changes += objects
        if not changes and now.relations != then.relations:
            changes.append(f"the schema ({now.relations - then.relations:+d} relations)")
        if len(changes) > MAX_NAMED:
            changes[MAX_NAMED:] = [f"and {len(changes) - MAX_NAMED} more"]
        return changes

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
        if self.dbname:
            with contextlib.suppress(psycopg.Error, PgSandboxError):
                self.server.drop_database(self.dbname)
        self.dbname = None
