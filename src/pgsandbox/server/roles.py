"""Least-privilege roles: tests connect as a role of their own process, not as the admin.

- ``pgsandbox_owner`` (NOLOGIN, one per server) owns what the migrations created in a template: after a layer
  is migrated (as the admin), its objects are handed over to it.
- Each database made for the tests from a template gives those objects to the role the tests connect as
  (:func:`take_over`), so that what a test creates has the same owner as what the migrations created:
  PostgreSQL requires it of a sequence ``OWNED BY`` a column, and the owner's rights are what triggers,
  foreign keys, views and policies run with.
- Each session (each xdist worker) creates ``<prefix>tests``: LOGIN with a random password, NOSUPERUSER,
  NOCREATEROLE, NOCREATEDB unless asked, member of ``pgsandbox_owner`` (so it has the owner's rights on the
  app's tables in the databases it may connect to). Its databases are created by the admin with it as their
  owner, and ``CONNECT`` is revoked from ``PUBLIC``: another worker's role cannot connect to them.

Roles are cluster-wide; every name starts with ``pgsandbox_``, and a session drops its own role when it ends.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pgsandbox.common.redact import Secret, register_secret
from pgsandbox.server.admin import lock_id
from pgsandbox.server.scram import scram_verifier
from pgsandbox.server.tags import INTERNAL

OWNER = "pgsandbox_owner"


@dataclass(frozen=True)
class Login:
    """The role tests connect as; ``repr()`` hides the password, which is masked text itself."""

    user: str
    password: Secret = field(repr=False)


def can_manage_roles(admin: psycopg.Connection[Any]) -> bool:
    """Whether this admin can run the scheme above: a superuser; or a CREATEROLE role that is (or can become,
    by creating it) a member of ``pgsandbox_owner``: PostgreSQL 16+ lets only members with the ADMIN option
    grant a role, so a ``pgsandbox_owner`` another admin created is out of reach."""
    row = admin.execute(
        "SELECT rolsuper, rolcreaterole, "
        "(SELECT count(*) FROM pg_roles WHERE rolname = %(owner)s) = 0 "
        "OR pg_has_role(current_user, (SELECT oid FROM pg_roles WHERE rolname = %(owner)s), 'MEMBER') "
        "FROM pg_roles WHERE rolname = current_user",
        {"owner": OWNER},
    ).fetchone()
    return bool(row and (row[0] or (row[1] and row[2])))


def ensure_owner(admin: psycopg.Connection[Any]) -> None:
    """Create ``pgsandbox_owner`` if this server has none yet (concurrent sessions: one wins, all succeed)."""
    exists = admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [OWNER]).fetchone()
    if not exists:
        with contextlib.suppress(psycopg.errors.DuplicateObject, psycopg.errors.UniqueViolation):
            admin.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(OWNER)))
    _join(admin, OWNER)  # to hand objects over to it


def _join(admin: psycopg.Connection[Any], role: str) -> None:
    """Make a CREATEROLE admin (not a superuser) a member of ``role``: PostgreSQL lets only members give
    objects to a role or create databases it owns."""
    row = admin.execute(
        "SELECT rolsuper OR pg_has_role(current_user, %s, 'USAGE') FROM pg_roles WHERE rolname = current_user",
        [role],
    ).fetchone()
    if row and row[0]:
        return
    with contextlib.suppress(psycopg.Error):
        admin.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(role)))


# What the migrations' role owns in a template, in schemas that are not the system's and outside extensions,
# as the ALTER statements that hand it to pgsandbox_owner. Indexes, and sequences owned by a column, follow
# their table; array and multirange types follow their type.
_NOT_SYSTEM = "{nsp} NOT LIKE 'pg\\_%%' AND {nsp} <> 'information_schema'"
_NOT_EXTENSION = (
    "NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = '{catalog}'::regclass AND d.objid = {oid} "
    "AND d.deptype = 'e')"
)
HAND_OVER = f"""
WITH me AS (SELECT oid FROM pg_roles WHERE rolname = current_user)
SELECT format('ALTER SCHEMA %%I OWNER TO %%I', n.nspname, %(owner)s::text) FROM pg_namespace n, me
 WHERE n.nspowner = me.oid AND {_NOT_SYSTEM.format(nsp="n.nspname")}
   AND {_NOT_EXTENSION.format(catalog="pg_namespace", oid="n.oid")}
UNION ALL
SELECT format('ALTER %%s %%I.%%I OWNER TO %%I',
              CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE'
                             WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END,
              n.nspname, c.relname, %(owner)s::text)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, me
 WHERE c.relowner = me.oid AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f') AND {_NOT_SYSTEM.format(nsp="n.nspname")}
   AND {_NOT_EXTENSION.format(catalog="pg_class", oid="c.oid")}
   AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
            AND d.objid = c.oid AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')))
