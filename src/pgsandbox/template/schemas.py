"""Schema isolation's "template": the session's own schema in the DSN's database, migrated once.

For a server where tests may not create databases (pg_isolation = schema): the session creates a schema named
with its run id (``pgsandbox_<run id>_schema``) in the database the DSN names and runs the migrations (and seed)
into it with ``search_path`` set to it, so that unqualified DDL lands there. Every connection a test gets names
the same search_path (``Server.search_path``), and each test is a rolled-back transaction in it
(isolation/schema.py).

Why each session migrates its own schema rather than copying a hash-keyed one: PostgreSQL cannot copy a schema
(there is no ``CREATE SCHEMA ... TEMPLATE``, and ``pg_dump`` writes every name qualified with its schema), so a
copy would mean replaying the migrations anyway; a template schema would cost one more migration and save none.

What would not be in the schema is refused after the migration (:class:`MigrationError`): objects created or
altered in another schema (``create table public.x``), new schemas, extensions, event triggers and roles. They
would be shared by every session and outlive the run, which is what schema isolation must not do.
"""

from __future__ import annotations

import contextlib
import time

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgsandbox.common.progress import Progress
from pgsandbox.common.urls import sqlalchemy_url
from pgsandbox.common.words import counted
from pgsandbox.errors import ConfigError
from pgsandbox.server.base import Server
from pgsandbox.server.tags import OURS_PREFIX
from pgsandbox.template.base import SETTING_OF_LAYER, MigrationError, Target, naming_setting
from pgsandbox.template.builds import Chain, migrate_step, next_xid

SCHEMA = "schema"  # the session schema's name after the run prefix: pgsandbox_<run id>_schema
MAX_NAMED = 10

# Catalogs whose objects live in a schema, with the column that says which one.
_IN_A_SCHEMA = (
    ("pg_class", "relnamespace"),
    ("pg_proc", "pronamespace"),
    ("pg_type", "typnamespace"),
    ("pg_constraint", "connamespace"),
    ("pg_operator", "oprnamespace"),
    ("pg_opclass", "opcnamespace"),
    ("pg_opfamily", "opfnamespace"),
    ("pg_collation", "collnamespace"),
    ("pg_conversion", "connamespace"),
    ("pg_statistic_ext", "stxnamespace"),
    ("pg_ts_config", "cfgnamespace"),
    ("pg_ts_dict", "dictnamespace"),
    ("pg_ts_parser", "prsnamespace"),
    ("pg_ts_template", "tmplnamespace"),
)
# Objects named with what they belong to (a relation's row type, a type's array type): not listed apart.
_ALSO = {"pg_type": " AND typrelid = 0 AND typelem = 0"}
# Rows written by a transaction from {since} on (xmin), or deleted (xmax), compared across wraparound as
# builds.changed_since does.
_NEW = "(age(xmin) <= age({since}::xid) OR (xmax <> '0'::xid AND age(xmax) <= age({since}::xid)))"
# The objects of a migration that are not in the session's schema: in another schema (not another pgsandbox
# run's, not PostgreSQL's own: a table's TOAST table lives in pg_toast), or outside any (a schema, an
# extension, an event trigger). New schemas are compared by their own oid.
_OUTSIDE = (
    "WITH new(classid, objid, nsp) AS ("
    + " UNION ALL ".join(
        f"SELECT '{catalog}'::regclass, oid, {column} FROM {catalog} WHERE {_NEW}{_ALSO.get(catalog, '')}"
        for catalog, column in _IN_A_SCHEMA
    )
    + f" UNION ALL SELECT 'pg_namespace'::regclass, oid, oid FROM pg_namespace WHERE {_NEW}"
    + f" UNION ALL SELECT 'pg_extension'::regclass, oid, 0::oid FROM pg_extension WHERE {_NEW}"
    + f" UNION ALL SELECT 'pg_event_trigger'::regclass, oid, 0::oid FROM pg_event_trigger WHERE {_NEW}"
    + ") SELECT DISTINCT o.type, o.identity FROM new, pg_identify_object(new.classid, new.objid, 0) o "
    "WHERE new.nsp = 0 OR new.nsp NOT IN (SELECT oid FROM pg_namespace WHERE nspname = {schema} "
    "OR nspname LIKE 'pgsandbox\\_%' OR nspname ~ '^pg_' OR nspname = 'information_schema') ORDER BY 1, 2"
)
_ROLES = "SELECT rolname FROM pg_roles WHERE rolname NOT LIKE 'pgsandbox\\_%'"
# The session schema's tables, with their row counts (the baseline every test's end is compared with when a
# commit may have escaped) and the rows written from {since} on.
_TABLES = (
    "SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY 1"
)


