"""Guests: the connections of client libraries (psycopg2, asyncpg, async psycopg, SQLAlchemy's engines) that
join a test besides its own connection, and what pgsandbox keeps about them.

In ``transaction`` isolation each guest works in a transaction of its own on the session database that runs
:func:`guest_begin` first: its ``commit()`` moves the savepoint that statement makes, and the end of the test
rolls back to it (:data:`GUEST_ROLLBACK`), which fails when a raw ``COMMIT`` replaced the transaction: that
failure is how an escape is noticed. The protocol itself is written once, in :mod:`pgsandbox.drivers.guests`.

What pgsandbox notes about another library's connection lives in one table, weakly keyed by the connection
(:func:`state_of`), never in attributes set on that library's objects.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pgsandbox.server.tags import INTERNAL

T = TypeVar("T")

SAVEPOINT = "pgsandbox_test"  # the test's savepoint, on its own connection and on every guest's


def app_name(test_id: str, suffix: str = "") -> str:
    """``application_name`` is limited to 63 bytes of printable ASCII (the server rewrites anything else):
    keep the end of a long test id, which names the test, and all of ``suffix``, so that the statement log
    can tell the test by it."""
    name = "".join(c if " " <= c <= "~" else "?" for c in f"pgsandbox {test_id}{suffix}")
    return name if len(name) <= 63 else "pgsandbox ..." + name[-(63 - len("pgsandbox ...")) :]


def literal(text: str) -> str:
    """A string literal (standard_conforming_strings is on in every supported version)."""
    return "'" + text.replace("'", "''") + "'"


def guest_begin(test_id: str) -> str:
    """What a driver's connection runs inside its new transaction: the savepoint its commits move."""
    return f"{INTERNAL}SAVEPOINT {SAVEPOINT}; SET application_name = {literal(app_name(test_id))}"


GUEST_ROLLBACK = f"{INTERNAL}ROLLBACK TO SAVEPOINT {SAVEPOINT}; ROLLBACK"  # fails if a COMMIT replaced it


@dataclass
class Guests:
    """Connections that driver fixtures (psycopg2, asyncpg, async psycopg...) opened on the session database
    for one test, each in a transaction of its own that they rolled back: not "others" to warn about."""

    pids: set[int] = field(default_factory=set)
    connects: int = 0  # each one moves the database's session counter
    escaped: list[str] = field(default_factory=list)  # those whose transaction a COMMIT replaced
    committing: list[str] = field(default_factory=list)  # those outside any transaction of the test (pg_admin)

    def joined(self, pid: int, connected: bool = True) -> None:
        self.pids.add(pid)
        self.connects += connected


@dataclass
class Parked:
    """A driver's connection kept on the session database between tests (a connect costs ~4 ms). An async
    one belongs to its event loop (``loop``) and can serve only tests that run in that loop."""

    conn: Any
    pid: int
    close: Callable[[], bool]  # False: it could not be closed from here (its loop is gone or busy)
    loop: Any = None


@dataclass
class ConnectionState:
    """What pgsandbox keeps about one object of a client library: a connection it handed to a test (or, for
    :attr:`current`, an async engine it made). Nothing here may refer back to that object, or the table would
    keep it alive: what does (asyncpg's transactions) is let go when the test ends."""

    # inside a test: commit() and rollback() move the test's savepoint, close() waits for the end of the test,
    # autocommit is refused (our subclasses of the libraries' connection classes read it)
    active: bool = False
    # while a client library sets itself up on the connection: its rollback would undo the test's work so far
    quiet_rollback: bool = False
    # the savepoints of the client libraries that took the shared connection (SQLAlchemy's pool checkouts),
    # innermost last; None for a checkout that has none (isolation.connection)
    levels: list[str | None] = field(default_factory=list)
    outer_transaction: Any = None  # asyncpg: the test's transaction, asyncpg's own outermost one
    # SQLAlchemy's asyncpg adapter: the transaction each checkout put aside, with whether it had a level
    adapter_transactions: list[tuple[bool, dict[str, Any]]] = field(default_factory=list)
    fixture_checkout: bool = False  # the session fixture's own checkout (it lasts the test: no savepoint)
    current: list[Any] | None = None  # an async engine's: the test's connection its pool hands out
    used: bool = False  # a cursor was made on it (the session connection: since the last test's end)
    # inside a pg.as_role block (transaction isolation): what its SET LOCAL ROLE was; a rollback to the test's
    # savepoint undoes it, so commit()/rollback() that roll back run it again (isolation/roles.py)
    role_sql: str = ""


_STATES: weakref.WeakKeyDictionary[Any, ConnectionState] = weakref.WeakKeyDictionary()


def state_of(conn: object) -> ConnectionState:
    """pgsandbox's state for ``conn`` (made on first use); it goes when ``conn`` goes."""
    state = _STATES.get(conn)
    if state is None:
        state = _STATES[conn] = ConnectionState()
    return state


def is_active(conn: object) -> bool:
    """Whether ``conn`` is inside a test now (see :attr:`ConnectionState.active`)."""
    state = _STATES.get(conn)
    return state is not None and state.active


def run_sync(step: Coroutine[Any, Any, T]) -> T:
    """Run a step of a synchronous library's adapter, whose ``async`` methods never wait, to its end."""
    try:
        step.send(None)
    except StopIteration as done:
        value: T = done.value
        return value
    step.close()
    raise RuntimeError("a synchronous adapter's step waited for something")


def after_rollback(conn: object, statement: str) -> str:
    """``statement`` (one that rolls back to a savepoint) followed by what sets the role of the pg.as_role block
    the connection is in, which that rollback undid."""
    state = _STATES.get(conn)
    return f"{statement}; {state.role_sql}" if state is not None and state.role_sql else statement


def let_go(conn: object) -> None:
    """The test is over for ``conn``: drop what in its state refers back to it (asyncpg's transactions)."""
    state = _STATES.get(conn)
    if state is not None:
        state.outer_transaction = None
        state.adapter_transactions.clear()
        state.role_sql = ""
