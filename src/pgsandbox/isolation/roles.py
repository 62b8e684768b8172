"""Running a test's connections as one of the app's own roles, with its settings (``pg.as_role(...)``, the
marker's ``role=``): what production's least privilege and row-level security see, inside the test's isolation.

- ``transaction`` isolation: every connection in the test's transaction (the test's own, each driver's guest)
  runs ``SET LOCAL ROLE`` and ``set_config(..., true)``; a guest that joins during the block runs them after its
  ``BEGIN``. A setting made after a savepoint is undone by a rollback to it, so the test's ``rollback()`` (which
  rolls back to the test's savepoint) runs them again (:attr:`ConnectionState.role_sql`).
- ``database`` isolation: the connections pgsandbox knows of run ``SET ROLE`` and ``set_config(..., false)``, and
  the tests' login gets the role and settings as its defaults in the test's database (``ALTER ROLE ... IN
  DATABASE``, by the admin: :class:`RoleService`), so that the app's own connections, opened from ``pg.dsn`` or
  ``pg.url()`` during the block, start as that role too.

After the block: the role the test had before (an outer block's, or its own login), the block's settings
emptied.
"""

from __future__ import annotations

import contextlib
import json
import warnings
import weakref
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

import psycopg
from psycopg import pq

from pgsandbox.errors import ConfigError, PgSandboxWarning, sqlstate
from pgsandbox.isolation.base import Mode
from pgsandbox.isolation.guests import is_active, literal, run_sync, state_of
from pgsandbox.server.tags import INTERNAL

IN_FAILED_TRANSACTION = "25P02"  # the connection's transaction failed: only a rollback is taken


@dataclass(frozen=True)
class RoleBlock:
    """A role to run as, and the settings to run with (text, as ``set_config`` takes them)."""

    role: str | None  # None: the tests' own login (the owner of the tables), inside a block of another role
    settings: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        shown = ", ".join(f"{name} = {value!r}" for name, value in self.settings)
        who = f"role {self.role}" if self.role is not None else "the tests' own role"
        return who + (f" (settings: {shown})" if shown else "")


