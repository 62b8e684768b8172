"""The admin's side of ``pg.as_role``: which roles a test may run as (and the login's membership of them), the
login's defaults in a ``database``-isolation test's database, and what a permission denied lacked."""

from __future__ import annotations

import re
from typing import Any

import psycopg

from pgsandbox.errors import ConfigError, causes, sqlstate
from pgsandbox.isolation.base import Mode
from pgsandbox.isolation.roles import RoleBlock
from pgsandbox.server import Server, roles

INSUFFICIENT_PRIVILEGE = "42501"  # permission denied, and a row refused by row-level security
_RLS = re.compile(r'new row violates row-level security policy (?:\(USING expression\) )?for table "(?P<name>[^"]+)"')
_DENIED = re.compile(
    r"permission denied for (?P<kind>table|view|materialized view|foreign table|sequence|schema|function|"
    r"procedure|routine|type|relation) \"?(?P<name>[^\"\s]+)\"?"
)
_TABLE_RIGHTS = ("SELECT", "INSERT", "UPDATE", "DELETE")


class AppRoles:
    """One per sandbox: the roles admitted so far (a membership is granted once per session)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._admitted: set[str] = set()

    @property
    def login(self) -> str:
        return self.server.login.user if self.server.login is not None else self.server.user

    def admit(self, role: str, isolation: Mode) -> None:
        if isolation == "database" and self.server.login is None:
            raise ConfigError(
                f"pg.as_role({role!r}) in database isolation sets the role for the connections the app opens to "
                "the test's database, as the defaults of the tests' own login; here the tests connect as the "
                "admin (pg_role = admin, or an admin that may not create roles), whose defaults pgsandbox does not "
                "change.",
                "use transaction isolation for this test, or let the tests have a role of their own (pg_role = own, "
                "with an admin that has CREATEROLE).",
            )
        if role in self._admitted:
            return
        roles.admit_app_role(self.server.admin, role, self.login)
        self._admitted.add(role)

    def set_defaults(self, dbname: str, block: RoleBlock | None) -> None:
        settings = dict(block.settings) if block is not None else {}
        roles.set_login_defaults(self.server.admin, self.login, dbname, block.role if block else None, settings)

    def explain(self, error: BaseException, dbname: str, block: RoleBlock) -> str | None:
        message = denial_of(error)
        if message is None or block.role is None:
            return None
        with self.server.connect(dbname, autocommit=True) as conn:
            return describe_denial(conn, message, block)


def denial_of(error: BaseException | None) -> str | None:
    """The server's message of a permission denied (42501) in ``error`` or what it wraps, on any driver."""
    for cause in causes(error):
        if sqlstate(cause) == INSUFFICIENT_PRIVILEGE:
            diag = getattr(cause, "diag", None)
            message = getattr(diag, "message_primary", None) or getattr(cause, "message", None) or str(cause)
            return str(message).strip().splitlines()[0]
    return None


def describe_denial(conn: psycopg.Connection[Any], message: str, block: RoleBlock) -> str:
    """What ``block``'s role lacked for ``message`` (read as the admin in the test's database): the failing
    policies of a row refused by row-level security, or the missing grant."""
    role = block.role or "the tests' role"  # explain() asks only for an app's role
    head = f"pgsandbox: as {block.describe()}: {message}."
    found = _RLS.search(message)
    if found:
        return head + "\n" + _policies(conn, found["name"], role, block)
    found = _DENIED.search(message)
    if found is None:
        return head + f"\n  {role} has only the grants and policies the migrations gave it."
    kind, name = found["kind"], found["name"]
    if kind in ("table", "view", "materialized view", "foreign table", "relation"):
        return head + "\n" + _table_rights(conn, name, role)
    checks = {
        "schema": ("USAGE", "SCHEMA"),
        "sequence": ("USAGE", "SEQUENCE"),
        "function": ("EXECUTE", "FUNCTION"),
        "procedure": ("EXECUTE", "PROCEDURE"),
        "routine": ("EXECUTE", "ROUTINE"),
        "type": ("USAGE", "TYPE"),
    }
    right, keyword = checks[kind]
    return head + f"\n  {role} lacks {right} on {kind} {name}: GRANT {right} ON {keyword} {name} TO {role}."


def _table_rights(conn: psycopg.Connection[Any], name: str, role: str) -> str:
    row = conn.execute(
        "SELECT c.oid::regclass::text, "
        "ARRAY(SELECT p FROM unnest(%(rights)s::text[]) p WHERE has_table_privilege(%(role)s, c.oid, p)), "
        "ARRAY(SELECT p FROM unnest(%(rights)s::text[]) p WHERE NOT has_table_privilege(%(role)s, c.oid, p)), "
        "has_schema_privilege(%(role)s, c.relnamespace, 'USAGE'), c.relnamespace::regnamespace::text "
        "FROM pg_class c WHERE c.relname = %(name)s ORDER BY pg_table_is_visible(c.oid) DESC LIMIT 1",
        {"rights": list(_TABLE_RIGHTS), "role": role, "name": name},
    ).fetchone()
    if row is None:
        return f"  {role} has only the grants the migrations gave it."
    table, has, lacks, schema_usage, schema = row
    lines = [
        f"  {role} has {', '.join(has) if has else 'no privilege'} on {table}"
        + (f"; it lacks {', '.join(lacks)}." if lacks else ".")
    ]
    if not schema_usage:
        lines.append(f"  {role} lacks USAGE on schema {schema}: GRANT USAGE ON SCHEMA {schema} TO {role}.")
    if lacks:
        lines.append(
            f"  The grant the migrations may lack (only what the app needs): GRANT {', '.join(lacks)} ON {table} "
            f"TO {role}."
        )
    return "\n".join(lines)


def _policies(conn: psycopg.Connection[Any], name: str, role: str, block: RoleBlock) -> str:
    """The row-level security policies of table ``name`` that apply to the role."""
    table = conn.execute(
        "SELECT c.oid::regclass::text, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE c.relname = %s ORDER BY pg_table_is_visible(c.oid) DESC LIMIT 1",
        [name],
    ).fetchone()
    if table is None:
        return f"  no table {name} was found to read its policies."
    shown, schema, relname = table
    policies = conn.execute(
        "SELECT policyname, permissive, cmd, array_to_string(roles, ', '), qual, with_check FROM pg_policies "
        "WHERE schemaname = %(schema)s AND tablename = %(table)s AND EXISTS (SELECT 1 FROM unnest(roles) r "
        "WHERE r = 'public' OR EXISTS (SELECT 1 FROM pg_roles g WHERE g.rolname = r "
        "AND pg_has_role(%(role)s, g.oid, 'MEMBER'))) ORDER BY policyname",
        {"schema": schema, "table": relname, "role": role},
    ).fetchall()
    if not policies:
        return (
            f"  No row-level security policy of {shown} applies to {role}: with row-level security on, "
            f"every row is refused. The migrations may lack a CREATE POLICY ... ON {shown} TO {role}."
        )
    lines = [f"  The new row passed none of the policies of {shown} that apply to {role}:"]
    for policy, permissive, command, to, qual, check in policies:
        rule = f"WITH CHECK ({check})" if check else f"USING ({qual})" if qual else "(no expression)"
        lines.append(f"    {policy} ({permissive.lower()}, FOR {command}, TO {to}): {rule}")
    said = ", ".join(f"{name} = {value!r}" for name, value in block.settings) or "none"
    lines.append(f"  The block's settings: {said}. Check the row's values, and the settings the policy reads.")
    return "\n".join(lines)
