"""Sandbox: start (migrators -> server -> templates), a database per test through its isolation, sharing with
xdist workers, stop. What explains a failure (diagnostics.py), the session report (report.py), kept databases
(kept.py), a server that went away (gone.py) and the server-level guards (guards.py) are modules of their own."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from pgsandbox.binaries import find_installations, missing_extension, missing_extension_advice
from pgsandbox.common.progress import Progress
from pgsandbox.data.catalog import Catalog, for_template
from pgsandbox.errors import ConfigError, PgSandboxError
from pgsandbox.isolation import fence
from pgsandbox.isolation.base import Begun, Isolation
from pgsandbox.isolation.findings import (
    ESCAPED,
    OWN_DB,
    Finding,
    IsolationError,
    clone_failed,
    not_kept_in_schema,
    not_kept_in_scope,
    scope_of_other_mode,
)
from pgsandbox.isolation.leftovers import end_left_open
from pgsandbox.isolation.server_objects import server_objects
from pgsandbox.isolation.transaction import TransactionIsolation
from pgsandbox.sandbox.app_roles import AppRoles
from pgsandbox.sandbox.database import Database, SessionLogin
from pgsandbox.sandbox.diagnostics import Diagnostics
from pgsandbox.sandbox.gone import GoneWatch, ServerGone
from pgsandbox.sandbox.guards import ServerGuards
from pgsandbox.sandbox.kept import KeptDatabases
from pgsandbox.sandbox.report import Counters, ServerSummary, cache_report, session_report
from pgsandbox.server import ExternalServer, Server, credentials_command, reaper, roles, start_server
from pgsandbox.server.admin import terminate_connections
from pgsandbox.server.clusters import cache_root
from pgsandbox.server.statement_log import StatementLog
from pgsandbox.settings import ISOLATIONS, Settings
from pgsandbox.template import Chain, TemplateInfo, ensure_templates, load_migrators, release
from pgsandbox.template.base import MigrationError, Migrator
from pgsandbox.template.builds import chain_of, hold_in_use, snapshot_keys, warm_relcache

if TYPE_CHECKING:  # database and schema isolation's modules load only in their sessions
    from pgsandbox.isolation.database import DatabaseIsolation
    from pgsandbox.isolation.schema import SchemaIsolation
    from pgsandbox.template.schemas import SessionSchema

__all__ = ["Sandbox", "ServerGone"]

SLOW_CLONE_SECONDS = 0.5  # a first clone slower than this gets a progress line (big templates)
LOGIN_DATABASE = "login"  # the database SessionLogin names: <prefix>login


def _require_extensions(server: Server, settings: Settings) -> None:
    """An existing server is checked for ``pg_extensions`` before any migration runs."""
    available = {str(name) for (name,) in server.admin.execute("SELECT name FROM pg_available_extensions").fetchall()}
    missing = [name for name in settings.extensions if name not in available]
    if missing:
        raise ConfigError(
            f"{settings.source_of('extensions')} asks for {', '.join(missing)}, which the server at "
            f"{server.address} does not have (pg_available_extensions).",
            "install them on that server (contrib extensions: its postgresql-contrib package), or test on a local "
            "server (pg_server = local), where pg_extensions picks an installation that ships them.",
        )


def _explain_missing_extension(error: MigrationError, server: Server, settings: Settings) -> MigrationError | None:
    """A migration that failed on ``CREATE EXTENSION`` of an extension the server lacks blames the
    installation, not the migration, and says how to get one that has it."""
    found = missing_extension(error.what)
    if found is None:
        return None
    name, library = found
    installation = server.installation
    if installation is not None:
        search = find_installations(settings.bin, cache_root=cache_root(settings.cache))
        what, fix = missing_extension_advice(name, library, installation, search)
    else:
        what = f'the server at {server.address} cannot create the extension "{name}".'
        fix = (
            f"install it on that server (for contrib extensions such as uuid-ossp and pgcrypto: the postgresql-contrib "
            f"package of its version{f', and {library}' if library else ''}), or test on a local server "
            f'(pg_server = local) with pg_extensions = ["{name}"].'
        )
    return MigrationError(f"{error.what}\n  {what}", fix)


class Sandbox:
    """A server with its templates built, handing out one isolated database per test."""

    def __init__(
        self,
        server: Server,
        templates: list[TemplateInfo],
        settings: Settings,
        progress: Progress | None = None,
        attached: bool = False,
    ) -> None:
        """``attached``: another process's sandbox (xdist's controller) owns server and templates."""
        self.server = server
        self.templates = templates
        self.settings = settings
        self.progress = progress
        self.attached = attached
        self.template = templates[-1].name if templates else "template0"
        server.handed_over = bool(templates) and templates[-1].handed_over
        self.clone_clause = clone_clause(server, settings.clone_strategy)
        self.start_seconds = 0.0  # the server's start (or attach), for the session report
        self.kept = KeptDatabases(server)
        self.diagnostics = Diagnostics(server)
        self.app_roles = AppRoles(server)  # pg.as_role: the app's roles a test may run as
        self._counters = Counters()
        self._isolations: dict[str, Isolation] = {}  # by mode, made when a first test asks for it
        self._transaction: TransactionIsolation | None = None  # the one of them the pg handle parks drivers on
        self._clones: DatabaseIsolation | None = None
        self._owned: str | None = None  # the session's copy of the template that its role owns (_test_template)
        self._guards = ServerGuards(server, attached, server.throwaway)
        self._watch = GoneWatch(server)
        self._catalogs: Path | None = None  # where the data factories' catalogs are cached
        self._login: SessionLogin | None = None
        self._stopped = False
        # database isolation's scoped data: each open scope's database, outermost first, and the tests' clones of it
        self._clone_scopes: list[Database] = []
        self._scoped_clones: set[str] = set()
        self._scoped_counter = 0
        self.schema: SessionSchema | None = None  # schema isolation: the session's migrated schema
        self._login_schema: SessionSchema | None = None  # and pg_login's, made on its first use
        self._timeout_options = ""  # schema isolation: the tests' timeouts as libpq options (-cname=value ...)
        # whether the tests' connections may create databases, roles or tablespaces (watched per test, guards.py)
        self._may_create_server_objects = True

    # -- start ----------------------------------------------------------------------------------------
    @classmethod
    def start(
        cls,
        settings: Settings | None = None,
        *,
        migrations: Sequence[Migrator] | None = None,
        seed: Sequence[Migrator] | None = None,
        root: Path | None = None,
        project: str | None = None,
        progress: Progress | None = None,
        server_start: Callable[[list[str]], Server] | None = None,
    ) -> Sandbox:
        """Start (or attach to) the server and build the templates the cache does not have.

        ``migrations``/``seed`` default to those ``settings.migrations``/``settings.seed`` name, relative
        to ``root`` (default: the current directory). ``server_start``: the server for the snapshot keys (the
        clusters holding built templates to start from, most complete first), instead of :func:`start_server`
        (the pytest plugin's: the server it started while pytest collected).
        """
        settings = settings or Settings.from_env()
        root = (root or Path.cwd()).resolve()
        if migrations is None:
            migrations = load_migrators(settings.migrations, settings.migrations_inputs, root)
        if seed is None:
            seed = load_migrators(settings.seed, settings.migrations_inputs, root, "pg_seed")
        chain = chain_of(migrations, seed)
        snapshots = snapshot_keys(chain, settings.rebuild)
        started = time.perf_counter()
        with fence.exempt():  # the connection fence's: its address is known once it is started
            server = start_server(settings, progress, snapshots) if server_start is None else server_start(snapshots)
        start_seconds = time.perf_counter() - started
        try:
            fence.allow_server((server.dsn, server.admin_dsn))  # before the migrations, which reach it
            if settings.extensions and not server.owns_cluster:
                _require_extensions(server, settings)
            if settings.isolation == "schema":
                return cls._start_in_schema(server, chain, settings, progress, start_seconds)
            templates: list[TemplateInfo] = []
            if chain is not None:
                templates = ensure_templates(
                    server,
                    chain,
                    project=project or root.name,
                    rebuild=settings.rebuild,
                    keep=settings.templates_keep,
                    clone_clause=clone_clause(server, settings.clone_strategy),
                    progress=progress,
                    root=root,
                )
                snapshot_hit = server.snapshot_hit
                if progress:
                    for info in templates:
                        progress(describe_template(info, snapshot_hit))
                if any(not t.hit for t in templates):
                    _save_snapshot(server, chain, templates, settings, progress)
                if server.owns_cluster:  # its own catalog caches, loaded ahead of the first clone
                    warm_relcache(server, templates[-1].name)
            sandbox = cls(server, templates, settings, progress)
            sandbox.start_seconds = start_seconds
            if not server.owns_cluster:  # a shared server: what runs that died left there
                sandbox.drop_dead_runs()
            sandbox._create_login()
            sandbox._point_env()
            return sandbox
        except BaseException as error:
            server.stop()
            if isinstance(error, MigrationError):
                explained = _explain_missing_extension(error, server, settings)
                if explained is not None:
                    raise explained from error
            raise

    @classmethod
    def _start_in_schema(
        cls,
        server: Server,
        chain: Chain | None,
        settings: Settings,
        progress: Progress | None,
        start_seconds: float,
        attached: bool = False,
    ) -> Sandbox:
        """Schema isolation: no template database; the session migrates a schema of its own in the DSN's
        database (template/schemas.py), and its tests connect as the DSN's role (no role of their own: that
        takes CREATEROLE, and the schema is the admin's)."""
        sandbox = cls(server, [], settings, progress, attached=attached)
        sandbox.start_seconds = start_seconds
        if not server.owns_cluster:  # a shared server: what runs that died left there
            sandbox.drop_dead_runs()
        row = server.admin.execute(
            "SELECT rolsuper OR rolcreatedb OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        # the tests connect as the admin: a role with only CREATE on the database has nothing to watch
        sandbox._may_create_server_objects = bool(row and row[0])
        from pgsandbox.template.schemas import SessionSchema
        from pgsandbox.template.schemas import describe as describe_schema

        sandbox.schema = SessionSchema(server, chain, progress)
        sandbox.schema.build()
        if progress:
            progress(describe_schema(sandbox.schema))
        # the tests' timeouts, on their connections' options: the database is not theirs to ALTER
        sandbox._timeout_options = "".join(
            f" -c{name}={value.replace(chr(92), chr(92) * 2).replace(' ', chr(92) + ' ')}"
            for name, value in sandbox.timeouts.items()
            if value
        )
        if server.test_options is not None:
            dbname, options = server.test_options
            server.test_options = (dbname, options + sandbox._timeout_options)
        return sandbox

    @property
    def timeouts(self) -> dict[str, str]:
        """The tests' timeouts (``pg_statement_timeout``, ``pg_lock_timeout``, ``pg_idle_timeout``)."""
        return {
            "statement_timeout": self.settings.statement_timeout,
            "lock_timeout": self.settings.lock_timeout,
            "idle_in_transaction_session_timeout": self.settings.idle_timeout,
        }

    def drop_dead_runs(self, grace_seconds: float | None = None) -> list[str]:
        """Drop what runs that died (a killed CI runner) left on this server, once they started longer ago than
        ``grace_seconds`` (default ``pg_reap_grace``); a progress line says what went (``pgsandbox reap``)."""
        grace = self.settings.reap_grace if grace_seconds is None else grace_seconds
        if grace < 0:
            return []
        admin = self.server.admin
        return reaper.drop_dead_runs(admin, reaper.stale_runs(admin, grace, self.server.run_id), say=self.progress)

    def _create_login(self) -> None:
        """Create the role this session's tests connect as (``pg_role``), when the admin may create roles."""
        # the tests' timeouts, on each database while they connect as the admin (their own role holds them)
        self.server.database_settings = dict(self.timeouts)
        if self.settings.role == "admin":
            return
        admin = self.server.admin
        if not roles.can_manage_roles(admin):
            if self.progress:
                user = self.server.params.get("user")
                self.progress(
                    f"tests connect as {user}: it may not create roles (CREATEROLE), or not join {roles.OWNER}, so "
                    "pgsandbox cannot give them a least-privilege role of their own"
                )
            return
        name = self.server.database_name("tests")
        try:
            with roles.changing_roles(admin):
                roles.ensure_owner(admin)
                login = roles.create_login(
                    admin,
                    name,
                    createdb=self.settings.role == "createdb",
                    label=self.server.run_label,
                    settings=self.timeouts,
                )
        except psycopg.errors.InsufficientPrivilege as error:
            if self.progress:
                user = self.server.params.get("user")
                self.progress(f"tests connect as {user}: creating their own role was refused: {error}")
            return
        self.server.log_in(login)

    # -- shared with other processes (pytest-xdist workers) -------------------------------------------------
    def handoff(self) -> dict[str, Any]:
        """What another process on this machine needs to work on this sandbox's server and templates
        (plain data, for xdist's worker input; :meth:`attach` takes it). It holds no password: its DSNs name the
        run's passfile (0600), which a worker on this machine reads."""
        run_dir = self.server.run_dir
        return {
            "dsn": self.server.dsn,
            "admin_dsn": self.server.admin_dsn,
            "local": self.server.owns_cluster,
            # a worker that cannot reach the server says whether it is still running, and how its log ends
            "run_dir": str(run_dir) if run_dir is not None else None,
            "statement_log": self.server.statement_log.handoff() if self.server.statement_log else None,
            "templates": [
                {"layer": t.layer, "name": t.name, "key": t.key, "labels": list(t.labels), "handed_over": t.handed_over}
                for t in self.templates
            ],
        }

    @classmethod
    def attach(
        cls,
        handoff: dict[str, Any],
        settings: Settings,
        progress: Progress | None = None,
        migrators: tuple[Sequence[Migrator], Sequence[Migrator]] | None = None,
    ) -> Sandbox:
        """A sandbox on the server and templates another process's :meth:`handoff` gave: it creates (and
        drops) only its own databases, under a prefix of its own. In schema isolation it migrates a schema of
        its own with ``migrators`` (migrations, seed)."""
        started = time.perf_counter()
        log = handoff.get("statement_log")
        statement_log = StatementLog(Path(log["directory"]), log["format"]) if log else None
        run_dir = handoff.get("run_dir")
        fence.allow_server(dsn for dsn in (handoff["dsn"], handoff.get("admin_dsn")) if dsn)
        server = ExternalServer.attach(
            handoff["dsn"],
            "the xdist controller's server",
            statement_log,
            handoff.get("admin_dsn"),
            local_run=Path(run_dir) if handoff["local"] and run_dir else None,
            # the controller's password first (its passfile): the command runs when that one is refused
            credentials=None if handoff["local"] else credentials_command(settings),
            credentials_first=False,
            needs_createdb=settings.isolation != "schema",
        )
        start_seconds = time.perf_counter() - started
        templates = [
            TemplateInfo(
                t["layer"], t["name"], t["key"], hit=True, labels=tuple(t["labels"]), handed_over=t["handed_over"]
            )
            for t in handoff["templates"]
        ]
        if handoff["local"] and settings.clone_strategy == "auto":
            settings = settings.replace(clone_strategy="file_copy")  # what the controller's local server takes
        if settings.isolation == "schema":
            migrations, seed = migrators or ((), ())
            try:
                chain = chain_of(migrations, seed)
                return cls._start_in_schema(server, chain, settings, progress, start_seconds, attached=True)
            except BaseException:
                server.stop()
                raise
        sandbox = cls(server, templates, settings, progress, attached=True)
        sandbox.start_seconds = start_seconds
        try:
            sandbox._create_login()
        except BaseException:
            server.stop()
            raise
        sandbox._point_env()
        return sandbox

    def _point_env(self) -> None:
        """The connection fence's libpq environment: the sandbox's server and the tests' role, no database."""
        active = fence.active()
        if active is not None:
            active.point_env(self.server.login_params)

    def session_login(self) -> SessionLogin:
        """The tests' role and a database of this session's own, for session-scoped code (see
        :class:`SessionLogin`); the database is cloned from the template on the first call."""
        if self.schema is not None and self._login is None:
            # schema isolation: a schema of its own, migrated on the first call (the tests' schema must stay
            # as its build left it); its connections' options point at it
            from pgsandbox.template.schemas import SessionSchema

            self._login_schema = SessionSchema(self.server, self.schema.chain, self.progress, kind="login")
            self._login_schema.build()
            options = f"-csearch_path={self._login_schema.search_path}{self._timeout_options}"
            self._login = SessionLogin(self.server, self._login_schema.dbname, options)
        if self._login is None:
            name = self.server.create_database(LOGIN_DATABASE, template=self._test_template(), clause=self.clone_clause)
            self._login = SessionLogin(self.server, name)
        return self._login

    # -- per test -------------------------------------------------------------------------------------
    @property
    def gone(self) -> ServerGone | None:
        """The server went away: said once, in full (:attr:`gone_at`: by which test)."""
        return self._watch.gone

    @property
    def gone_at(self) -> str:
        return self._watch.gone_at

    def open(self, isolation: str | None = None, test_id: str = "", *, reset_sequences: bool | None = None) -> Database:
        """A database for one test; give it back with :meth:`close`. Raises :class:`ServerGone` when the server
        went away: in full the first time, in one line after that. ``reset_sequences`` (default: the
        ``reset_sequences`` setting): in transaction isolation, set back the sequences the test moved."""
        self._watch.check()
        try:
            return self._open(isolation, test_id, reset_sequences)
        except (psycopg.Error, PgSandboxError) as error:
            gone = self._watch.meet(error, test_id)
            if gone is None:
                raise
            raise gone from None

    def _open(self, mode: str | None = None, test_id: str = "", reset_sequences: bool | None = None) -> Database:
        chosen = mode or self.settings.isolation
        if chosen not in ISOLATIONS:
            raise ConfigError(
                f"isolation {chosen!r} is not one of {', '.join(ISOLATIONS)}.",
                "use isolation='transaction' (rolled back, fastest), isolation='database' (a clone per test) or, "
                "for the whole session, pg_isolation = schema.",
            )
        self._check_scope_mode(test_id, chosen)
        started = time.perf_counter()
        isolation: Isolation | None = None
        first = False
        if self._clone_scopes:  # database isolation inside scoped data: a clone of the scope's database, made now
            begun = Begun(self._clone_of_scope(), None)
            self._scoped_clones.add(begun.dbname)
        else:
            isolation, first = self._isolation(chosen)
            if isolation is self._transaction:
                reset = self.settings.reset_sequences if reset_sequences is None else reset_sequences
                begun = self._transaction.begin(test_id, reset_sequences=reset)
            else:
                begun = isolation.begin(test_id)
        db = Database("database" if isolation is None else isolation.mode, begun.dbname, test_id, self.server)
        db._connection = begun.conn
        db._test.parking = self._transaction if isolation is not None and isolation is self._transaction else None
        db._test.catalog_source = self._catalog
        db._test.data_seed = self.settings.data_seed
        db._test.roles.service = self.app_roles
        if self.server.statement_log is not None:
            db._test.log_start = self.server.statement_log.position()
        # its connections may create databases (unless they are a role that may not: schema isolation's)
        if (self.settings.role != "own" or self.server.login is None) and self._may_create_server_objects:
            db._test.server_objects = server_objects(self.server.admin)
        seconds = time.perf_counter() - started
        self._counters.opened(chosen, seconds)
        if first and isolation is not None and self.progress and seconds >= SLOW_CLONE_SECONDS:
            self.progress(f"cloned {isolation.first_clone} from the template in {seconds:.2f} s ({chosen} isolation)")
        return db

    def watch(self, test_id: str, dbname: str, kind: str) -> Database:
        """A test that runs on a database pgsandbox does not isolate (Django's own test classes, on the
        session's database: their isolation is Django's): counted in the report under ``kind``, its SQL read
        from the statement log (everything run in ``dbname`` from now, which only this process's tests use).
        The handle is for the report only: it is not closed, and nothing is rolled back or dropped."""
        db = Database("database", dbname, test_id, self.server)
        if self.server.statement_log is not None:
            db._test.log_start = self.server.statement_log.position()
        self._counters.opened(kind, 0.0)
        return db

    # -- scoped data ----------------------------------------------------------------------------------
    def open_scope(
        self, scope_id: str, *, isolation: str | None = None, reset_sequences: bool | None = None
    ) -> Database:
        """Data made once for a scope (a module, class, package or the session: ``scope_id``): what is written
        through the returned handle until :meth:`close_scope` is there for every test opened meanwhile in the
        same isolation. In ``transaction`` isolation it is held by a savepoint and each test is rolled back to
        it; in ``database`` isolation it goes into a database of the scope's own, which each test's database is
        cloned from (its connections are closed first: a database being copied must be idle). Scopes nest;
        close them innermost first."""
        self._watch.check()
        mode = isolation or self.settings.isolation
        self._check_scope_mode(scope_id, mode)
        reset = self.settings.reset_sequences if reset_sequences is None else reset_sequences
        try:
            if mode == "database":
                name = self._clone_of_scope("scope")
                db = Database("database", name, scope_id, self.server)
                self._clone_scopes.append(db)
            else:
                self._isolation("transaction")
                assert self._transaction is not None
                begun = self._transaction.open_scope(scope_id, reset_sequences=reset)
                db = Database("transaction", begun.dbname, scope_id, self.server, _connection=begun.conn)
        except (psycopg.Error, PgSandboxError) as error:
            gone = self._watch.meet(error, scope_id)
            if gone is None:
                raise
            raise gone from None
        db._test.catalog_source = self._catalog
        db._test.data_seed = self.settings.data_seed
        db._test.roles.service = self.app_roles
        return db

    @property
    def transaction_scope(self) -> str | None:
        """The innermost scope whose data lives in the session database's transaction, if one is open: a
        connection of its own there (another client library's) does not see that data."""
        scopes = self._transaction.scopes if self._transaction is not None else []
        return scopes[-1].scope_id if scopes else None

    def _check_scope_mode(self, test_id: str, mode: str) -> None:
        """Scoped data lives in one isolation's databases: a test (or scope) of the other would not see it."""
        if self.schema is not None and mode == "database":
            raise _no_database_in_schema_session()
        if mode == "database" and self._transaction is not None and self._transaction.scopes:
            raise scope_of_other_mode(test_id, mode, self._transaction.scopes[-1].scope_id)
        if mode == "transaction" and self._clone_scopes:
            raise scope_of_other_mode(test_id, mode, self._clone_scopes[-1].test_id)

    def _clone_of_scope(self, kind: str = "t") -> str:
        """A new database cloned from the innermost scope's database (or, for the outermost scope, the
        template), which is made idle first."""
        template = self._test_template()
        if self._clone_scopes:
            scope = self._clone_scopes[-1]
            self._idle(scope)
            template = scope.name
        self._scoped_counter += 1
        try:
            return self.server.create_database(
                f"{kind}_scoped{self._scoped_counter}", template=template, clause=self.clone_clause
            )
        except psycopg.errors.ObjectInUse as error:  # a connection came back while the copy started
            raise clone_failed(template, error) from None

    def _idle(self, scope: Database) -> None:
        """Close the scope handle's connections and end any other connection to its database."""
        for conn in [*scope._opened, *([scope._connection] if scope._connection is not None else [])]:
            with contextlib.suppress(psycopg.Error):
                conn.close()
        scope._opened.clear()
        scope._connection = None
        terminate_connections(self.server.admin, scope.name)

    def close_scope(self, db: Database) -> list[str]:
        """Roll back (or drop) what the scope of ``db`` (from :meth:`open_scope`) made. Raises
        :class:`IsolationError` when its writes escaped (the session database is then replaced)."""
        if self.gone is not None:
            return []
        if db.isolation == "database":
            if db in self._clone_scopes:
                self._clone_scopes.remove(db)
                self._idle(db)
                self.server.drop_database(db.name)
            return []
        if self._transaction is None:
            return []
        try:
            return [finding.text for finding in self._transaction.close_scope(db.test_id)]
        except IsolationError:
            self._counters.found(ESCAPED)
            raise
        except (psycopg.Error, PgSandboxError) as error:
            gone = self._watch.meet(error, db.test_id)
            if gone is None:
                raise
            raise gone from None

    def _isolation(self, mode: str) -> tuple[Isolation, bool]:
        """The isolation of ``mode``, and whether it was made now (its first test)."""
        found = self._isolations.get(mode)
        if found is not None:
            return found, False
        made: Isolation
        if self.schema is not None or mode == "schema":
            made = self._schema_isolation(mode)
            self._isolations["schema"] = self._isolations["transaction"] = made
            return made, True
        if mode == "transaction":
            made = self._transaction = TransactionIsolation(
                self.server, self._test_template(), self.clone_clause, drop_at_close=not self.server.owns_cluster
            )
        else:
            local = self.server.owns_cluster
            from pgsandbox.isolation.database import DatabaseIsolation, clone_strategies

            strategies = clone_strategies(self.server.version, self.settings.clone_strategy, local)
            # a local server about to be removed does not need its clones dropped
            recycle = None if self.settings.recycle_clones == "auto" else False
            made = self._clones = DatabaseIsolation(self.server, self._test_template(), strategies, not local, recycle)
        self._isolations[mode] = made
        return made, True

    def _schema_isolation(self, mode: str) -> SchemaIsolation:
        """Schema isolation serves ``transaction`` too (per test, it is one); it cannot serve ``database``, and
        only a session started in it has a schema."""
        if self.schema is None:
            raise ConfigError(
                "schema isolation is chosen for the whole session (the session migrates its schema at its start), "
                f"and this one runs in {self.settings.isolation} isolation.",
                "set pg_isolation = schema (ini, --pg-isolation=schema or PGSANDBOX_ISOLATION=schema) rather than "
                "@pytest.mark.pg(isolation='schema').",
            )
        if mode == "database":
            raise _no_database_in_schema_session()
        from pgsandbox.isolation.schema import SchemaIsolation

        made = SchemaIsolation(self.server, self.schema)
        self._transaction = made
        return made

    def _test_template(self) -> str:
        """What both isolations clone: the template, or, when its objects were handed over to pgsandbox_owner,
        a copy of it whose objects this session's role already owns (roles.take_over). The take-over (30 ms
        with 100 tables) is then paid once per session rather than by every clone, and every clone has the same
        catalog rows as the next, which the escape check compares. Nobody connects to it: a database being
        copied must be idle."""
        if not self.server.handed_over:
            return self.template
        if self._owned is None:
            self._owned = self._owned_template()
        return self._owned

    def _owned_template(self) -> str:
        try:
            name = self.server.create_database("owned", template=self.template, clause=self.clone_clause)
        except psycopg.Error as error:
            raise clone_failed(self.template, error) from error
        with psycopg.connect(self.server.login_dsn_for(name), autocommit=True) as conn:
            self.server.take_over(conn)
        ident = sql.Identifier(name)
        self.server.admin.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(ident))
        terminate_connections(self.server.admin, name)  # ours may still be exiting
        return name

    def close(self, db: Database, keep: bool = False, next_test_id: str | None = None) -> list[str]:
        """End a test: roll back or drop its database (or keep it). Returns findings worth a warning; raises
        :class:`IsolationError` when the test's writes escaped its transaction, :class:`ServerGone` in full when it
        finds the server gone.

        ``next_test_id``: the next test, when it is known to use ``transaction`` isolation: its
        transaction is opened in the same round trip as this test's rollback."""
        if self.gone is not None:
            self._forget(db)
            return []
        try:
            return [finding.text for finding in self._close_checked(db, keep, next_test_id)]
        except (psycopg.Error, PgSandboxError) as error:
            gone = self._watch.meet(error, db.test_id)
            if gone is None:
                raise
            self._forget(db)
            raise gone from None

    def _forget(self, db: Database) -> None:
        """Close what a test opened on a server that is gone, without asking it anything."""
        for conn in [*db._opened, *([db._connection] if db._connection is not None else [])]:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def _close_checked(self, db: Database, keep: bool = False, next_test_id: str | None = None) -> list[Finding]:
        started = time.perf_counter()
        outside = self._guards.check(db)
        try:
            found = outside + self._end(db, keep, next_test_id)
        except IsolationError as error:
            self._counters.found(ESCAPED)
            for finding in outside:
                self._counters.found(finding.kind)
            if outside:
                raise IsolationError("\n".join([*map(str, outside), error.what]), error.fix) from None
            raise
        finally:
            self._counters.teardown_seconds += time.perf_counter() - started
        for finding in found:
            self._counters.found(finding.kind)
        return found

    def _end(self, db: Database, keep: bool, next_test_id: str | None) -> list[Finding]:
        """Hand the test's database back to the isolation that gave it (kept under a name of its own when
        ``keep``: a failed test under keep-failed)."""
        if db._test.roles.stack and db.isolation == "database":  # a block never left: its clone may serve again
            self.app_roles.set_defaults(db.name, None)
        db._test.roles.forget()
        ours: set[int] = set()  # what the test opened through pgsandbox: closed here, not leaks
        for conn in db._opened:
            with contextlib.suppress(psycopg.Error):
                if not conn.closed:
                    ours.add(conn.info.backend_pid)
                conn.close()
        if db.name in self._scoped_clones:
            return self._end_scoped_clone(db, keep, ours)
        isolation = self._isolations[db.isolation]
        kept_as = None
        not_kept: list[Finding] = []
        if (keep or db.keep) and self.schema is not None:  # every isolation of the session is its schema's
            not_kept = [not_kept_in_schema(db.test_id)]
        elif (keep or db.keep) and isolation is self._transaction and self._transaction.scopes:
            not_kept = [not_kept_in_scope(db.test_id, self._transaction.scopes[-1].scope_id)]
        elif keep or db.keep:
            kept_as = self.kept.keep(db.name if isolation.keeps_in_place else None)
        found = isolation.end(
            db.test_id, db.name, guests=db._test.guests, ours=ours, keep_as=kept_as, next_test_id=next_test_id
        )
        if kept_as:
            self.kept.label(kept_as)
        return not_kept + found

    def _end_scoped_clone(self, db: Database, keep: bool, ours: set[int]) -> list[Finding]:
        """A test's clone of a scope's database: what it left open is ended and said; dropped, or kept."""
        self._scoped_clones.discard(db.name)
        if db._connection is not None and not db._connection.closed:
            ours.add(db._connection.info.backend_pid)
            with contextlib.suppress(psycopg.Error):
                db._connection.close()
        found = end_left_open(self.server.admin, db.name, db.test_id, ours, OWN_DB)
        if keep or db.keep:
            self.server.forget_database(self.kept.keep(db.name))
            self.kept.label(db.name)
        else:
            self.server.drop_database(db.name)
        return found

    @contextlib.contextmanager
    def database(self, isolation: str | None = None, test_id: str = "script") -> Iterator[Database]:
        """:meth:`open` and :meth:`close` around a block (scripts, benchmarks)."""
        db = self.open(isolation, test_id)
        try:
            yield db
        finally:
            self.close(db)

    def _catalog(self, db: Database) -> Catalog:
        """The template's catalog, for the data factories: read once, through a connection of our own to the
        test's database (a clone of the template), and kept in the cache directory under the template's name."""

        opened: list[psycopg.Connection[Any]] = []  # one connection for all the catalog's queries, if any

        def query(sql_text: str, params: list[Any]) -> list[tuple[Any, ...]]:
            if not opened:
                opened.append(self.server.connect(db.name, autocommit=True))
                db._test.joined(opened[0].info.backend_pid)  # ours: not a connection the guards should suspect
            return opened[0].execute(sql_text, params).fetchall()

        if self.schema is not None:  # its name is the run's, its catalog names it: kept in memory only
            try:
                return for_template(self.schema.name, None, query)
            finally:
                for conn in opened:
                    conn.close()
        if self._catalogs is None:  # cache_root() checks that the directory is writable: once per session
            self._catalogs = cache_root(self.settings.cache) / "catalogs"
        try:
            return for_template(self.template, self._catalogs, query)
        finally:
            for conn in opened:
                conn.close()

    @property
    def clone_timings(self) -> dict[str, list[float]]:
        """Seconds per CREATE DATABASE of per-test clones, by strategy (empty before any database test)."""
        return self._clones.timings if self._clones is not None else {}

    # -- the session report ---------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """What this session did, as plain data (report.py): the terminal summary and ``--pg-report=json`` show
        it."""
        server = self.server
        origin, start = server.origin, server.how_started
        created, dropped = server.counts["created"], server.counts["dropped"]
        if self._clones is not None:
            created, dropped = created + self._clones.created, dropped + self._clones.dropped
        return session_report(
            ServerSummary(server.version_string, origin, start, self.start_seconds),
            self.templates,
            self._counters,
            {"created": created, "dropped": dropped, "kept": len(self.kept)},
            cache_report(self.settings.cache, self.settings.cache_max_size),
        )

    # -- stop -----------------------------------------------------------------------------------------
    @property
    def stopped(self) -> bool:
        return self._stopped

    def stop(self) -> None:
        """Drop what this session created (except kept databases) and stop or detach from the server.
        Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.gone is None:
                self._at_session_end(self._stop_on_server)
        finally:
            if self.gone is None:
                # the server can go away after the isolations closed too (an xdist worker's, when a test killed it)
                self._at_session_end(self.server.stop_keeping_databases if self.kept else self.server.stop)
            if self.gone is not None:
                self._leave_gone_server()

    def _at_session_end(self, step: Callable[[], None]) -> None:
        """Run a step of the session's end; a server found gone there is said once, as a progress line (no test
        is left to report it), and the rest of the stop asks it nothing."""
        try:
            step()
        except (psycopg.Error, PgSandboxError) as error:
            gone = self._watch.meet(error, "the end of the session")
            if gone is None:
                raise
            if self.progress:
                self.progress(str(gone))

    def _stop_on_server(self) -> None:
        for isolation in self._isolations.values():
            isolation.close()
        for schema in (self.schema, self._login_schema):
            if schema is not None:
                schema.drop()
        if not self.attached:
            release(self.server, self.templates)
        self.kept.hand_over()

    def _leave_gone_server(self) -> None:
        """Stop what runs here without asking the server anything: the clone pool's threads, the connections;
        a local server's directory (and any process of it still exiting) is removed."""
        for isolation in self._isolations.values():
            isolation.close_quietly()
        self.server.abandon()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _no_database_in_schema_session() -> ConfigError:
    return ConfigError(
        "database isolation clones a database per test, and this session runs in schema isolation "
        "(pg_isolation = schema), which creates no database.",
        "drop isolation='database' from the pg marker (in schema isolation each test is rolled back in the "
        "session's schema), or run the session in database isolation on a server where the role may create "
        "databases.",
    )


def _save_snapshot(
    server: Server, chain: Chain, templates: list[TemplateInfo], settings: Settings, progress: Progress | None
) -> None:
    """Save the cluster with the templates just built (a local server), to start from it next time."""
    started = time.perf_counter()
    stale = any(t.stale for t in templates)  # the snapshot holds the stale template
    if not server.can_save_snapshot:
        return
    server.save_snapshot(chain.final_key, replace=settings.rebuild or stale)
    for info in templates:  # the restart dropped the session's locks
        hold_in_use(server, info.name)
    if progress:
        seconds = time.perf_counter() - started
        progress(
            f"saved the cluster with its templates in {seconds:.2f} s (it is written to the cache while the tests run)"
        )


def clone_clause(server: Server, strategy: str) -> sql.Composable:
    """FILE_COPY on PostgreSQL 15+: measured 16 ms against WAL_LOG's 66 ms for a 15 MB template."""
    if server.version[0] < 15:
        return sql.SQL("")
    return sql.SQL(" STRATEGY WAL_LOG" if strategy == "wal_log" else " STRATEGY FILE_COPY")


def describe_template(info: TemplateInfo, snapshot_hit: bool) -> str:
    labels = ", ".join(info.labels)
    if info.hit:
        where = "from the cached cluster" if snapshot_hit else "already on the server"
        return f"{info.layer} template {info.short_hash} ({labels}): cache hit, {where}, nothing to migrate"
    line = f"{info.layer} template {info.short_hash} ({labels}): {info.why_built}, built in {info.seconds:.2f} s"
    if info.watched:
        line += f"; it read {', '.join(info.watched)}, not in pg_migrations_inputs: watched, a change rebuilds it"
    return line