def setting_text(value: Any) -> str:
    """A setting's value as text: a string as it is, anything else as JSON (what PostgREST and Supabase put in
    ``request.jwt.claims``), None as the empty string."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except TypeError as error:
        raise ConfigError(
            f"pg.as_role: a setting's value {value!r} is not text and cannot be written as JSON ({error}).",
            "pass a string, or a dict, list, number or bool (sent as JSON).",
        ) from None


def block_of(role: Any, settings: Mapping[str, Any] | None = None) -> RoleBlock:
    """Check what the user gave: a role name (None: the tests' own), and settings named by strings."""
    if role is not None and (not isinstance(role, str) or not role.strip()):
        raise ConfigError(
            f"pg.as_role: the role must be a role's name, got {role!r}.",
            "name a role the migrations created, such as pg.as_role('app_rw').",
        )
    if settings is not None and not isinstance(settings, Mapping):
        raise ConfigError(
            f"pg.as_role: settings must be a dict of setting names to values, got {settings!r}.",
            "pass settings={'app.tenant_id': 'a', 'request.jwt.claims': {...}}.",
        )
    pairs = []
    for name, value in (settings or {}).items():
        if not isinstance(name, str) or not name:
            raise ConfigError(
                f"pg.as_role: a setting's name must be a string, got {name!r}.",
                "name settings as PostgreSQL does, such as 'app.tenant_id' or 'request.jwt.claims'.",
            )
        pairs.append((name, setting_text(value)))
    return RoleBlock(role, tuple(pairs))


def role_sql(block: RoleBlock | None, local: bool, clear: Iterable[str] = (), check: bool = False) -> str:
    """What makes a connection run as ``block`` (None: as the login it connected as), with the settings in
    ``clear`` emptied; ``local``: for the rest of the transaction only (the test's transaction). One ``SELECT``
    (``set_config('role', ...)`` is ``SET ROLE``): one round trip, on every driver's protocol; with ``check``, its
    first column is the role the connection ran as until then."""
    is_local = "true" if local else "false"
    values = {"role": block.role if block is not None and block.role is not None else "none"}
    values.update(dict.fromkeys(clear, ""))
    values.update(block.settings if block else ())
    calls = [f"set_config({literal(name)}, {literal(value)}, {is_local})" for name, value in values.items()]
    return INTERNAL + "SELECT " + ", ".join(["current_user", *calls] if check else calls)


# A client library's way of running a statement on one of its connections (``fetch``: return the first
# column of its first row); a synchronous library's never waits (run with run_sync).
Run = Callable[[Any, str, bool], Coroutine[Any, Any, Any]]


async def run_psycopg(conn: psycopg.Connection[Any], statement: str, fetch: bool) -> Any:
    """psycopg 3 (sync): outside a transaction (``database`` isolation), the statement is run in autocommit, one
    round trip instead of three (BEGIN, it, COMMIT); a failed transaction of the app's is rolled back first
    (nothing else can be done with it, and a SET inside it would go with it)."""
    status = conn.info.transaction_status
    if status == pq.TransactionStatus.INERROR and not state_of(conn).active:
        conn.rollback()
        status = pq.TransactionStatus.IDLE
    if status != pq.TransactionStatus.IDLE or conn.autocommit:
        cursor = conn.execute(statement)
        return cursor.fetchone()[0] if fetch else None  # type: ignore[index]
    conn.autocommit = True
    try:
        cursor = conn.execute(statement)
        return cursor.fetchone()[0] if fetch else None  # type: ignore[index]
    finally:
        conn.autocommit = False


def _closed(conn: Any) -> bool:
    return bool(conn.closed)


@dataclass
class Tracked:
    """A connection of the test that pgsandbox handed out (weakly held: the test may drop it)."""

    ref: weakref.ref[Any]
    run: Run
    asynchronous: bool
    in_transaction: bool  # inside the test's transaction: SET LOCAL, run again after its rollback()
    is_closed: Callable[[Any], bool]
    label: str

    def open(self) -> Any | None:
        conn = self.ref()
        if conn is None:
            return None
        try:
            return None if self.is_closed(conn) else conn
        except Exception:  # a connection broken beyond asking
            return None


class RoleService(Protocol):
    """What only the admin may do for a block (the sandbox's :class:`~pgsandbox.sandbox.app_roles.AppRoles`)."""

    def admit(self, role: str, isolation: Mode) -> None:
        """Check that ``role`` may be run as, and make the tests' login a member of it."""

    def set_defaults(self, dbname: str, block: RoleBlock | None) -> None:
        """``database`` isolation: the login's defaults in ``dbname``, for the connections opened from now on."""

    def explain(self, error: BaseException, dbname: str, block: RoleBlock) -> str | None:
        """What a permission denied (42501) raised as ``block`` lacked: the object and the grant or policy."""


@dataclass
class TestRoles:
    """A test's side of it (``pg._test.roles``): the blocks entered (innermost last) and the connections the
    test's drivers opened, which a block must reach."""

    __test__ = False  # not a test class, whatever pytest makes of the name

    stack: list[RoleBlock] = field(default_factory=list)
    tracked: list[Tracked] = field(default_factory=list)
    service: RoleService | None = None
    explained: dict[int, str] = field(default_factory=dict)  # id(error) -> its explanation, said once

    @property
    def current(self) -> RoleBlock | None:
        return self.stack[-1] if self.stack else None

    def track(
        self,
        conn: Any,
        run: Run,
        *,
        asynchronous: bool,
        in_transaction: bool,
        label: str,
        is_closed: Callable[[Any], bool] = _closed,
    ) -> None:
        self.tracked.append(Tracked(weakref.ref(conn), run, asynchronous, in_transaction, is_closed, label))

    def joining(self, conn: Any) -> str:
        """For a guest that begins the test's transaction during a block: the statements to run after its
        ``BEGIN`` (empty outside any block); its ``rollback()`` will run them again."""
        block = self.current
        if block is None:
            return ""
        statement = role_sql(block, local=True)
        state_of(conn).role_sql = statement
        return statement

    def forget(self) -> None:
        """The test is over: its connections' rollbacks run nothing more."""
        for tracked in self.tracked:
            conn = tracked.ref()
            if conn is not None:
                state_of(conn).role_sql = ""
        self.tracked.clear()
        self.stack.clear()
        self.explained.clear()

    def explain(self, error: BaseException | None, dbname: str, block: RoleBlock | None = None) -> str | None:
        """The explanation of a permission denied met as ``block`` (default: the current one), once per error."""
        if error is not None and id(error) in self.explained:
            return self.explained[id(error)]
        block = block or self.current
        if error is None or block is None or block.role is None or self.service is None:
            return None
        if id(error) not in self.explained:
            try:
                text = self.service.explain(error, dbname, block)
            except Exception:  # explaining must never hide the test's own error
                text = None
            if text is None:
                return None
            self.explained[id(error)] = text
        return self.explained[id(error)]


class AsRole:
    """``with pg.as_role("app_rw", settings={...}):`` (or ``async with``, when the test has async connections
    open: asyncpg, async psycopg, async SQLAlchemy). See the module's docstring."""

    def __init__(
        self,
        roles: TestRoles,
        isolation: Mode,
        dbname: str,
        block: RoleBlock,
        own: Callable[[], list[psycopg.Connection[Any]]],
    ) -> None:
        self.roles = roles
        self.isolation = isolation
        self.dbname = dbname
        self.block = block
        self._own = own  # the test's own psycopg connections (pg.connection, pg.connect()'s)
        self._entered = False

    # -- sync ---------------------------------------------------------------------------------------------
    def __enter__(self) -> AsRole:
        self._refuse_async("with")
        self._admit()
        try:
            self._set_defaults()
            for tracked, conn, statement in self._steps(self.block):
                run_sync(tracked.run(conn, statement, False))
        except BaseException:
            self._leave_quietly()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._note(error)
        lost = []
        for tracked, conn, statement, check in self._leave_steps():
            if tracked.asynchronous:  # the sync form never ran on it (it was refused at entry, or is closing)
                continue
            try:
                user = run_sync(tracked.run(conn, statement, check))
            except Exception as failed:
                # a connection whose transaction failed cannot take it; its rollback() will (role_sql). Said
                # only when nothing else is being raised
                if error is None and not self._in_error(conn) and sqlstate(failed) != IN_FAILED_TRANSACTION:
                    raise
                continue
            if check and user != self.block.role:
                lost.append(tracked.label)
        self._after_leave(lost)

    # -- async --------------------------------------------------------------------------------------------
    async def __aenter__(self) -> AsRole:
        self._admit()
        try:
            self._set_defaults()
            for tracked, conn, statement in self._steps(self.block):
                await tracked.run(conn, statement, False)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._note(error)
        lost = []
        for tracked, conn, statement, check in self._leave_steps():
            try:
                user = await tracked.run(conn, statement, check)
            except Exception as failed:
                if error is None and not self._in_error(conn) and sqlstate(failed) != IN_FAILED_TRANSACTION:
                    raise
                continue
            if check and user != self.block.role:
                lost.append(tracked.label)
        self._after_leave(lost)

    # -- the steps ----------------------------------------------------------------------------------------
    def _refuse_async(self, form: str) -> None:
        opened = [t.label for t in self.roles.tracked if t.asynchronous and t.open() is not None]
        if opened:
            raise ConfigError(
                f"pg.as_role({self.block.role!r}) is used as `{form}`, and this test has async connections open "
                f"({', '.join(sorted(set(opened)))}), which only `async with` can reach.",
                f"write `async with pg.as_role({self.block.role!r}, ...):` in this async test.",
            )

    def _admit(self) -> None:
        if self.roles.service is not None and self.block.role is not None:
            self.roles.service.admit(self.block.role, self.isolation)
        self.roles.stack.append(self.block)
        self._entered = True

    def _set_defaults(self) -> None:
        if self.isolation == "database" and self.roles.service is not None:
            self.roles.service.set_defaults(self.dbname, self.block)

    def _connections(self) -> list[tuple[Tracked, Any]]:
        own = [
            Tracked(weakref.ref(conn), run_psycopg, False, self.isolation == "transaction", _closed, "psycopg")
            for conn in dict.fromkeys(self._own())
        ]
        found = []
        seen: set[int] = set()
        for tracked in [*own, *self.roles.tracked]:
            conn = tracked.open()
            if conn is not None and id(conn) not in seen:
                seen.add(id(conn))
                found.append((tracked, conn))
        return found

    def _steps(self, block: RoleBlock | None, clear: Iterable[str] = ()) -> list[tuple[Tracked, Any, str]]:
        steps = []
        for tracked, conn in self._connections():
            if tracked.in_transaction and not is_active(conn):  # its part of the test is over (parked, rolled back)
                state_of(conn).role_sql = ""
                continue
            statement = role_sql(block, tracked.in_transaction, clear)
            if tracked.in_transaction:
                state_of(conn).role_sql = statement  # its rollback() runs it again
            steps.append((tracked, conn, statement))
        return steps

    def _leave_steps(self) -> list[tuple[Tracked, Any, str, bool]]:
        """Back to the outer block's role (or the login), the settings only this block set emptied; and for the
        connections in the test's transaction, a check that the block's role was still on."""
        if not self._entered:
            return []
        self._entered = False
        self.roles.stack.pop()
        outer = self.roles.current
        clear = [name for name, _ in self.block.settings if outer is None or name not in dict(outer.settings)]
        steps = []
        for tracked, conn, statement in self._steps(outer, clear):
            check = tracked.in_transaction and self.block.role is not None and not self._in_error(conn)
            checked = role_sql(outer, tracked.in_transaction, clear, check=True) if check else statement
            steps.append((tracked, conn, checked, check))
        if self.isolation == "database" and self.roles.service is not None:
            self.roles.service.set_defaults(self.dbname, outer)
        return steps

    @staticmethod
    def _in_error(conn: Any) -> bool:
        status = getattr(getattr(conn, "info", None), "transaction_status", None)
        return status is not None and int(status) == int(pq.TransactionStatus.INERROR)

    def _leave_quietly(self) -> None:
        with contextlib.suppress(Exception):
            self.__exit__(None, None, None)

    def _after_leave(self, lost: list[str]) -> None:
        if lost:
            warnings.warn(
                PgSandboxWarning(
                    f"pg.as_role({self.block.role!r}): at the end of the block, the {', '.join(sorted(set(lost)))} "
                    f"connection no longer ran as {self.block.role}: a rollback to a savepoint made before the "
                    "block (a SQLAlchemy session's, a `with conn.transaction()` begun outside it) undid the role, "
                    "and what ran after it ran as the tests' own role, which owns the tables (no RLS, every grant)."
                    " Enter the block before that session or transaction begins, or mark the test "
                    f"@pytest.mark.pg(role={self.block.role!r})."
                ),
                stacklevel=3,
            )

    def _note(self, error: BaseException | None) -> None:
        """A permission denied that leaves the block says what the role lacked (on the error itself: every
        driver's error, and what wraps it, shows it in the traceback)."""
        if error is None or not self._entered:
            return
        text = self.roles.explain(error, self.dbname, self.block)
        if text and hasattr(error, "add_note") and text not in getattr(error, "__notes__", ()):
            error.add_note(text)
