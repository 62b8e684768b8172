"""Sandbox: start (migrators -> server -> templates), a database per test, keep-failed, the session report, stop."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql

from pgsandbox.binaries import find_installations, missing_extension, missing_extension_advice
from pgsandbox.data.catalog import Catalog, for_template
from pgsandbox.errors import ConfigError, PgSandboxError, causes
from pgsandbox.isolation.database import Clone, ClonePool, clone_failed
from pgsandbox.isolation.server_objects import (
    OUTSIDE,
    created_since,
    made_by_test,
    outside_finding,
    server_objects,
)
from pgsandbox.isolation.transaction import (
    LEFT_OPEN,
    PREPARED,
    Finding,
    IsolationError,
    TransactionIsolation,
    app_name,
    left_open,
    rollback_prepared,
)
from pgsandbox.sandbox.database import Database, SessionLogin
from pgsandbox.server import ExternalServer, LocalServer, Server, reaper, roles, start_server
from pgsandbox.server.base import Progress, connections_to, terminate_connections
from pgsandbox.server.cache import cache_root, cache_size, default_cache_root, wait_for_cache_writes
from pgsandbox.server.statements import (
    INTERNAL,
    Position,
    Statement,
    StatementLog,
    StatementLogError,
)
from pgsandbox.server.statements import server_settings as statement_log_settings
from pgsandbox.server.statements import statements as statements_in
from pgsandbox.settings import ISOLATIONS, Settings
from pgsandbox.template import Chain, Layer, TemplateInfo, ensure_templates, load_migrators, release
from pgsandbox.template.base import MigrationError, Migrator
from pgsandbox.template.builds import hold_in_use, warm_relcache


def _require_extensions(server: Server, settings: Settings) -> None:
    """An existing server is checked for ``pg_extensions`` before any migration runs."""
    available = {str(name) for (name,) in server.admin.execute("SELECT name FROM pg_available_extensions").fetchall()}
    missing = [name for name in settings.extensions if name not in available]
    if missing:
        raise ConfigError(
            f"{settings.source_of('extensions')} asks for {', '.join(missing)}, which the server at "
            f"{describe_server(server)} does not have (pg_available_extensions).",
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
    if isinstance(server, LocalServer):
        search = find_installations(settings.bin, cache_root=cache_root(settings.cache))
        what, fix = missing_extension_advice(name, library, server.installation, search)
    else:
        what = f'the server at {describe_server(server)} cannot create the extension "{name}".'
        fix = (
            f"install it on that server (for contrib extensions such as uuid-ossp and pgcrypto: the postgresql-contrib "
            f"package of its version{f', and {library}' if library else ''}), or test on a local server "
            f'(pg_server = local) with pg_extensions = ["{name}"].'
        )
    return MigrationError(f"{error.what}\n  {what}", fix)


LEFTOVER_WAIT_SECONDS = 0.2
SLOW_CLONE_SECONDS = 0.5  # a first clone slower than this gets a progress line (big templates)

__all__ = ["Sandbox", "ServerGone"]
LOGGING_CHANGED = "server logging changed"
LOG_SETTINGS = frozenset(statement_log_settings(Path(), "jsonlog"))  # what the statement log needs
GONE_PROBE_SECONDS = 3  # connect_timeout of the probe that tells a server that went away from a failed query


class ServerGone(PgSandboxError):
    """The server went away during the run (a killed postmaster, a stopped or unreachable external server). The
    first test that meets it gets the whole story; the tests after it get one line pointing there."""


def connection_lost(error: BaseException) -> bool:
    """Whether ``error`` (or what it wraps) is a lost or refused connection, rather than a failed statement."""
    return any(isinstance(cause, (psycopg.OperationalError, psycopg.InterfaceError)) for cause in causes(error))


LOGIN_DATABASE = "login"  # the database SessionLogin names: <prefix>login


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
        self.server = server
        self.templates = templates
        self.settings = settings
        self.progress = progress
        self.attached = attached  # another process's sandbox (xdist's controller) owns server and templates
        self.template = templates[-1].name if templates else "template0"
        server.handed_over = bool(templates) and templates[-1].handed_over
        self.clone_clause = clone_clause(server, settings.clone_strategy)
        self._transaction: TransactionIsolation | None = None
        self._pool: ClonePool | None = None
        self._owned: str | None = None  # the session's copy of the template that its role owns (_test_template)
        self._kept: list[str] = []
        self._kept_counter = 0
        self._stopped = False
        self.start_seconds = 0.0  # the server's start (or attach), for the session report
        self._tests: dict[str, int] = {}
        self._setup_seconds = 0.0
        self._teardown_seconds = 0.0
        self._findings: dict[str, int] = {}
        # a local server of this run (or of the xdist controller): nobody else creates objects on it
        self.throwaway_server = isinstance(server, LocalServer)
        self._catalogs: Path | None = None  # where the data factories' catalogs are cached
        self._login: SessionLogin | None = None
        self.gone: ServerGone | None = None  # the server went away: said once, in full (gone_at: by which test)
        self._auto_conf_stamp: tuple[int, int, int] | None = None  # postgresql.auto.conf when last read
        self.gone_at = ""

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
    ) -> Sandbox:
        """Start (or attach to) the server and build the templates the cache does not have.

        ``migrations``/``seed`` default to those ``settings.migrations``/``settings.seed`` name, relative
        to ``root`` (default: the current directory).
        """
        settings = settings or Settings.from_env()
        root = (root or Path.cwd()).resolve()
        if migrations is None:
            migrations = load_migrators(settings.migrations, settings.migrations_inputs, root)
        if seed is None:
            seed = load_migrators(settings.seed, settings.migrations_inputs, root, "pg_seed")
        layers = [Layer(kind, tuple(ms)) for kind, ms in (("migrations", migrations), ("seed", seed)) if ms]
        chain = Chain(tuple(layers)) if layers else None
        snapshots = [] if settings.rebuild or chain is None else list(reversed(chain.keys))
        started = time.perf_counter()
        server = start_server(settings, progress, snapshots=snapshots)
        start_seconds = time.perf_counter() - started
        try:
            if settings.extensions and not isinstance(server, LocalServer):
                _require_extensions(server, settings)
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
                snapshot_hit = isinstance(server, LocalServer) and server.snapshot is not None
                if progress:
                    for info in templates:
                        progress(describe_template(info, snapshot_hit))
                built = [t for t in templates if not t.hit]
                if isinstance(server, LocalServer) and built:
                    started = time.perf_counter()
                    stale = any(t.stale for t in templates)  # the snapshot holds the stale template
                    server.save_snapshot(chain.final_key, replace=settings.rebuild or stale)
                    for info in templates:  # the restart dropped the session's locks
                        hold_in_use(server, info.name)
                    if progress:
                        seconds = time.perf_counter() - started
                        progress(
                            f"saved the cluster with its templates in {seconds:.2f} s "
                            "(it is written to the cache while the tests run)"
                        )
                if isinstance(server, LocalServer):
                    warm_relcache(server, templates[-1].name)
            sandbox = cls(server, templates, settings, progress)
            sandbox.start_seconds = start_seconds
            if not isinstance(server, LocalServer):
                sandbox.reap()
            sandbox._log_in()
            return sandbox
        except BaseException as error:
            server.stop()
            if isinstance(error, MigrationError):
                explained = _explain_missing_extension(error, server, settings)
                if explained is not None:
                    raise explained from error
            raise

    @property
    def timeouts(self) -> dict[str, str]:
        """The tests' timeouts (``pg_statement_timeout``, ``pg_lock_timeout``, ``pg_idle_timeout``)."""
        return {
            "statement_timeout": self.settings.statement_timeout,
            "lock_timeout": self.settings.lock_timeout,
            "idle_in_transaction_session_timeout": self.settings.idle_timeout,
        }

    def reap(self, grace_seconds: float | None = None) -> list[str]:
        """Drop what runs that died (a killed CI runner) left on this server, once they started longer ago than
        ``grace_seconds`` (default ``pg_reap_grace``); a progress line says what went."""
        grace = self.settings.reap_grace if grace_seconds is None else grace_seconds
        if grace < 0:
            return []
        admin = self.server.admin
        return reaper.reap(admin, reaper.stale_runs(admin, grace, self.server.run_id), say=self.progress)

    def _log_in(self) -> None:
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
    def describe(self) -> dict[str, Any]:
        """What another process on this machine needs to work on this sandbox's server and templates
        (plain data, for xdist's worker input). It holds no password: its DSNs name the run's passfile (0600),
        which a worker on this machine reads."""
        return {
            "dsn": self.server.dsn,
            "admin_dsn": self.server.admin_dsn,
            "local": isinstance(self.server, LocalServer),
            # a worker that cannot reach the server says whether it is still running, and how its log ends
            "run_dir": str(self.server.run.path) if isinstance(self.server, LocalServer) else None,
            "statement_log": self.server.statement_log.describe() if self.server.statement_log else None,
            "templates": [
                {"layer": t.layer, "name": t.name, "key": t.key, "labels": list(t.labels), "handed_over": t.handed_over}
                for t in self.templates
            ],
        }

    @classmethod
    def attach(cls, description: dict[str, Any], settings: Settings, progress: Progress | None = None) -> Sandbox:
        """A sandbox on the server and templates another process's :meth:`describe` gave: it creates (and
        drops) only its own databases, under a prefix of its own."""
        started = time.perf_counter()
        log = description.get("statement_log")
        statement_log = StatementLog(Path(log["directory"]), log["format"]) if log else None
        server = ExternalServer.attach(
            description["dsn"], "the xdist controller's server", statement_log, description.get("admin_dsn")
        )
        start_seconds = time.perf_counter() - started
        templates = [
            TemplateInfo(
                t["layer"], t["name"], t["key"], hit=True, labels=tuple(t["labels"]), handed_over=t["handed_over"]
            )
            for t in description["templates"]
        ]
        if description["local"] and settings.clone_strategy == "auto":
            settings = settings.replace(clone_strategy="file_copy")  # what the controller's local server takes
        sandbox = cls(server, templates, settings, progress, attached=True)
        sandbox.start_seconds = start_seconds
        sandbox.throwaway_server = bool(description["local"])
        try:
            sandbox._log_in()
        except BaseException:
            server.stop()
            raise
        return sandbox

    def session_login(self) -> SessionLogin:
        """The tests' role and a database of this session's own, for session-scoped code (see
        :class:`SessionLogin`); the database is cloned from the template on the first call."""
        if self._login is None:
            name = self.server.create_database(LOGIN_DATABASE, template=self._test_template(), clause=self.clone_clause)
            self._login = SessionLogin(self.server, name)
        return self._login

    def adopt_kept(self, names: Sequence[str]) -> None:
        """Databases other processes kept on this sandbox's server: a local server then keeps running."""
        self._kept.extend(names)

    # -- per test -------------------------------------------------------------------------------------
    def open(self, isolation: str | None = None, test_id: str = "") -> Database:
        """A database for one test; give it back with :meth:`close`. Raises :class:`ServerGone` when the server
        went away: in full the first time, in one line after that."""
        self._check_not_gone()
        try:
            return self._open(isolation, test_id)
        except (psycopg.Error, PgSandboxError) as error:
            gone = self._gone(error, test_id)
            if gone is None:
                raise
            raise gone from None

    def _check_not_gone(self) -> None:
        if self.gone is not None:
            raise ServerGone(
                f"the PostgreSQL server went away earlier in this run (see the first error, at {self.gone_at}).", ""
            )

    def _gone(self, error: BaseException, test_id: str) -> ServerGone | None:
        """When ``error`` is a lost connection and the server is indeed gone: the one full message about it."""
        if isinstance(error, ServerGone):
            return error
        if not connection_lost(error):
            return None
        found = self._why_gone()
        if found is None:
            return None
        what, tail = found
        local = isinstance(self.server, LocalServer) or self.throwaway_server
        self.gone_at = test_id
        self.gone = ServerGone(
            f"{what}; {test_id} met it.\n  The server's log ends with:\n{tail}"
            if tail
            else f"{what}; {test_id} met it.",
            (
                "a local server stops only when something kills it (kill -9, the out-of-memory killer, a full "
                "disk or /dev/shm): look at its log above, then run again."
                if local
                else "check that the server is running and reachable (a restart, a failover, a network or proxy cut), "
                "then run again; a later run's reaper drops what this one created there (pg_reap_grace)."
            )
            + " Every later test that needs a database errors at once, pointing here.",
        )
        return self.gone

    def _why_gone(self) -> tuple[str, str] | None:
        """(what happened, the end of the server's log when it is on this machine), or None when the server
        still answers."""
        server = self.server
        tail = ""
        if isinstance(server, LocalServer):
            code = server.exited
            if code is not None:
                how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
                return (
                    f"the local PostgreSQL server (pid {server.pid}) exited during the run ({how})",
                    server.log_tail(),
                )
        try:
            with server.connect(connect_timeout=GONE_PROBE_SECONDS):
                return None
        except psycopg.OperationalError as probe:
            reason = str(probe).strip().splitlines()[0] if str(probe).strip() else type(probe).__name__
        if self.throwaway_server and server.statement_log is not None:  # an xdist worker: the controller's server
            from pgsandbox.server import runs
            from pgsandbox.server.local import log_tail

            tail = log_tail(runs.RunDir(server.statement_log.directory.parent))
        return f"the PostgreSQL server at {describe_server(server)} stopped answering during the run ({reason})", tail

    def _open(self, isolation: str | None = None, test_id: str = "") -> Database:
        chosen = isolation or self.settings.isolation
        if chosen not in ISOLATIONS:
            raise ConfigError(
                f"isolation {chosen!r} is not one of {', '.join(ISOLATIONS)}.",
                "use isolation='transaction' (rolled back, fastest) or isolation='database' (a clone per test).",
            )
        started = time.perf_counter()
        first = (self._transaction if chosen == "transaction" else self._pool) is None
        if chosen == "transaction":
            if self._transaction is None:
                self._transaction = TransactionIsolation(self.server, self._test_template(), self.clone_clause)
            conn = self._transaction.begin(test_id)
            assert self._transaction.dbname
            db = Database(
                "transaction",
                self._transaction.dbname,
                test_id,
                self.server,
                _connection=conn,
            )
            db._test.parking = self._transaction
        else:
            if self._pool is None:
                strategies = clone_strategies(self.server, self.settings)
                self._pool = ClonePool(self.server, self._test_template(), strategies)
            clone: Clone = self._pool.acquire()
            db = Database("database", clone.name, test_id, self.server, _connection=clone.conn)
            if clone.conn is not None:
                clone.conn.autocommit = True  # one round trip, no transaction left open
                clone.conn.execute(INTERNAL + "SELECT set_config('application_name', %s, false)", [app_name(test_id)])
                clone.conn.autocommit = False
                db._opened.append(clone.conn)
        db._test.catalog_source = self._catalog
        db.data_seed = self.settings.data_seed
        if self.server.statement_log is not None:
            db.log_start = self.server.statement_log.position()
        if self.settings.role != "own" or self.server.login is None:  # its connections may create databases
            db._test.server_objects = server_objects(self.server.admin)
        seconds = time.perf_counter() - started
        self._tests[chosen] = self._tests.get(chosen, 0) + 1
        self._setup_seconds += seconds
        if first and self.progress and seconds >= SLOW_CLONE_SECONDS:
            what = "the session database" if chosen == "transaction" else "the first database of a test"
            self.progress(f"cloned {what} from the template in {seconds:.2f} s ({chosen} isolation)")
        return db

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

    def keep_name(self, number: int | None = None) -> str:
        """The name a kept database of a ``transaction`` test gets; by default the next one's (known before
        the test's teardown, for its report)."""
        return self.server.database_name(f"failed{number or self._kept_counter + 1}")

    def close(self, db: Database, keep: bool = False, next_test_id: str | None = None) -> list[str]:
        """End a test (see :meth:`_close`); raises :class:`ServerGone` in full when it finds the server gone."""
        if self.gone is not None:
            self._forget(db)
            return []
        try:
            return self._close_checked(db, keep, next_test_id)
        except (psycopg.Error, PgSandboxError) as error:
            gone = self._gone(error, db.test_id)
            if gone is None:
                raise
            self._forget(db)
            raise gone from None

    def _may_change_logging(self, db: Database) -> bool:
        """Whether ``db``'s test could have changed the statement log's settings (ALTER SYSTEM needs a
        superuser: pg_admin, or tests that connect as the admin) on a server whose log pgsandbox reads."""
        return (
            self.throwaway_server
            and self.server.statement_log is not None
            and ("pg_admin" in db._test.guests.committing or self.server.login is None)
        )

    def _restore_logging(self, test_id: str) -> list[str]:
        """Put back the logging settings the statement log needs if a test changed them with ALTER SYSTEM
        (``log_destination = stderr`` and a reload would silently take the SQL section from every later
        failure): ALTER SYSTEM RESET them and reload. One query when nothing changed (a few ms: it reads the
        configuration files), only after tests that could have."""
        assert self.server.statement_log is not None
        # ALTER SYSTEM rewrites postgresql.auto.conf: a stat (microseconds) instead of a query (0.8 ms) per test
        auto_conf = self.server.statement_log.directory.parent / "data" / "postgresql.auto.conf"
        with contextlib.suppress(OSError):
            stat = auto_conf.stat()
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if stamp == self._auto_conf_stamp:
                return []
            self._auto_conf_stamp = stamp
        admin = self.server.admin
        names = sorted(LOG_SETTINGS)
        changed = [
            str(name)
            for (name,) in admin.execute(
                "SELECT DISTINCT name FROM pg_file_settings WHERE sourcefile LIKE '%%/postgresql.auto.conf' "
                "AND name = ANY(%s) ORDER BY 1",
                [names],
            ).fetchall()
        ]
        if not changed:
            return []
        for name in changed:
            admin.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
        admin.execute("SELECT pg_reload_conf()")
        return [
            Finding.of(
                LOGGING_CHANGED,
                f"{test_id} changed the server's logging with ALTER SYSTEM ({', '.join(changed)}), which pgsandbox's "
                "statement log needs (the SQL of failed tests, pg_queries); pgsandbox reset it (ALTER SYSTEM RESET, "
                "pg_reload_conf()). To run the local server with other settings, use pg_server_settings "
                "(--pg-server-settings name=value) rather than a test.",
            )
        ]

    def _forget(self, db: Database) -> None:
        """Close what a test opened on a server that is gone, without asking it anything."""
        for conn in [*db._opened, *([db._connection] if db._connection is not None else [])]:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def _close_checked(self, db: Database, keep: bool = False, next_test_id: str | None = None) -> list[str]:
        started = time.perf_counter()
        outside = self._outside(db) if db._test.server_objects is not None else []
        if self._may_change_logging(db):
            outside += self._restore_logging(db.test_id)
        try:
            findings = outside + self._close(db, keep, next_test_id)
        except IsolationError as error:
            self._found("commits that escaped the rollback")
            for _ in outside:
                self._found(OUTSIDE)
            if outside:
                raise IsolationError("\n".join([*outside, error.what]), error.fix) from None
            raise
        finally:
            self._teardown_seconds += time.perf_counter() - started
        for finding in findings:
            self._found(finding.kind if isinstance(finding, Finding) else LEFT_OPEN)
        return findings

    def _outside(self, db: Database) -> list[str]:
        """Databases, roles and tablespaces the test created on the server (server_objects.py)."""
        assert db._test.server_objects is not None
        new = created_since(self.server.admin, db._test.server_objects)
        if new and self.attached:
            # an xdist worker: the others create objects at the same time; the test's are those it made
            log = self.server.statement_log
            if log is None or db.log_start is None:
                return []  # nothing says whose they are: not this test's to report, nor to drop
            try:
                entries, _, _ = log.collect(db.log_start, self.server.admin)
            except StatementLogError:
                return []
            new = made_by_test(new, entries, db.scope)
        return outside_finding(self.server.admin, new, db.test_id, drop=self.throwaway_server)

    def _found(self, kind: str) -> None:
        self._findings[kind] = self._findings.get(kind, 0) + 1

    def _close(self, db: Database, keep: bool = False, next_test_id: str | None = None) -> list[str]:
        """End a test: roll back or drop its database (or keep it). Returns findings worth a warning;
        raises :class:`IsolationError` when the test's writes escaped its transaction.

        ``next_test_id``: the next test, when it is known to use ``transaction`` isolation: its
        transaction is opened in the same round trip as this test's rollback."""
        kept_as = None
        keep = keep or db.keep
        if keep:
            self._kept_counter += 1
            kept_as = db.name if db.isolation == "database" else self.keep_name(self._kept_counter)
            self._kept.append(kept_as)
        if db.isolation == "transaction":
            assert self._transaction is not None
            for conn in db._opened:  # admin connections (connect_admin); the test's own is not in the list
                with contextlib.suppress(psycopg.Error):
                    conn.close()
            findings = self._transaction.end(db.test_id, kept_as, next_test_id, db._test.guests)
            if kept_as:
                self._label_kept(kept_as)
            return findings
        assert self._pool is not None
        ours = set(db._test.guests.pids)
        for conn in db._opened:
            with contextlib.suppress(psycopg.Error):
                if not conn.closed:
                    ours.add(conn.info.backend_pid)
                conn.close()
        findings = self._left_behind(db, ours)
        self._pool.release(db.name, keep=keep)
        if kept_as:
            self._label_kept(kept_as)
        return findings

    def _label_kept(self, name: str) -> None:
        """A kept database says so in its comment: the reaper leaves it to its user."""
        label = {**json.loads(self.server.run_label), "kept": True}
        self.server.admin.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(json.dumps(label)))
        )

    def _left_behind(self, db: Database, ours: set[int]) -> list[str]:
        """Connections the test left open (terminated) and transactions it prepared (rolled back: they would
        keep its database from being dropped). One query in the common case, where there are neither."""
        row = self.server.admin.execute(
            "SELECT pg_stat_get_db_numbackends(d.oid), "
            "(SELECT count(*) FROM pg_prepared_xact() p WHERE p.dbid = d.oid) FROM pg_database d WHERE datname = %s",
            [db.name],
        ).fetchone()
        findings: list[str] = []
        if row and row[0]:
            left = connections_to(self.server.admin, db.name, ours, LEFTOVER_WAIT_SECONDS)
            if left:
                terminate_connections(self.server.admin, db.name)
                findings += left_open(db.test_id, left, "its database")
        if row and row[1]:
            with self.server.connect(db.name, autocommit=True) as conn:
                gids = rollback_prepared(conn)
            findings.append(
                Finding.of(
                    PREPARED,
                    f"{db.test_id} left {len(gids)} prepared transaction(s) ({', '.join(gids)}) in its database; "
                    "pgsandbox rolled them back.",
                )
            )
        return findings

    @contextlib.contextmanager
    def database(self, isolation: str | None = None, test_id: str = "script") -> Iterator[Database]:
        db = self.open(isolation, test_id)
        try:
            yield db
        finally:
            self.close(db)

    # -- keep-failed ----------------------------------------------------------------------------------
    def psql_command(self, dbname: str) -> str:
        from pgsandbox.binaries import working_psql

        params = self.server.params
        bindir = self.server.installation.bindir if isinstance(self.server, LocalServer) else None
        psql = working_psql(bindir) or "psql"  # none that runs here: the user's own, once installed
        target = (
            " ".join(f"{key}={params[key]}" for key in ("host", "port", "user") if params.get(key))
            + f" dbname={dbname}"
        )
        return f"PGPASSFILE={self.server.kept_passfile} {psql} '{target}'"

    def _catalog(self, db: Database) -> Catalog:
        """The template's catalog, for the data factories: read once, through a connection of our own to the
        test's database (a clone of the template), and kept in the cache directory under the template's name."""

        opened: list[psycopg.Connection[Any]] = []  # one connection for all the catalog's queries, if any

        def query(sql_text: str, params: list[Any]) -> list[tuple[Any, ...]]:
            if not opened:
                opened.append(self.server.connect(db.name, autocommit=True))
                db._test.joined(opened[0].info.backend_pid)  # ours: not a connection the guards should suspect
            return opened[0].execute(sql_text, params).fetchall()

        if self._catalogs is None:  # cache_root() checks that the directory is writable: once per session
            self._catalogs = cache_root(self.settings.cache) / "catalogs"
        try:
            return for_template(self.template, self._catalogs, query)
        finally:
            for conn in opened:
                conn.close()

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def clone_timings(self) -> dict[str, list[float]]:
        """Seconds per CREATE DATABASE of per-test clones, by strategy (empty before any database test)."""
        return {strategy: list(times) for strategy, times in self._pool.timings.items()} if self._pool else {}

    @property
    def kept(self) -> list[str]:
        return list(self._kept)

    def lock_holders(self, dbname: str) -> list[str]:
        """Sessions in a transaction on ``dbname`` and the locks they hold, described for a failure report
        (from a connection to that database: relation names resolve only there)."""
        try:
            with self.server.connect(dbname, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT a.pid, a.application_name, a.state, "
                    "round(extract(epoch FROM now() - a.xact_start)::numeric, 1), left(a.query, 300), "
                    "string_agg(DISTINCT l.mode || CASE WHEN l.relation IS NOT NULL "
                    "THEN ' on ' || l.relation::regclass::text ELSE ' (' || l.locktype || ')' END, ', ') "
                    "FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid AND l.granted "
                    "WHERE a.datname = current_database() AND a.xact_start IS NOT NULL "
                    "AND a.pid <> pg_backend_pid() AND l.locktype <> 'virtualxid' "
                    "GROUP BY 1, 2, 3, 4, 5 ORDER BY 4 DESC"
                ).fetchall()
        except psycopg.Error as error:
            return [f"(could not look: {error})"]
        return [
            f"pid {pid} ({app or 'no application_name'}), {state}, in a transaction for {age} s, "
            f"holding {locks}; its last statement: {query!r}"
            for pid, app, state, age, query, locks in rows
        ]

    def sql_of(self, db: Database, since: Position | None = None) -> tuple[list[Statement], Position, bool]:
        """The statements ``db``'s test ran since ``since`` (default: its start) in the order they ran, from
        the server's statement log; where the log stands after them; whether the log was complete since then.
        Raises :class:`StatementLogError` when there is no statement log (an external server, pg_sql_log=off)."""
        log = self.server.statement_log
        start = since or db.log_start
        if log is None or start is None:
            why = "pg_sql_log is off" if isinstance(self.server, LocalServer) or log else "the server is external"
            raise StatementLogError(
                f"there is no statement log to read: {why}.",
                "pgsandbox logs statements on the local server it starts (pg_sql_log = auto); drop pg_dsn "
                "and pg_server = external for these tests.",
            )
        entries, end, complete = log.collect(start, self.server.admin)
        return statements_in(entries, db.scope), end, complete

    def describe_deadlock(self, detail: str) -> str:
        """PostgreSQL's deadlock detail (each process, what it waited for and its statement), with the
        ``application_name`` of each process that is still connected: which test it belonged to."""
        pids = sorted({int(pid) for pid in re.findall(r"[Pp]rocess (\d+)", detail)})
        found: dict[int, tuple[str, str]] = {}
        if pids:
            with contextlib.suppress(psycopg.Error):
                rows = self.server.admin.execute(
                    "SELECT pid, application_name, left(query, 300) FROM pg_stat_activity WHERE pid = ANY(%s)",
                    [pids],
                ).fetchall()
                found = {int(pid): (str(name), str(query)) for pid, name, query in rows}
        who = [
            f"process {pid} ({found[pid][0] or 'no application_name'}), its last statement: {found[pid][1]!r}"
            if pid in found
            else f"process {pid}: gone (its connection was closed)"
            for pid in pids
        ]
        return (detail or "(PostgreSQL gave no detail)") + ("\n" + "\n".join(who) if who else "")

    # -- the session report ---------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """What this session did, as plain data: the terminal summary and ``--pg-report=json`` show it."""
        server = self.server
        if isinstance(server, LocalServer):
            origin = server.installation.describe()
            start = "from the cached cluster" if server.snapshot is not None else "from the initdb cache"
        else:
            origin = f"PostgreSQL {server.version_string} on an existing server ({describe_server(server)})"
            start = "attached"
        created, dropped = server.counts["created"], server.counts["dropped"]
        if self._pool is not None:
            created, dropped = created + self._pool.created, dropped + self._pool.dropped
        return {
            "server": {
                "version": server.version_string,
                "origin": origin,
                "start": start,
                "start_seconds": round(self.start_seconds, 3),
            },
            "templates": [
                {
                    "layer": info.layer,
                    "hash": info.short_hash,
                    "labels": list(info.labels),
                    "hit": info.hit,
                    "build_seconds": round(info.seconds, 3),
                }
                for info in self.templates
            ],
            "tests": dict(self._tests),
            "setup_seconds": round(self._setup_seconds, 3),
            "teardown_seconds": round(self._teardown_seconds, 3),
            "databases": {"created": created, "dropped": dropped, "kept": len(self._kept)},
            "findings": dict(self._findings),
            "cache": self._cache_report(),
        }

    def _cache_report(self) -> dict[str, Any]:
        """The cache's size now and its bound (pg_cache_max_size), once this process's writes are in it."""
        wait_for_cache_writes()
        root = self.settings.cache or default_cache_root()
        return {
            "path": str(root),
            "bytes": cache_size(root) if root.is_dir() else 0,
            "max_bytes": self.settings.cache_max_size,
        }

    # -- stop -----------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Drop what this session created (except kept databases) and stop or detach from the server.
        Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        local = isinstance(self.server, LocalServer)
        try:
            if self.gone is None:
                try:
                    self._stop_on_server(local)
                except (psycopg.Error, PgSandboxError) as error:
                    gone = self._gone(error, "the end of the session")
                    if gone is None:
                        raise
                    if self.progress:  # no test met it: say it here, once
                        self.progress(str(gone))
        finally:
            if self.gone is not None:
                self._leave_gone_server()
            elif local and self._kept:
                assert isinstance(self.server, LocalServer)
                self.server.detach()
            else:
                if self._kept and isinstance(self.server, ExternalServer):
                    self.server.keep_secrets()  # the kept databases' psql command names its passfile
                self.server.stop()

    def _stop_on_server(self, local: bool) -> None:
        if self._pool is not None:
            self._pool.close(drop_all=not local)
        if self._transaction is not None:
            self._transaction.close()
        if not self.attached:
            release(self.server, self.templates)
        for name in self._kept:
            self.server.forget_database(name)
            if self.server.login is not None:  # it owns the database and its objects, and is dropped below
                with contextlib.suppress(psycopg.Error), self.server.connect(name, autocommit=True) as conn:
                    roles.give_back(conn, self.server.login)

    def _leave_gone_server(self) -> None:
        """Stop what runs here without asking the server anything: the clone pool's threads, the connections;
        a local server's directory (and any process of it still exiting) is removed."""
        if self._pool is not None:
            with contextlib.suppress(Exception):
                self._pool.close(drop_all=False)
        if self._transaction is not None:
            self._transaction._close_parked_quietly()
        if isinstance(self.server, LocalServer):
            self.server.stop()
        else:
            self.server._close_admin()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def clone_clause(server: Server, strategy: str) -> sql.Composable:
    """FILE_COPY on PostgreSQL 15+: measured 16 ms against WAL_LOG's 66 ms for a 15 MB template."""
    if server.version[0] < 15:
        return sql.SQL("")
    return sql.SQL(" STRATEGY WAL_LOG" if strategy == "wal_log" else " STRATEGY FILE_COPY")