UNION ALL
SELECT format('ALTER %%s %%s OWNER TO %%I', CASE p.prokind WHEN 'a' THEN 'AGGREGATE' ELSE 'ROUTINE' END,
              p.oid::regprocedure, %(owner)s::text)
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace, me
 WHERE p.proowner = me.oid AND {_NOT_SYSTEM.format(nsp="n.nspname")}
   AND {_NOT_EXTENSION.format(catalog="pg_proc", oid="p.oid")}
UNION ALL
SELECT format('ALTER %%s %%s OWNER TO %%I', CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END,
              t.oid::regtype, %(owner)s::text)
  FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace, me
 WHERE t.typowner = me.oid AND t.typtype IN ('e', 'd', 'r', 'c') AND {_NOT_SYSTEM.format(nsp="n.nspname")}
   AND (t.typtype <> 'c' OR (SELECT c.relkind FROM pg_class c WHERE c.oid = t.typrelid) = 'c')
   AND {_NOT_EXTENSION.format(catalog="pg_type", oid="t.oid")}
"""


def hand_over(conn: psycopg.Connection[Any]) -> int:
    """In a template being built (``conn``: the admin, on it): give the migrations' objects to
    ``pgsandbox_owner``, so that the test roles (its members) may use and alter them. Returns how many."""
    statements = [row[0] for row in conn.execute(HAND_OVER, {"owner": OWNER}).fetchall()]
    # a new owner needs CREATE on the schema of what it gets (a superuser admin is exempt from the check)
    schemas = conn.execute(
        "SELECT format('GRANT USAGE, CREATE ON SCHEMA %%I TO %%I', nspname, %(owner)s::text) FROM pg_namespace "
        f"WHERE {_NOT_SYSTEM.format(nsp='nspname')} AND NOT has_schema_privilege(%(owner)s, oid, 'CREATE')",
        {"owner": OWNER},
    ).fetchall()
    for statement in [row[0] for row in schemas] + statements:
        conn.execute(statement)
    if conn.info.server_version >= 150000:
        # lets the tests' connection count itself in the statistics at once (see isolation/transaction.py)
        grant = sql.SQL("GRANT EXECUTE ON FUNCTION pg_stat_force_next_flush() TO {}")
        conn.execute(grant.format(sql.Identifier(OWNER)))
    return len(statements)


def take_over(conn: psycopg.Connection[Any]) -> None:
    """In a database just cloned from a template whose objects were handed over (``conn``: the role the tests
    connect as, a member of ``pgsandbox_owner``): make that role the owner of what ``pgsandbox_owner`` owns
    there. Only this database's objects move (``pgsandbox_owner`` owns no database or tablespace), so sessions
    running it at once in their own databases do not meet."""
    # on the test's connection: marked as pgsandbox's own, so that it stays out of the test's statements
    conn.execute(sql.SQL(INTERNAL + "REASSIGN OWNED BY {} TO CURRENT_USER").format(sql.Identifier(OWNER)))


def give_back(conn: psycopg.Connection[Any], login: Login) -> None:
    """In a database kept after its session (``conn``: the admin, on it): give what the session's role owns
    there, the database included, to the admin, so that the role can be dropped."""
    conn.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(sql.Identifier(login.user)))


@contextlib.contextmanager
def changing_roles(admin: psycopg.Connection[Any]) -> Iterator[None]:
    """Serialise the sessions of a server (xdist workers, runs) while they create or join roles: two sessions
    updating the same membership of ``pgsandbox_owner`` at once make one fail with "tuple concurrently
    updated"."""
    key = lock_id(OWNER, "roles")
    admin.execute("SELECT pg_advisory_lock(%s)", [key])
    try:
        yield
    finally:
        admin.execute("SELECT pg_advisory_unlock(%s)", [key])


def create_login(
    admin: psycopg.Connection[Any],
    name: str,
    createdb: bool = False,
    label: str = "",
    settings: Mapping[str, str] | None = None,
) -> Login:
    """A role for one session's tests (``CREATEDB`` only when asked); its password is random and reaches
    the server as a SCRAM verifier, never in clear. ``settings`` (timeouts) become the role's defaults, so that
    every connection of every client library the tests use gets them."""
    password = Secret(secrets.token_urlsafe(24))
    register_secret(password)
    admin.execute(
        sql.SQL(
            "CREATE ROLE {} LOGIN PASSWORD {} NOSUPERUSER NOCREATEROLE {} NOREPLICATION NOBYPASSRLS IN ROLE {}"
        ).format(
            sql.Identifier(name),
            sql.Literal(scram_verifier(password)),
            sql.SQL("CREATEDB" if createdb else "NOCREATEDB"),
            sql.Identifier(OWNER),
        )
    )
    if label:  # which run it belongs to, for the reaper
        admin.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(sql.Identifier(name), sql.Literal(label)))
    for setting, value in (settings or {}).items():
        admin.execute(
            sql.SQL("ALTER ROLE {} SET {} = {}").format(
                sql.Identifier(name), sql.Identifier(setting), sql.Literal(value)
            )
        )
    _join(admin, name)  # to create and drop databases it owns
    return Login(name, password)


