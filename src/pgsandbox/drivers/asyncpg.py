"""``pg_asyncpg``: an asyncpg connection inside the test's isolation (extra ``[asyncpg]``).

In ``transaction`` isolation the test's transaction is asyncpg's own outermost ``transaction()``, so the
``async with conn.transaction():`` blocks of the code under test become savepoints, and their commits stay
inside the test. SQLAlchemy's asyncpg dialect starts its transactions the same way, which is how the async
SQLAlchemy fixtures share this connection.
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, Any

from pgsandbox.drivers import guests, require

if TYPE_CHECKING:
    from pgsandbox.sandbox import Database

require("asyncpg", "asyncpg", "pg_asyncpg")  # first: a missing library is named with its extra

import asyncpg  # noqa: E402

from pgsandbox.isolation.guests import GUEST_ROLLBACK, SAVEPOINT, is_active, state_of  # noqa: E402


class SandboxAsyncpgConnection(asyncpg.Connection):
    """``close()`` waits for the end of the test: the test's transaction must outlive the code under test."""

    async def close(self, *, timeout: float | None = None) -> None:
        if is_active(self):
            return
        await super().close(timeout=timeout)


def connect_kwargs(db: Database) -> dict[str, Any]:
    params = db.params
    kwargs: dict[str, Any] = {
        "host": params.get("host") or None,
        "port": int(params["port"]) if params.get("port") else None,
        "user": params.get("user"),
        # asyncpg would take PGPASSWORD, when set, before a passfile: the password is read from the run's
        # passfile when asyncpg asks for it. It then holds it in its connection parameters (a namedtuple in its
        # frames, which the report's redaction masks: its protocol takes nothing but an exact str)
        "password": functools.partial(read_password, db),
        "database": db.name,
        "server_settings": {"application_name": db.application_name},
    }
    if params.get("sslmode"):
        kwargs["ssl"] = params["sslmode"]
    if params.get("options"):  # the startup packet's "options" (schema isolation's search_path), as libpq sends it
        kwargs["server_settings"]["options"] = params["options"]
    return kwargs


def read_password(db: Database) -> str | None:
    secret = db.reveal_password()
    return None if secret is None else str.__str__(secret)


class Asyncpg(guests.Adapter[Any]):
    """asyncpg's part of the guest protocol. The test's transaction is asyncpg's own outermost one, so that
    asyncpg (and SQLAlchemy's adapter on it) knows that a transaction is open."""

    label = "asyncpg"
    asynchronous = True
    errors = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
    escaped = (asyncpg.exceptions.InvalidSavepointSpecificationError, asyncpg.exceptions.NoActiveSQLTransactionError)

    async def connect(self, db: Database, transaction: bool) -> Any:
        kind = SandboxAsyncpgConnection if transaction else asyncpg.Connection
        return await asyncpg.connect(**connect_kwargs(db), connection_class=kind)

    def ours(self, conn: Any) -> bool:
        # not isinstance(): asyncpg's metaclass says every asyncpg connection is an instance of any subclass
        return SandboxAsyncpgConnection in type(conn).__mro__

    def is_closed(self, conn: Any) -> bool:
        return bool(conn.is_closed())

    def pid(self, conn: Any) -> int:
        return int(conn.get_server_pid())

    async def begin(self, conn: Any, statement: str) -> None:
        outer = conn.transaction()
        await outer.start()
        await conn.execute(statement)
        state_of(conn).outer_transaction = outer

    async def commit(self, conn: Any) -> None:
        await conn.execute("COMMIT")

    async def run(self, conn: Any, statement: str, fetch: bool) -> Any:
        if fetch:
            return await conn.fetchval(statement)
        await conn.execute(statement)  # outside a transaction, asyncpg's statements are committed at once
        return None

    async def roll_back(self, conn: Any, reuse: bool) -> None:
        if not reuse:  # one round trip: the connection is dropped next
            await conn.execute(GUEST_ROLLBACK)
            return
        await conn.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
        await self._end_outer(conn)

    async def after_escape(self, conn: Any, reuse: bool) -> None:
        if reuse:
            await self._end_outer(conn)

    async def _end_outer(self, conn: Any) -> None:
        """asyncpg's own rollback of its outermost transaction: it learns that it is over."""
        state = state_of(conn)
        outer, state.outer_transaction = state.outer_transaction, None
        await outer.rollback()

    async def close(self, conn: Any, ended: bool) -> None:
        if ended:  # nothing left to say to the server: do not wait for its goodbye (about 1 ms)
            conn.terminate()
            return
        await asyncpg.Connection.close(conn, timeout=5)

    def abort(self, conn: Any) -> bool:
        """Drop the connection without its event loop; the server side is then ended by pgsandbox."""
        with contextlib.suppress(Exception):
            conn.terminate()
        return False


ADAPTER = Asyncpg()
LABEL = ADAPTER.label


async def connect(db: Database) -> Any:
    """In ``transaction`` isolation, the connection a previous test in this event loop left parked, if any."""
    return await guests.connect(ADAPTER, db)


async def close(db: Database, conn: Any, park: bool = False) -> None:
    """End the connection's part of the test: roll back (or commit, to keep the database); then close it, or
    ``park`` it for the next test in this event loop. A connection that cannot be closed cleanly (a
    cancelled query) is terminated."""
    await guests.close(ADAPTER, db, conn, park)
