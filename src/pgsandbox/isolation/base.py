"""The one interface both isolation modes implement (transaction.py, database.py): begin a test, end it and
say what it left (findings.py), close."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Literal, NamedTuple, Protocol

import psycopg

from pgsandbox.isolation.findings import Finding

Mode = Literal["transaction", "database"]  # what the user names an isolation (pg_isolation, the pg marker)


class Begun(NamedTuple):
    """What a test gets from its isolation: the database it works in, and a connection already open to it
    (None when one could not be opened ahead: the test opens its own)."""

    dbname: str
    conn: psycopg.Connection[Any] | None


class GuestConnections(Protocol):
    """What an isolation reads of the connections a test's drivers opened (the pg handle's ``guests``)."""

    pids: set[int]  # their backends: the test's, not leaks
    connects: int  # how many connected (each one moves the database's session counter)
    escaped: list[str]  # the drivers whose transaction a COMMIT replaced
    committing: list[str]  # those outside any transaction of the test (pg_admin)


class Isolation(Protocol):
    """A way of giving each test a database that starts as the template and of undoing what the test did."""

    mode: Mode
    first_clone: str  # what its first begin clones, for the progress line when that is slow
    keeps_in_place: bool  # a kept database keeps the test's name (a clone) rather than being renamed

    def begin(self, test_id: str) -> Begun:
        """A database for ``test_id``, as the template left it."""

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
        """Undo (or, with ``keep_as``, keep) what the test did in ``dbname``; return what it left that the
        isolation does not undo and pgsandbox did. Raises :class:`IsolationError` (after restoring the database)
        when writes escaped. ``guests``: the test's driver connections; ``ours``: other connections of the test
        that pgsandbox closed (not leaks); ``next_test_id``: the next test, when it is known to use this mode (its
        transaction can be opened ahead)."""

    def close(self) -> None:
        """Drop what this isolation created (at the end of the session)."""

    def close_quietly(self) -> None:
        """The server is gone: close what runs here (threads, connections) and ask it nothing."""
