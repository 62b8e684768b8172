"""Helpers on an admin connection: who is connected to a database, ending those connections, advisory lock keys.

A leaf of the server layer: the server, the roles, the reaper, the templates and the isolation modes use it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import psycopg


@dataclass(frozen=True)
class Session:
    """A client connection to a database, as pg_stat_activity shows it."""

    pid: int
    application_name: str
    state: str
    query: str
    transaction_seconds: float | None  # how long its transaction has been open; None: not in one

    @property
    def idle_in_transaction(self) -> bool:
        return self.state.startswith("idle in transaction")

    def __str__(self) -> str:
        opened = "" if self.transaction_seconds is None else f" for {self.transaction_seconds:.1f} s"
        return (
            f"pid {self.pid}, application_name {self.application_name!r}, {self.state}{opened}, its last statement: "
            f"{self.query!r}"
        )


def connections_to(
    conn: psycopg.Connection[Any], dbname: str, exclude: Collection[int] = (), wait: float = 0.0
) -> list[Session]:
    """Client connections to ``dbname`` other than ``conn``'s and ``exclude``.

    A connection its client closed a moment ago may still be exiting: with ``wait``, poll up to that many
    seconds for such connections to go before reporting what is left.
    """
    deadline = time.monotonic() + wait
    delay = 0.0005  # a backend whose client closed exits in about a millisecond: a coarser first poll waited longer
    while True:
        rows = conn.execute(
            "SELECT pid, application_name, state, left(query, 200), "
            "extract(epoch FROM now() - xact_start)::float8 FROM pg_stat_activity "
            "WHERE datname = %s AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND NOT (pid = ANY(%s))",
            [dbname, list(exclude)],
        ).fetchall()
        if not rows or time.monotonic() >= deadline:
            return [Session(int(r[0]), str(r[1] or ""), str(r[2] or ""), str(r[3] or ""), r[4]) for r in rows]
        time.sleep(delay)
        delay = min(delay * 2, 0.004)


def terminate_connections(
    conn: psycopg.Connection[Any], dbname: str, exclude: Collection[int] = (), wait: float = 10.0
) -> None:
    """Terminate every connection to ``dbname`` but ``conn``'s and ``exclude``, and wait until they are gone
    (``DROP DATABASE`` and ``CREATE DATABASE ... TEMPLATE`` otherwise wait or fail on exiting backends)."""
    deadline = time.monotonic() + wait
    delay = 0.001
    while True:
        row = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid() AND NOT (pid = ANY(%s))",
            [dbname, list(exclude)],
        ).fetchone()
        if not row or not row[0] or time.monotonic() >= deadline:
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def lock_id(name: str, purpose: str) -> int:
    """A bigint advisory lock key for (name, purpose): a template's build or use, a run's lifetime."""
    return int.from_bytes(hashlib.sha256(f"pgsandbox:{purpose}:{name}".encode()).digest()[:8], "big", signed=True)
