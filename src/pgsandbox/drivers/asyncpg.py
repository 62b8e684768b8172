"""``pg_asyncpg``: an asyncpg connection inside the test's isolation (extra ``[asyncpg]``).

In ``transaction`` isolation the test's transaction is asyncpg's own outermost ``transaction()``, so the
``async with conn.transaction():`` blocks of the code under test become savepoints, and their commits stay
inside the test. SQLAlchemy's asyncpg dialect starts its transactions the same way, which is how the async
SQLAlchemy fixtures share this connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import TYPE_CHECKING, Any

from pgsandbox.drivers import closer, require

if TYPE_CHECKING:
    from pgsandbox.sandbox import Database

require("asyncpg", "asyncpg", "pg_asyncpg")  # first: a missing library is named with its extra

import asyncpg  # noqa: E402

from pgsandbox.isolation.connection import SAVEPOINT  # noqa: E402
from pgsandbox.isolation.transaction import GUEST_ROLLBACK  # noqa: E402

LABEL = "asyncpg"
ESCAPED = (asyncpg.exceptions.InvalidSavepointSpecificationError, asyncpg.exceptions.NoActiveSQLTransactionError)


class SandboxAsyncpgConnection(asyncpg.Connection):
    """``close()`` waits for the end of the test: the test's transaction must outlive the code under test."""

    _pgsandbox_active = False
    _pgsandbox_transaction: Any = None

    async def close(self, *, timeout: float | None = None) -> None:
        if self._pgsandbox_active:
            return
        await super().close(timeout=timeout)


def _ours(conn: Any) -> bool:
    # not isinstance(): asyncpg's metaclass says every asyncpg connection is an instance of any subclass
    return SandboxAsyncpgConnection in type(conn).__mro__


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
    return kwargs


def read_password(db: Database) -> str | None:
    secret = db.reveal_password()
    return None if secret is None else str.__str__(secret)


async def connect(db: Database) -> Any:
    """In ``transaction`` isolation, the connection a previous test in this event loop left parked, if any."""
    transaction = db.isolation == "transaction"
    conn: Any = db.unpark(LABEL, asyncio.get_running_loop()) if transaction else None
    if conn is None or conn.is_closed():
        kind = SandboxAsyncpgConnection if transaction else asyncpg.Connection
        conn = await asyncpg.connect(**connect_kwargs(db), connection_class=kind)
        db.joined(conn.get_server_pid())
    if _ours(conn):
        conn.__dict__.pop("_pgsandbox_adapter_transactions", None)  # what SQLAlchemy's checkouts put aside
        outer = conn.transaction()
        await outer.start()
        await conn.execute(db.guest_begin)
        conn._pgsandbox_transaction = outer
        conn._pgsandbox_active = True
    return conn


async def close(db: Database, conn: Any, park: bool = False) -> None:
    """End the connection's part of the test: roll back (or commit, to keep the database); then close it, or
    ``park`` it for the next test in this event loop. A connection that cannot be closed cleanly (a
    cancelled query) is terminated."""
    try:
        if _ours(conn) and not conn.is_closed():
            conn._pgsandbox_active = False
            reusable = False
            if db.keep:
                await conn.execute("COMMIT")
            elif park:
                try:
                    await conn.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
                    reusable = True
                except ESCAPED:
                    db.guest_escaped(LABEL)
                # asyncpg's own rollback of its outermost transaction: it learns that it is over
                await conn._pgsandbox_transaction.rollback()
            else:
                try:
                    await conn.execute(GUEST_ROLLBACK)
                except ESCAPED:
                    db.guest_escaped(LABEL)
            loop = asyncio.get_running_loop()
            if reusable and db.park(LABEL, conn, conn.get_server_pid(), closer(loop, _close, _abort, conn), loop):
                return
            # nothing left to say to the server: do not wait for its goodbye (about 1 ms)
            conn.terminate()
            return
        await _close(conn)
    except BaseException as error:  # cancelled teardowns too: the connection must not outlive the test
        _abort(conn)
        if not isinstance(error, (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)):
            raise


async def _close(conn: Any) -> None:
    await asyncpg.Connection.close(conn, timeout=5)


def _abort(conn: Any) -> bool:
    """Drop the connection without its event loop; the server side is then ended by pgsandbox."""
    with contextlib.suppress(Exception):
        conn.terminate()
    return False
