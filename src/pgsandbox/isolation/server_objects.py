"""A guard for what no rollback and no dropped clone undoes: databases, roles and tablespaces a test creates on
the server itself, outside its database.

Only tests that can create them are watched: those whose connections may (``pg_role = createdb`` or
``admin``) and those that take an admin connection (``pg_admin``). Names starting with ``pgsandbox_`` are
pgsandbox's own, possibly of another run or xdist worker at the same moment, and are left out.
"""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg
from psycopg import sql

from pgsandbox.isolation.transaction import Finding

OUTSIDE = "objects created outside the test's database"
KINDS = {"database": "DATABASE", "role": "ROLE", "tablespace": "TABLESPACE"}

_QUERY = (
    "SELECT 'database', datname FROM pg_database WHERE datname NOT LIKE 'pgsandbox\\_%' "
    "UNION ALL SELECT 'role', rolname FROM pg_roles WHERE rolname NOT LIKE 'pgsandbox\\_%' "
    "UNION ALL SELECT 'tablespace', spcname FROM pg_tablespace"
)

ServerObjects = frozenset[tuple[str, str]]


def server_objects(admin: psycopg.Connection[Any]) -> ServerObjects:
    """The server's databases, roles and tablespaces, but pgsandbox's own."""
    return frozenset((str(kind), str(name)) for kind, name in admin.execute(_QUERY).fetchall())


def created_since(admin: psycopg.Connection[Any], before: ServerObjects, test_id: str, drop: bool) -> list[str]:
    """A finding naming what appeared on the server since ``before``; with ``drop`` (the run's own local
    server, where nothing else creates them) they are dropped, so that the next test starts clean."""
    new = sorted(server_objects(admin) - before)
    if not new:
        return []
    names = ", ".join(f"{kind} {name!r}" for kind, name in new)
    if drop:
        failed = []
        for kind, name in new:
            try:
                _drop(admin, kind, name)
            except psycopg.Error as error:
                failed.append(f"{kind} {name!r} ({str(error).strip()})")
        outcome = "pgsandbox dropped them" + (f", except {', '.join(failed)}" if failed else "")
    else:
        outcome = "pgsandbox left them on this shared server: drop them"
    return [
        Finding.of(
            OUTSIDE,
            f"{test_id} created {names} on the server, outside its database, where neither a rollback nor a "
            f"dropped clone undoes it; {outcome}. Create such objects in a migration (template), or drop them "
            "in the test's own teardown.",
        )
    ]


def _drop(admin: psycopg.Connection[Any], kind: str, name: str) -> None:
    identifier = sql.Identifier(name)
    if kind == "database":
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(identifier))
    elif kind == "role":
        # what it owns or was granted in the admin's database goes first; elsewhere DROP ROLE says what is left
        with contextlib.suppress(psycopg.Error):
            admin.execute(sql.SQL("DROP OWNED BY {}").format(identifier))
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(identifier))
    else:
        admin.execute(sql.SQL("DROP {} IF EXISTS {}").format(sql.SQL(KINDS[kind]), identifier))
