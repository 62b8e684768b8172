"""The handles a sandbox gives out: a test's database (the ``pg`` fixture) and the session's login."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg import pq
from psycopg.rows import dict_row

from pgsandbox.common.redact import Secret
from pgsandbox.common.urls import ConnectionForms
from pgsandbox.data.catalog import Catalog
from pgsandbox.data.catalog import read as read_catalog
from pgsandbox.data.connections import async_executor, dict_cursor, executor
from pgsandbox.data.rows import Rows
from pgsandbox.data.rows import run as run_steps
from pgsandbox.data.rows import run_async as run_steps_async
from pgsandbox.errors import ConfigError
from pgsandbox.isolation.base import Mode
from pgsandbox.isolation.guests import Guests, Parked, app_name
from pgsandbox.isolation.roles import AsRole, TestRoles, block_of
from pgsandbox.isolation.server_objects import ServerObjects, server_objects
from pgsandbox.isolation.transaction import TransactionIsolation
from pgsandbox.server import Server
from pgsandbox.server.statement_log import Position, log_time
from pgsandbox.server.statements import Scope

T = TypeVar("T")
ADMIN_SUFFIX = " (admin)"  # in the application_name of pg_admin's connections


def _one_row(cursor: Any) -> dict[str, Any]:
    row: dict[str, Any] = cursor.fetchone()
    return row


@dataclass(frozen=True)
class ConnectionInfo:
    host: str
    port: int
    dbname: str
    user: str


@dataclass
class TestInternals:
    """What the sandbox and the driver adapters keep for one test, behind its ``pg`` handle (``db._test``): the
    guests that joined it, its drivers' connections, the parked connections of the session database, what the
    sandbox watches for the test. None of it is the user's API."""

    __test__ = False  # not a test class, whatever pytest makes of the name

    dbname: str
    test_id: str
    isolation: Mode
    guests: Guests = field(default_factory=Guests)
    drivers: dict[str, Any] = field(default_factory=dict)  # the test's async connections, by driver
    # transaction isolation: the session database's, where driver connections are parked between tests
    parking: TransactionIsolation | None = None
    # the server's databases, roles and tablespaces when the test could first create some (server_objects.py)
    server_objects: ServerObjects | None = None
    # the data factories (pg.insert): the template's catalog, given by the sandbox
    catalog_source: Callable[[Database], Catalog] | None = None
    data_seed: str = ""  # the data factories' seed option (pg_data_seed)
    rows: Rows | None = None  # the test's data factory, once pg.insert or pg.rows made it
    # the DB-API connection (psycopg or psycopg2) pg.execute, fetch and insert run on instead of pg's own: a
    # framework's, whose transaction the test's code writes in (Django's, in a django_db test); its transaction
    # state is the framework's to decide
    borrowed: Callable[[], Any] | None = None
    log_start: Position | None = None  # where the statement log stood at the test's start
    started: float = field(default_factory=time.time)  # when the test's database was opened (epoch seconds)
    roles: TestRoles = field(default_factory=TestRoles)  # pg.as_role blocks and the connections they reach
    admin_connections: list[Any] = field(default_factory=list)  # pg_admin's: never switched to an app's role

    @property
    def scope(self) -> Scope:
        """What in the statement log is this test's: its connections' names, and its database when it is
        the test's own."""
        names = frozenset((app_name(self.test_id), app_name(self.test_id, ADMIN_SUFFIX)))
        if self.isolation == "database":
            return Scope(names, self.dbname)
        return Scope(names, shared=self.dbname, since=log_time(self.started))

    def joined(self, pid: int) -> None:
        """A driver connected to this database for the test (backend ``pid``): it is not a leak."""
        self.guests.joined(pid)

    def escaped(self, label: str) -> None:
        """A driver found its transaction replaced by a raw COMMIT: the test's writes may have escaped."""
        self.guests.escaped.append(label)

    def park(self, driver: str, conn: Any, pid: int, close: Callable[[], bool], loop: Any = None) -> bool:
        """Keep a rolled-back driver connection for the next test (``transaction`` isolation only); an async
        one with its event ``loop``. False when it cannot be kept and the caller closes it."""
        if self.parking is None or self.parking.dbname != self.dbname:
            return False
        self.parking.park(driver, Parked(conn, pid, close, loop))
        return True

    def unpark(self, driver: str, loop: Any = None) -> Any | None:
        """A connection of ``driver`` a previous test parked on this database (in this event ``loop``, for an
        async one), now this test's guest."""
        if self.parking is None or self.parking.dbname != self.dbname:
            return None
        parked = self.parking.unpark(driver, loop)
        if parked is None:
            return None
        self.guests.joined(parked.pid, connected=False)
        return parked.conn

    @property
    def session_state(self) -> dict[str, Any] | None:
        """Driver state that lives as long as the session database (``transaction`` isolation), else None."""
        return self.parking.state if self.parking is not None else None