def search_path(schema: str) -> str:
    """The session schema first (where unqualified names are created and found), then ``public``, where a
    DBA's extensions usually are."""
    return f"{schema},public"


class SessionSchema:
    """The schema of one session (one xdist worker), migrated once: what schema isolation rolls each test back
    in."""

    def __init__(
        self, server: Server, chain: Chain | None, progress: Progress | None = None, kind: str = SCHEMA
    ) -> None:
        """``kind``: what follows the run prefix in its name (``schema``; ``login``: pg_login's)."""
        self.server = server
        self.chain = chain
        self.progress = progress
        self.name = server.database_name(kind)
        row = server.admin.execute("SELECT current_database()").fetchone()
        assert row is not None
        self.dbname = str(row[0])
        self.seconds = 0.0  # the last build's
        self.built_xid = 0  # the first transaction id after the build: newer rows were written since
        self.baseline: dict[str, int] = {}  # rows per table after the build
        self.exists = False

    @property
    def search_path(self) -> str:
        return search_path(self.name)

    def build(self) -> None:
        """Create the schema and migrate it; refuse (after dropping it) what the migrations made elsewhere."""
        started = time.perf_counter()
        admin = self.server.admin
        ident = sql.Identifier(self.name)
        since = next_xid(self.server)
        roles_before = {str(name) for (name,) in admin.execute(_ROLES).fetchall()}
        try:
            admin.execute(sql.SQL("CREATE SCHEMA {}").format(ident))
        except psycopg.errors.InsufficientPrivilege as error:
            user = self.server.user
            raise ConfigError(
                f"schema isolation could not create the schema {self.name} in database {self.dbname}: {error}.",
                f"as the database's owner run: GRANT CREATE ON DATABASE {self.dbname} TO {user}; or name in pg_dsn "
                "a database where that role may create schemas.",
            ) from None
        self.exists = True
        if self.server.test_options is None:  # a rebuild keeps what the sandbox added (the tests' timeouts)
            self.server.test_options = (self.dbname, f"-csearch_path={self.search_path}")
        try:
            admin.execute(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(ident, sql.Literal(self.server.run_label)))
            if self.chain is not None:
                self._migrate()
            outside = self._outside(since, roles_before)
            if outside:
                raise self._refusal(outside)
            self.built_xid = next_xid(self.server)
            self.baseline = self._rows()
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                self.drop()
            raise
        self.seconds = time.perf_counter() - started

    def _migrate(self) -> None:
        assert self.chain is not None
        params = {**self.server.params, "dbname": self.dbname, "options": f"-csearch_path={self.search_path}"}
        target = Target(self.dbname, make_conninfo(self.server.dsn, **params), sqlalchemy_url(params))
        for layer in self.chain.layers:
            if self.progress:
                labels = ", ".join(m.label for m in layer.migrators)
                self.progress(f"migrating the session's schema {self.name} ({layer.kind}: {labels})")
            opened: set[str] = set()
            with naming_setting(SETTING_OF_LAYER.get(layer.kind, "pg_migrations")):
                for migrator in layer.migrators:
                    migrate_step(self.server, migrator, target, opened)

    def _outside(self, since: int, roles_before: set[str]) -> list[str]:
        """What the migrations made outside the schema: objects in other schemas, schemas, extensions, roles."""
        query = _OUTSIDE.replace("{since}", sql.Literal(str(since % 2**32)).as_string(None))
        query = query.replace("{schema}", sql.Literal(self.name).as_string(None))
        with self.server.connect(self.dbname, autocommit=True, application_name=OURS_PREFIX) as conn:
            found = [f"{kind} {identity}" for kind, identity in conn.execute(query.encode()).fetchall()]
            roles = {str(name) for (name,) in conn.execute(_ROLES).fetchall()}
        found += [f"role {name}" for name in sorted(roles - roles_before)]
        return found

    def _refusal(self, outside: list[str]) -> MigrationError:
        labels = ", ".join(m.label for layer in self.chain.layers for m in layer.migrators) if self.chain else ""
        named = outside[:MAX_NAMED] + ([f"and {len(outside) - MAX_NAMED} more"] if len(outside) > MAX_NAMED else [])
        return MigrationError(
            f"schema isolation cannot copy what the migrations ({labels}) made outside the session's schema: "
            f"{'; '.join(named)}. In schema isolation each session migrates a schema of its own ({self.name}, "
            f"search_path = {self.search_path}); extensions, roles, other schemas and objects named with a "
            "schema (create table public.x) would be shared by every session and outlive the run, so pgsandbox "
            "dropped the schema and stopped; what they made outside it stays (pgsandbox drops only what it named): "
            "drop it.",
            "leave the schema out of the migrations' names (create table x, not public.x); have a DBA create "
            "extensions and roles on the server beforehand (CREATE EXTENSION in public, which stays on the "
            "search_path; CREATE EXTENSION IF NOT EXISTS then changes nothing); or use pg_isolation = transaction "
            "or database on a server where the role may create databases.",
        )

    def _rows(self) -> dict[str, int]:
        counts, _ = self._counts(0)
        return counts

    def _counts(self, since: int) -> tuple[dict[str, int], dict[str, int]]:
        """Rows per table of the schema, and those written by transactions from ``since`` on."""
        with self.server.connect(self.dbname, autocommit=True, application_name=OURS_PREFIX) as conn:
            tables = [str(name) for (name,) in conn.execute(_TABLES, [self.name]).fetchall()]
            if not tables:
                return {}, {}
            literal = sql.Literal(str(since % 2**32))
            query = sql.SQL(" UNION ALL ").join(
                sql.SQL("SELECT {}, count(*), count(*) FILTER (WHERE age(xmin) <= age({}::xid)) FROM {}").format(
                    sql.Literal(name), literal, sql.SQL(name)
                )
                for name in tables
            )
            rows = conn.execute(query).fetchall()
        return {str(n): int(c) for n, c, _ in rows}, {str(n): int(w) for n, _, w in rows}

    def changes(self) -> list[str]:
        """What differs from the schema as its build left it: tables created, dropped, with other row counts or
        rows written since; objects created or altered in it. Empty: nothing escaped."""
        counts, written = self._counts(self.built_xid)
        found: list[str] = []
        for table in sorted(set(counts) | set(self.baseline)):
            before, after = self.baseline.get(table), counts.get(table)
            if before is None:
                found.append(f"{table} (created, {counted(after or 0, 'row')})")
            elif after is None:
                found.append(f"{table} (dropped)")
            elif after != before or written[table]:
                delta = counted(after - before, "row", signed=True) if after != before else "same row count"
                found.append(f"{table} ({delta}, {counted(written[table], 'row')} written)")
        query = (
            "SELECT DISTINCT o.type, o.identity FROM ("
            + " UNION ALL ".join(
                f"SELECT '{catalog}'::regclass AS classid, oid AS objid FROM {catalog} "
                f"WHERE {column} = {{nsp}} AND {_NEW}{_ALSO.get(catalog, '')}"
                for catalog, column in _IN_A_SCHEMA
            )
            + ") new, pg_identify_object(new.classid, new.objid, 0) o ORDER BY 1, 2"
        )
        query = query.replace("{since}", sql.Literal(str(self.built_xid % 2**32)).as_string(None))
        query = query.replace("{nsp}", f"{sql.Literal(self.name).as_string(None)}::regnamespace")
        with self.server.connect(self.dbname, autocommit=True, application_name=OURS_PREFIX) as conn:
            tables = {f"table {name}" for name in set(counts) | set(self.baseline)}
            for kind, identity in conn.execute(query.encode()).fetchall():
                described = f"{kind} {identity}"
                if described not in tables and kind not in ("table", "toast table"):
                    found.append(f"{described} (created or altered)")
        return found[:MAX_NAMED] + ([f"and {len(found) - MAX_NAMED} more"] if len(found) > MAX_NAMED else [])

    def rebuild(self) -> None:
        """Drop the schema and migrate it again (after writes escaped a test's transaction)."""
        self.drop()
        self.build()

    def drop(self) -> None:
        """Drop the schema and everything in it (only this session's: its name has the run's prefix)."""
        if not self.name.startswith(self.server.prefix):  # never what pgsandbox did not name
            raise ConfigError(f"refusing to drop schema {self.name!r}: not this run's.", "")
        if not self.exists:
            return
        self.server.admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.name)))
        self.exists = False


def describe(schema: SessionSchema) -> str:
    """The progress line of a built session schema."""
    what = "migrated" if schema.chain is not None else "created (no pg_migrations)"
    return f"schema isolation: {what} the session's schema {schema.name} in {schema.dbname} in {schema.seconds:.2f} s"