def clone_strategies(server: Server, settings: Settings) -> list[str]:
    """Strategies for per-test clones. A local server runs with fsync off, where FILE_COPY's checkpoints
    cost little (16 ms against 66 ms on tmpfs); on someone else's server the storage and settings are
    unknown, so the clone pool tries both and keeps the faster."""
    if server.version[0] < 15:
        return []
    if settings.clone_strategy != "auto":
        return [settings.clone_strategy.upper()]
    return ["FILE_COPY"] if isinstance(server, LocalServer) else ["FILE_COPY", "WAL_LOG"]


def merge_reports(main: dict[str, Any], others: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The controller's report with what its xdist workers counted added in."""
    merged: dict[str, Any] = json.loads(json.dumps(main))
    for other in others:
        for key in ("setup_seconds", "teardown_seconds"):
            merged[key] = round(merged[key] + other[key], 3)
        for section in ("tests", "databases", "findings"):
            for name, count in other[section].items():
                merged[section][name] = merged[section].get(name, 0) + count
    return merged


def describe_server(server: Server) -> str:
    params = server.params
    return f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"


def describe_template(info: TemplateInfo, snapshot_hit: bool) -> str:
    labels = ", ".join(info.labels)
    if info.hit:
        where = "from the cached cluster" if snapshot_hit else "already on the server"
        return f"{info.layer} template {info.short_hash} ({labels}): cache hit, {where}, nothing to migrate"
    why = f"{', '.join(info.stale)} changed since the last build" if info.stale else "cache miss"
    line = f"{info.layer} template {info.short_hash} ({labels}): {why}, built in {info.seconds:.2f} s"
    if info.watched:
        line += f"; it read {', '.join(info.watched)}, not in pg_migrations_inputs: watched, a change rebuilds it"
    return line
