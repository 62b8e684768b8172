"""A guard for what no rollback and no dropped clone undoes: databases, roles and tablespaces a test creates on
the server itself, outside its database.

Only tests that can create them are watched: those whose connections may (``pg_role = createdb`` or
``admin``) and those that take an admin connection (``pg_admin``). Names starting with ``pgsandbox_`` are
pgsandbox's own, possibly of another run or xdist worker at the same moment, and are left out.

Under pytest-xdist the other workers' tests create objects on the same server at the same time, with the same
role: what appeared while a test ran is that test's only if one of its statements made it (:func:`made_by`,
from the statement log; :func:`made_by_test`). What no test can be told to have made is left alone.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from typing import Any

import psycopg
from psycopg import sql

from pgsandbox.isolation.findings import Finding, created_outside
from pgsandbox.server.statement_log import Entry
from pgsandbox.server.statements import Scope, ran

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


def created_since(admin: psycopg.Connection[Any], before: ServerObjects) -> list[tuple[str, str]]:
    """What appeared on the server since ``before``."""
    return sorted(server_objects(admin) - before)


# What a statement makes, by name: CREATE DATABASE/ROLE/USER/GROUP/TABLESPACE x, ALTER ... x RENAME TO y (also
# inside a DO block or a function body that spells the name out)
_IDENTIFIER = r'(?:"(?:[^"]|"")+"|[^\s;(),]+)'
_MAKES = re.compile(
    rf"\b(?:CREATE\s+(DATABASE|ROLE|USER|GROUP|TABLESPACE)\s+|"
    rf"ALTER\s+(DATABASE|ROLE|USER|GROUP|TABLESPACE)\s+{_IDENTIFIER}\s+RENAME\s+TO\s+)({_IDENTIFIER})",
    re.IGNORECASE,
)
_KIND_OF = {"DATABASE": "database", "ROLE": "role", "USER": "role", "GROUP": "role", "TABLESPACE": "tablespace"}


def made_by(text: str) -> set[tuple[str, str]]:
    """The server objects ``text`` creates or renames to, by (kind, name) as the catalogs spell them."""
    found = set()
    for match in _MAKES.finditer(text):
        name = match[3]
        name = name[1:-1].replace('""', '"') if name.startswith('"') else name.lower()
        found.add((_KIND_OF[(match[1] or match[2]).upper()], name))
    return found


def made_by_test(new: Iterable[tuple[str, str]], entries: Iterable[Entry], scope: Scope) -> list[tuple[str, str]]:
    """Those of ``new`` that a statement of the test (``scope``) made, from the statement log's ``entries``."""
    made: set[tuple[str, str]] = set()
    for entry in entries:
        text = ran(entry)
        if text is not None and entry in scope:
            made |= made_by(text)
    return [item for item in new if item in made]


def outside_finding(
    admin: psycopg.Connection[Any], new: list[tuple[str, str]], test_id: str, drop: bool
) -> list[Finding]:
    """A finding naming ``new``, what the test created on the server; with ``drop`` (a local server of the run,
    where nothing else creates them) they are dropped, so that the next test starts clean."""
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
    return [created_outside(test_id, names, outcome)]


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