@dataclass
class Database(ConnectionForms):
    """A test's database: the ``pg`` fixture. Connect with :meth:`connect`, or hand :attr:`dsn`,
    :attr:`database_url`, :meth:`url` or :attr:`env` to any client (see :class:`ConnectionForms`; in
    ``transaction`` isolation only the connection from :meth:`connect` is rolled back)."""

    isolation: Mode
    name: str
    test_id: str
    server: Server = field(repr=False)
    _connection: psycopg.Connection[Any] | None = field(default=None, repr=False)
    _opened: list[psycopg.Connection[Any]] = field(default_factory=list, repr=False)
    keep: bool = False  # keep this database after the test (a failed test under keep-failed)
    _test: TestInternals = field(init=False, repr=False)  # the sandbox's and the drivers' side of the test

    def __post_init__(self) -> None:
        self._test = TestInternals(self.name, self.test_id, self.isolation)

    @property
    def dsn(self) -> str:
        """libpq connection string of the tests' role; its password is in the passfile it names."""
        return self.server.login_dsn_for(self.name)

    def reveal_password(self) -> Secret | None:
        return self.server.login_password()

    @property
    def info(self) -> ConnectionInfo:
        params = self.params
        return ConnectionInfo(
            str(params.get("host", "")), int(params.get("port") or 5432), self.name, str(params["user"])
        )

    @property
    def connection(self) -> psycopg.Connection[Any]:
        """The test's main psycopg connection (in ``transaction`` isolation, the one that is rolled back)."""
        if self.isolation == "transaction":
            assert self._connection is not None  # never replaced: a new connection would escape the rollback
            return self._connection
        if self._connection is None or self._connection.closed:
            self._connection = self._open()
        return self._connection

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """In ``transaction`` isolation, the test's connection; in ``database`` isolation, a new connection
        (closed after the test if the test did not close it)."""
        if self.isolation == "transaction":
            if kwargs:
                raise ConfigError(
                    "in transaction isolation pg.connect() returns the test's one connection and takes no options.",
                    "set options on the connection it returns, or use @pytest.mark.pg(isolation='database').",
                )
            return self.connection
        return self._open(**kwargs)

    def _open(self, **kwargs: Any) -> psycopg.Connection[Any]:
        kwargs.setdefault("application_name", app_name(self.test_id))
        conn = psycopg.connect(self.dsn, **kwargs)
        self._opened.append(conn)
        return conn

    def execute(self, query: Any, params: Any = None) -> int:
        """Run one statement on :attr:`connection`; return the number of rows it affected."""
        rowcount: int = self._run(query, params, lambda cursor: cursor.rowcount)
        return rowcount

    def fetch(self, query: Any, params: Any = None) -> list[dict[str, Any]]:
        return self._run(query, params, lambda cursor: cursor.fetchall(), dict_row)

    def fetchone(self, query: Any, params: Any = None) -> dict[str, Any] | None:
        row: dict[str, Any] | None = self._run(query, params, lambda cursor: cursor.fetchone(), dict_row)
        return row

    def fetchval(self, query: Any, params: Any = None) -> Any:
        row = self._run(query, params, lambda cursor: cursor.fetchone())
        return row[0] if row else None

    def _run(self, query: Any, params: Any, result: Callable[[Any], T], row_factory: Any = None) -> T:
        """In ``database`` isolation a helper called outside a transaction commits, like autocommit: the
        app's own connections see its rows, and no transaction is left holding locks. On a borrowed connection
        (:attr:`TestInternals.borrowed`) it runs in whatever transaction that connection is in."""
        if self._test.borrowed is not None:
            with dict_cursor(self._test.borrowed(), row_factory is not None) as cursor:
                cursor.execute(query, params)
                return result(cursor)
        conn = self.connection
        own_transaction = self.isolation == "database" and conn.info.transaction_status == pq.TransactionStatus.IDLE
        try:
            with conn.cursor(row_factory=row_factory) if row_factory else conn.cursor() as cursor:
                cursor.execute(query, params)
                value = result(cursor)
        except BaseException:
            if own_transaction and not conn.closed:
                conn.rollback()
            raise
        if own_transaction:
            conn.commit()
        return value

    def as_role(self, role: str | None, settings: Mapping[str, Any] | None = None) -> AsRole:
        """A block during which the test's connections run as ``role`` (one the migrations created, such as
        ``app_rw`` or ``authenticated``) with ``settings`` (``{"app.tenant_id": "a", "request.jwt.claims":
        {...}}``: a dict or list is sent as JSON), as the app does in production: its grants and row-level
        security policies apply. ``with pg.as_role(...):``; ``async with`` in a test with async connections.

        It reaches the test's connections (``pg``, ``pg_conn``, every driver fixture and SQLAlchemy's), and
        those opened during the block; in ``database`` isolation also the app's own connections opened from
        :attr:`dsn` or :meth:`url` during the block. After it: the test's own role, the settings emptied. A
        permission denied raised in it says what the role lacked. ``role=None``: the test's own role (the owner of
        the tables) inside a block of another, or a test marked ``@pytest.mark.pg(role=...)``: to write rows of
        every tenant, for example."""
        return AsRole(self._test.roles, self.isolation, self.name, block_of(role, settings), self._own_connections)

    def _own_connections(self) -> list[psycopg.Connection[Any]]:
        """The test's psycopg connections as the tests' role (not pg_admin's)."""
        admin = self._test.admin_connections
        return [
            conn
            for conn in (self._connection, *self._opened)
            if conn is not None and not conn.closed and all(conn is not other for other in admin)
        ]

    # -- data factories ---------------------------------------------------------------------------------
    @property
    def rows(self) -> Rows:
        """This test's data factory: the schema's catalog, the test's seed and counters (see :meth:`insert`)."""
        if self._test.rows is None:
            if self._test.catalog_source is None:
                raise ConfigError("this database has no catalog for pg.insert (it was not opened by a Sandbox).", "")
            shared = self._test.catalog_source(self)
            own = Catalog(dict(shared.tables), dict(shared.types), shared.search_path)  # this test may add tables
            self._test.rows = Rows(own, self.seed, read_table=lambda name: read_catalog(self._query_all, name))
        return self._test.rows

    @property
    def seed(self) -> str:
        """What decides the values pg.insert makes up: the test's id (and ``pg_data_seed`` when set)."""
        seed = self._test.data_seed
        return f"{seed}:{self.test_id}" if seed else self.test_id

    def insert(self, table: str, /, *, using: Any = None, **values: Any) -> dict[str, Any]:
        """Insert one row into ``table`` with ``values`` and return it (every column). Each required column not
        given gets a valid value of its type (distinct in unique columns, the same on every run); each required
        foreign key not given gets a parent row made the same way. ``using``: another connection (psycopg2, a
        SQLAlchemy Session...); by default the test's (``pg.connection``)."""
        steps = self.rows.insert_steps(table, values)
        if using is not None:
            return run_steps(steps, executor(using))
        return run_steps(steps, lambda query, params: self._run(query, params, _one_row, dict_row))

    def insert_many(self, table: str, count: int, /, *, using: Any = None, **values: Any) -> list[dict[str, Any]]:
        """``count`` rows; a callable value is called with the row's index, a list or tuple gives one item per
        row, anything else is the same for every row."""
        return [self.insert(table, using=using, **Rows.row_values(values, index)) for index in range(count)]

    async def ainsert(self, table: str, /, *, using: Any = None, **values: Any) -> dict[str, Any]:
        """:meth:`insert` for async tests, on the test's async connection (``pg_asyncpg``, ``pg_aconn``, the
        one under ``pg_async_session``) or ``using`` (an asyncpg or async psycopg connection, an AsyncSession)."""
        drivers = self._test.drivers
        conn = using if using is not None else drivers.get("asyncpg") or drivers.get("psycopg")
        if conn is None:
            raise ConfigError(
                "await pg.ainsert() needs the test's async connection, and this test has none open.",
                "use pg_asyncpg, pg_aconn or pg_async_session in the test, or pass using=<an async connection>.",
            )
        return await run_steps_async(self.rows.insert_steps(table, values), async_executor(conn))

    async def ainsert_many(
        self, table: str, count: int, /, *, using: Any = None, **values: Any
    ) -> list[dict[str, Any]]:
        return [await self.ainsert(table, using=using, **Rows.row_values(values, index)) for index in range(count)]

    def _query_all(self, query: str, params: list[Any]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self._run(query, params, lambda cursor: cursor.fetchall())
        return rows

    # -- for other client libraries -------------------------------------------------------------------
    @property
    def params(self) -> dict[str, Any]:
        """Connection parameters of the tests' role (libpq keywords: host, port, user, dbname, passfile...; in
        schema isolation, ``options`` setting the search_path to the session's schema)."""
        return {**self.server.login_params, "dbname": self.name, **self.server.path_options(self.name)}

    def connect_admin(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """A new connection to this database as the admin (superuser on a local server), outside the test's
        transaction: what it does is committed. Closed after the test if the test did not close it."""
        kwargs.setdefault("application_name", app_name(self.test_id, ADMIN_SUFFIX))
        kwargs.setdefault("autocommit", True)
        if self._test.server_objects is None:  # the admin may create databases and roles: watch for them
            self._test.server_objects = server_objects(self.server.admin)
        conn = self.server.connect(self.name, logged=True, **kwargs)
        self._test.admin_connections.append(conn)
        self._test.joined(conn.info.backend_pid)
        if "pg_admin" not in self._test.guests.committing:  # what it commits escapes a transaction-isolation test
            self._test.guests.committing.append("pg_admin")
        self._opened.append(conn)
        return conn

    @property
    def application_name(self) -> str:
        return app_name(self.test_id)

    def __repr__(self) -> str:
        return f"<Database {self.name} ({self.isolation}) for {self.test_id}>"


class SessionLogin(ConnectionForms):
    """The tests' role for what lives as long as the session (the ``pg_login`` fixture): session-scoped
    fixtures, worker processes, a framework that makes its own test database. :attr:`dsn`,
    :attr:`database_url`, :meth:`url` and :attr:`env` name :attr:`dbname`, a database of the session's own,
    cloned from the template (migrated and seeded) when first asked for and owned by the tests' role. It is not
    isolated: what is written there stays for the whole session, and the tests' own databases do not see it."""

    def __init__(self, server: Server, dbname: str, options: str = "") -> None:
        """``options``: libpq's, on every connection (schema isolation: the search_path of pg_login's schema)."""
        self.server = server
        self.dbname = dbname
        self.options = options

    @property
    def params(self) -> dict[str, Any]:
        """Connection parameters of the tests' role (libpq keywords: host, port, user, dbname, passfile...)."""
        return {
            **self.server.login_params,
            "dbname": self.dbname,
            **({"options": self.options} if self.options else {}),
        }

    def reveal_password(self) -> Secret | None:
        return self.server.login_password()

    @property
    def user(self) -> str:
        return str(self.params["user"])

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        """A new psycopg connection to :attr:`dbname` as the tests' role; the caller closes it."""
        return psycopg.connect(self.dsn, **kwargs)

    def __repr__(self) -> str:
        return f"<SessionLogin {self.user} on {self.dbname}>"
