"""``pg_asyncpg``: an asyncpg connection inside the test's isolation (extra ``[asyncpg]``).

In ``transaction`` isolation the test's transaction is asyncpg's own outermost ``transaction()``, so the
``async with conn.transaction():`` blocks of the code under test become savepoints, and their commits stay
inside the test. SQLAlchemy's asyncpg dialect starts its transactions the same way, which is how the async
SQLAlchemy fixtures share this connection.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from pgsandbox.drivers import require

if TYPE_CHECKING:
    from pgsandbox.sandbox import Database

require("asyncpg", "asyncpg", "pg_asyncpg")  # first: a missing library is named with its extra

import asyncpg  # noqa: E402

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
        "password": params.get("password") or None,
        "database": db.name,
        "server_settings": {"application_name": db.application_name},
    }
    if params.get("sslmode"):
        kwargs["ssl"] = params["sslmode"]
    return kwargs


async def connect(db: Database) -> Any:
    transaction = db.isolation == "transaction"
    conn: Any = await asyncpg.connect(
        **connect_kwargs(db), connection_class=SandboxAsyncpgConnection if transaction else asyncpg.Connection
    )
    db.joined(conn.get_server_pid())
    if _ours(conn):
        outer = conn.transaction()
        await outer.start()
        await conn.execute(db.guest_begin)
        conn._pgsandbox_transaction = outer
        conn._pgsandbox_active = True
    return conn


async def close(db: Database, conn: Any) -> None:
    """End the connection's part of the test: roll back (or commit, to keep the database), then close.
    A connection that cannot be closed cleanly (a cancelled query) is terminated."""
    try:
        if _ours(conn) and not conn.is_closed():
            conn._pgsandbox_active = False
            if db.keep:
                await conn.execute("COMMIT")
            else:
                try:
                    await conn.execute(GUEST_ROLLBACK)
                except ESCAPED:
                    db.guest_escaped(LABEL)
            # nothing left to say to the server: do not wait for its goodbye (about 1 ms)
            conn.terminate()
            return
        await asyncpg.Connection.close(conn, timeout=5)
    except BaseException as error:  # cancelled teardowns too: the connection must not outlive the test
        with contextlib.suppress(Exception):
            conn.terminate()
        if not isinstance(error, (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)):
            raise
