"""The guest protocol, written once: how a client library's connection joins a test and leaves it.

Joining, in ``transaction`` isolation: take the connection of that library a previous test parked on the
session database (in the same event loop, for an async one), else connect (and say that this backend is the
test's, not a leak); then begin a transaction that runs :func:`~pgsandbox.isolation.guests.guest_begin`, and
mark the connection active (its ``commit()`` moves the savepoint, its ``close()`` waits for the end of the
test). In ``database`` isolation: a plain connection to the test's database.

Leaving: commit (a kept database) or roll back to the savepoint and end the transaction; a lost savepoint
means a raw ``COMMIT`` replaced the transaction, which the test's teardown then reports. A connection that
rolled back cleanly is parked for the next test; any other is closed, and one that cannot be closed cleanly is
dropped.

What differs from one library to the next is an :class:`Adapter`: how to connect, the backend's pid, how to run
those steps, how to close, which errors mean "escaped". A synchronous library's adapter has ``async`` methods
that never wait, run by :func:`run_sync` without an event loop.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pgsandbox.isolation.guests import guest_begin, let_go, run_sync, state_of

if TYPE_CHECKING:
    from pgsandbox.sandbox import Database

C = TypeVar("C")  # a client library's connection

__all__ = ["Adapter", "close", "connect", "run_sync"]


class Adapter(ABC, Generic[C]):
    """One client library's part of the guest protocol."""

    label: ClassVar[str]  # names the library in findings ("the transaction of its asyncpg connection...")
    asynchronous: ClassVar[bool]  # its connections belong to an event loop
    errors: ClassVar[tuple[type[BaseException], ...]]  # the library's own: the connection is broken, close it
    # rolling back to the test's savepoint failed with one of these: a COMMIT had replaced the transaction
    escaped: ClassVar[tuple[type[BaseException], ...]]

    @abstractmethod
    async def connect(self, db: Database, transaction: bool) -> C:
        """A new connection to ``db``; in ``transaction`` isolation, of the class that keeps a test's work in."""

    @abstractmethod
    def ours(self, conn: C) -> bool:
        """Whether ``conn`` was made for ``transaction`` isolation (see :meth:`connect`)."""

    @abstractmethod
    def is_closed(self, conn: C) -> bool: ...

    @abstractmethod
    def pid(self, conn: C) -> int:
        """The backend's process id."""

    @abstractmethod
    async def begin(self, conn: C, statement: str) -> None:
        """Begin the test's transaction on ``conn`` (the library's own way) and run ``statement`` in it."""

    @abstractmethod
    async def commit(self, conn: C) -> None:
        """Commit the test's transaction: the database is kept."""

    @abstractmethod
    async def run(self, conn: C, statement: str, fetch: bool) -> Any:
        """Run ``statement`` (pg.as_role's SET ROLE) on ``conn`` as it is; ``fetch``: return the first column of
        its first row. Outside a transaction (``database`` isolation) it is committed at once."""

    @abstractmethod
    async def roll_back(self, conn: C, reuse: bool) -> None:
        """Roll back to the test's savepoint (raises one of :attr:`escaped` when it is gone), then end the
        transaction; ``reuse``: the connection will serve another test, and its library must know that the
        transaction is over."""

    @abstractmethod
    async def after_escape(self, conn: C, reuse: bool) -> None:
        """End what is left of the transaction after :meth:`roll_back` found the savepoint gone."""

    def reset(self, conn: C) -> bool:
        """Undo what the test set on the connection object (the server's SETs were rolled back) before the
        next test; False when the connection cannot serve it."""
        return True

    @abstractmethod
    async def close(self, conn: C, ended: bool) -> None:
        """Close ``conn``, its errors suppressed; ``ended``: the test's transaction on it is over and nothing is
        left to say to the server."""

    @abstractmethod
    def abort(self, conn: C) -> bool:
        """Drop ``conn`` without its event loop; returns whether the server was told goodbye (if not, pgsandbox
        ends the backend)."""


async def connect(adapter: Adapter[C], db: Database) -> C:
    """A connection of ``adapter``'s library inside the test's isolation (see the module's docstring)."""
    test = db._test
    transaction = db.isolation == "transaction"
    loop = asyncio.get_running_loop() if adapter.asynchronous else None
    conn: C | None = test.unpark(adapter.label, loop) if transaction else None
    if conn is None or adapter.is_closed(conn):
        conn = await adapter.connect(db, transaction)
        test.joined(adapter.pid(conn))
    ours = adapter.ours(conn)
    if ours:
        state = state_of(conn)
        state.levels.clear()
        state.adapter_transactions.clear()  # what SQLAlchemy's checkouts put aside in the previous test
        as_role = test.roles.joining(conn)  # inside a pg.as_role block: its role, in the test's transaction
        await adapter.begin(conn, guest_begin(db.test_id) + (f"; {as_role}" if as_role else ""))
        state.active = True
    test.roles.track(
        conn,
        adapter.run,
        asynchronous=adapter.asynchronous,
        in_transaction=ours,
        label=adapter.label,
        is_closed=adapter.is_closed,
    )
    return conn


async def close(adapter: Adapter[C], db: Database, conn: C, park: bool) -> None:
    """End ``conn``'s part of the test; then ``park`` it for the next test (in this event loop, for an async
    library), or close it. Whatever happens, the connection does not outlive the test unparked."""
    try:
        if not adapter.ours(conn) or adapter.is_closed(conn):
            await adapter.close(conn, ended=False)
            return
        reusable = await _end_transaction(adapter, db, conn, park)
        loop = asyncio.get_running_loop() if adapter.asynchronous else None
        if reusable and db._test.park(adapter.label, conn, adapter.pid(conn), _closer(adapter, conn, loop), loop):
            return
        await adapter.close(conn, ended=True)
    except BaseException as error:  # cancelled teardowns too
        adapter.abort(conn)
        if not isinstance(error, adapter.errors):
            raise
    finally:
        let_go(conn)


async def _end_transaction(adapter: Adapter[C], db: Database, conn: C, park: bool) -> bool:
    """Commit (to keep the database) or roll back the test's transaction on ``conn``, noting an escape.
    Returns whether ``conn`` can serve the next test."""
    state = state_of(conn)
    state.active = False
    try:
        if db.keep:
            await adapter.commit(conn)
            return False
        try:
            await adapter.roll_back(conn, park)
        except adapter.escaped:
            db._test.escaped(adapter.label)
            await adapter.after_escape(conn, park)
            return False
        return park and adapter.reset(conn)
    except adapter.errors:
        return False  # a broken connection: closing it ends its transaction on the server


def _closer(adapter: Adapter[C], conn: C, loop: asyncio.AbstractEventLoop | None) -> Callable[[], bool]:
    """How to close a parked connection later, from the sandbox's sync code."""

    def close() -> bool:
        """In the connection's own loop when that loop is idle, else with :meth:`Adapter.abort`."""
        if loop is None:
            run_sync(adapter.close(conn, ended=False))
            return True
        try:
            asyncio.get_running_loop()
            inside_a_loop = True
        except RuntimeError:
            inside_a_loop = False
        if not inside_a_loop and not loop.is_closed() and not loop.is_running():
            loop.run_until_complete(adapter.close(conn, ended=False))
            return True
        return adapter.abort(conn)

    return close