def drop_login(admin: psycopg.Connection[Any], login: Login) -> None:
    with contextlib.suppress(psycopg.Error):
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(login.user)))


# -- the app's own roles (pg.as_role) ------------------------------------------------------------------------
# A role the tests' login may become: it exists, it is not PostgreSQL's or pgsandbox's own, and neither it nor
# a role it belongs to is a superuser or may create roles (becoming it would let the tests' role become them)
_APP_ROLE = """
SELECT r.rolname LIKE 'pg\\_%%' OR r.rolname LIKE 'pgsandbox\\_%%' AS reserved,
       EXISTS (SELECT 1 FROM pg_roles s WHERE (s.rolsuper OR s.rolcreaterole OR s.rolreplication)
               AND pg_has_role(r.oid, s.oid, 'MEMBER')) AS powerful,
       pg_has_role(%(login)s, r.oid, 'MEMBER') AS member
  FROM pg_roles r WHERE r.rolname = %(role)s
"""
_APP_ROLES = """
SELECT rolname FROM pg_roles r
 WHERE rolname NOT LIKE 'pg\\_%' AND rolname NOT LIKE 'pgsandbox\\_%' AND NOT rolsuper AND NOT rolcreaterole
   AND rolname <> current_user ORDER BY rolname
"""
# what a user may mean by the marker's role= when they think of the pg_role option
_LOGIN_CHOICES = ("own", "createdb", "admin")


def app_roles(admin: psycopg.Connection[Any]) -> list[str]:
    """The roles a test may run as on this server (see :func:`admit_app_role`)."""
    return [str(row[0]) for row in admin.execute(_APP_ROLES).fetchall()]


def admit_app_role(admin: psycopg.Connection[Any], role: str, login: str) -> None:
    """Make ``login`` (the tests' role) a member of the app's ``role``, so that it may ``SET ROLE`` to it;
    raise :class:`ConfigError` or :class:`PrivilegeError` when it may not."""
    from pgsandbox.errors import ConfigError, PrivilegeError

    row = admin.execute(_APP_ROLE, {"role": role, "login": login}).fetchone()
    if row is None:
        existing = app_roles(admin)
        said = f"Roles that exist: {', '.join(existing)}." if existing else "No role of the app's exists on it."
        hint = (
            f" (the marker's role= names a role of the app; {role!r} is a value of the pg_role option, whom "
            "pgsandbox connects as)"
            if role in _LOGIN_CHOICES
            else ""
        )
        raise ConfigError(
            f"pg.as_role: role {role!r} does not exist on the server{hint}. {said}",
            f"create it in a migration (CREATE ROLE {role} NOLOGIN, then its GRANTs and policies), or name one "
            "of the roles above.",
        )
    reserved, powerful, member = row
    if reserved or powerful:
        why = (
            "is one of PostgreSQL's or pgsandbox's own roles"
            if reserved
            else "is, or belongs to, a superuser or a role that may create roles or replicate"
        )
        raise ConfigError(
            f"pg.as_role: role {role!r} {why}; the tests' role may not become it.",
            "run as the app's own least-privilege role (such as app_rw or authenticated), which the migrations "
            "create NOLOGIN, with only the grants the app needs.",
        )
    if member:
        return
    with changing_roles(admin):
        try:
            admin.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(login)))
        except psycopg.errors.InsufficientPrivilege as error:
            raise PrivilegeError(
                f"pg.as_role: the admin ({current_user(admin)}) may not make the tests' role a member of {role!r}: "
                f"{error.diag.message_primary or error}.",
                f"let the admin create {role} in the migrations (its creator may grant it), or give it the right: "
                f"GRANT {role} TO {current_user(admin)} WITH ADMIN OPTION.",
            ) from None


def current_user(admin: psycopg.Connection[Any]) -> str:
    row = admin.execute("SELECT current_user").fetchone()
    return str(row[0]) if row else ""


def set_login_defaults(
    admin: psycopg.Connection[Any], login: str, dbname: str, role: str | None, settings: Mapping[str, str]
) -> None:
    """The defaults of ``login``'s new connections to ``dbname``: run as ``role`` (None: as itself) with
    ``settings`` (none: as created). One round trip."""
    target = sql.SQL("ALTER ROLE {} IN DATABASE {}").format(sql.Identifier(login), sql.Identifier(dbname))
    statements = [sql.SQL("{} RESET ALL").format(target)]
    if role is not None:
        statements.append(sql.SQL("{} SET role = {}").format(target, sql.Literal(role)))
    for name, value in settings.items():
        statements.append(sql.SQL("{} SET {} = {}").format(target, sql.Identifier(name), sql.Literal(value)))
    admin.execute(sql.SQL("; ").join(statements))
