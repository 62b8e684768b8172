"""A throwaway server: a copy of the cached cluster, started directly and polled until ready."""

from __future__ import annotations

import atexit
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from filelock import BaseFileLock
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgsandbox.binaries import Installation
from pgsandbox.common import trace
from pgsandbox.common.progress import Progress
from pgsandbox.common.redact import Secret, redact
from pgsandbox.common.staging import make_staging_dir
from pgsandbox.errors import ServerStartError
from pgsandbox.server import clusters, idle_watch, keepalive, launch, osuser, reaper, runs, spares, statement_log
from pgsandbox.server.base import Server
from pgsandbox.server.launch import (
    SOCKET_PORT,
    TEST_SETTINGS,
    _connect_host,
    _kill,
    _reap_orphans,
    _start_listening,
    log_tail,
)
from pgsandbox.server.passfile import FILE_NAME, NO_PASSWORD, Passfile
from pgsandbox.server.roles import drop_login
from pgsandbox.server.scram import scram_verifier
from pgsandbox.server.tags import QUIET_OPTIONS
from pgsandbox.settings import Settings

STOP_TIMEOUT = 15.0


class LocalServer(Server):
    """A private PostgreSQL server for one run; :meth:`stop` removes every trace of it."""

    kind = "local"
    owns_cluster = True
    can_save_snapshot = True
    installation: Installation

    def __init__(
        self,
        conninfo: str,
        version_num: int,
        run_id: str,
        *,
        installation: Installation,
        run: runs.RunDir,
        process: subprocess.Popen[bytes] | keepalive.Postmaster,
        tcp: tuple[str, int] | None,
        account: osuser.Account,
        snapshots: Path,
        snapshot: str | None,
        admin_conninfo: str | None = None,
        passfile: Passfile,
    ) -> None:
        super().__init__(conninfo, version_num, run_id, admin_conninfo, passfile=passfile)
        self.installation = installation
        self.account = account
        self.snapshots = snapshots
        self.snapshot = snapshot
        self.fresh_cluster = False  # its cluster came from initdb in this start, not from the cache
        self._build_lock: BaseFileLock | None = None
        self.run = run
        self.process = process
        self.tcp = tcp
        # what a restart (save_snapshot) needs to start it again: its settings and the statement log's
        self._start_settings: tuple[Settings, dict[str, str]] = (Settings(), {})
        self._stopped = False
        # pg_keep_alive: the server outlives this run (keepalive.py); attached: an earlier run started it
        self.lease: keepalive.Lease | None = None
        self.attached_kept = False
        self.copy_ahead: spares.CopyAhead | None = None  # the next start's copy of the cluster (spares.py)
        atexit.register(self.stop)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.run.log

    @property
    def run_dir(self) -> Path:
        return self.run.path

    @property
    def origin(self) -> str:
        return self.installation.describe()

    @property
    def drops_databases_later(self) -> bool:
        return self.lease is not None and self.lease.watcher_cleans_up

    @property
    def how_started(self) -> str:
        if self.attached_kept:
            return "attached to the server an earlier run kept alive (pg_keep_alive)"
        if self.snapshot is not None:
            return "from the cached cluster"
        return "after initdb" if self.fresh_cluster else "from the initdb cache"

    @property
    def snapshot_hit(self) -> bool:
        return self.snapshot is not None

    @classmethod
    def start(
        cls,
        settings: Settings | None = None,
        progress: Progress | None = None,
        snapshots: Sequence[str] = (),
        launched: launch.Launched | None = None,
    ) -> LocalServer:
        """Start a server from the cached cluster, or from the first of ``snapshots`` the cache holds.

        A snapshot is a cluster saved by :meth:`save_snapshot` after templates were built in it: starting
        from one makes those templates a cache hit without running any migration. ``launched``: its postgres,
        already started (:func:`launch.launch`, without psycopg), which this connects to.
        """
        settings = settings or Settings()
        if launched is None:
            prepared = launch.prepare(settings, progress)
            key = ""
            if settings.keep_alive:
                key = _keep_alive_key(settings, prepared)
                kept = cls._attach_kept(
                    settings,
                    prepared.installation,
                    prepared.account,
                    prepared.root,
                    prepared.base,
                    key,
                    snapshots,
                    progress,
                )
                if kept is not None:
                    trace.mark("server: attached to a kept-alive server")
                    return kept
            launched = launch.launch(settings, prepared, list(snapshots), progress)
        else:
            key = _keep_alive_key(settings, launched.prepared) if settings.keep_alive else ""
        server = cls._launch(settings, launched)
        trace.mark("server: connected")
        server.copy_ahead, launched.copy_ahead = launched.copy_ahead, None
        server.snapshots = launched.snapshot_dir
        server.snapshot = launched.snapshot
        server.fresh_cluster = launched.fresh
        server._build_lock, launched.build_lock = launched.build_lock, None
        if settings.keep_alive:
            server.lease = keepalive.begin(
                launched.run, key, settings.keep_alive, server.tcp, snapshots[:1], server.installation, SOCKET_PORT
            )
        return server

    @classmethod
    def _attach_kept(
        cls,
        settings: Settings,
        installation: Installation,
        account: osuser.Account,
        root: Path,
        base: Path,
        key: str,
        snapshots: Sequence[str],
        progress: Progress | None,
    ) -> LocalServer | None:
        """The server an earlier run kept alive for these binaries and settings (``pg_keep_alive``), if one is
        idle; it gets a new superuser password and loses what earlier runs left on it. One whose runs had other
        templates is not taken when the cache has a cluster with this run's (``snapshots``): starting from that
        costs less than a migration."""
        keepalive.sweep([base])
        snapshot_dir = clusters.snapshot_dir(root, installation, settings.initdb_args)
        cached = bool(snapshots) and (snapshot_dir / snapshots[0][:32] / "ready").exists()
        lease = keepalive.find([base], key, settings.keep_alive, snapshots[:1], cached)
        if lease is None:
            return None
        try:
            server = cls._adopt(settings, installation, account, lease)
        except (psycopg.Error, OSError, ServerStartError) as error:
            keepalive.discard(lease)
            if progress:
                progress(
                    f"stopped the server kept alive in {lease.run.path}, which failed to serve ({redact(str(error))})"
                )
            return None
        server.snapshots = snapshot_dir
        if progress:
            progress(f"attached to the server kept alive in {lease.run.path} (pg_keep_alive)")
        return server

    @classmethod
    def _adopt(
        cls, settings: Settings, installation: Installation, account: osuser.Account, lease: keepalive.Lease
    ) -> LocalServer:
        run = lease.run
        previous = keepalive.previous_superuser_password(run)
        pid = idle_watch.postmaster(run.path)
        if previous is None or pid is None:
            raise ServerStartError(f"the kept-alive server in {run.path} has no superuser password or postmaster", "")
        log_format = statement_log.choose_format(settings.sql_log, installation.major)
        log_settings = statement_log.server_settings(run.path / "log", log_format) if log_format else {}
        tcp = keepalive.tcp_of(lease)
        # the previous run's passwords go: the superuser gets a new one, in this run's passfile only
        access = _new_superuser_password(run, tcp, previous, quiet=bool(log_format))
        admin = access[3]
        try:
            if _altered_system(run):  # a test's ALTER SYSTEM does not outlive its run
                admin.execute("ALTER SYSTEM RESET ALL")
                admin.execute("SELECT pg_reload_conf()")
            run_id = runs.new_run_id()
            # what a run killed before its end left: its databases and role (one query when there are none)
            reaper.drop_dead_runs(admin, reaper.stale_runs(admin, 0, run_id))
        except BaseException:
            admin.close()
            raise
        postmaster = keepalive.Postmaster(pid)
        logs = (log_format, log_settings)
        server = cls._serving(settings, installation, account, run, run_id, postmaster, tcp, access, logs)
        server.lease = lease
        server.attached_kept = True
        return server

    @classmethod
    def _launch(cls, settings: Settings, launched: launch.Launched) -> LocalServer:
        """The server object of a postmaster just started: the superuser gets a password of this run's."""
        run, log_format = launched.run, launched.log_format
        try:
            password = Secret(launched.cached_password)
            access = _new_superuser_password(run, launched.tcp, password, quiet=bool(log_format))
        except BaseException:
            launched.discard()
            raise
        logs = (log_format, launched.log_settings)
        installation, account = launched.prepared.installation, launched.prepared.account
        process, tcp = launched.process, launched.tcp
        return cls._serving(settings, installation, account, run, launched.run_id, process, tcp, access, logs)

    @classmethod
    def _serving(
        cls,
        settings: Settings,
        installation: Installation,
        account: osuser.Account,
        run: runs.RunDir,
        run_id: str,
        process: subprocess.Popen[bytes] | keepalive.Postmaster,
        tcp: tuple[str, int] | None,
        access: tuple[Passfile, str, str, psycopg.Connection[Any]],
        logs: tuple[str | None, dict[str, str]],
    ) -> LocalServer:
        """The server object of a postmaster that serves, with its admin connection (_new_superuser_password)
        and its statement log (``logs``: its format, None for none, and its server settings)."""
        passfile, admin_conninfo, conninfo, admin = access
        server = cls(
            conninfo,
            admin.info.server_version,
            run_id,
            installation=installation,
            run=run,
            process=process,
            tcp=tcp,
            account=account,
            snapshots=Path(),
            snapshot=None,
            admin_conninfo=admin_conninfo,
            passfile=passfile,
        )
        server._admin = admin
        server._hold_run_lock(admin)  # what it creates is alive to a reaper (another run attached by its DSN)
        # what a restart (save_snapshot) needs to start it again
        log_format, log_settings = logs
        server._start_settings = (settings, log_settings)
        if log_format:
            server.statement_log = statement_log.StatementLog(run.path / "log", log_format)
        return server

    def save_snapshot(self, key: str, replace: bool = False) -> Path:
        """Stop, copy this cluster aside, start again; the copy goes to the cache under ``key`` in the
        background (the next run starts from it). Returns where it will be.

        Only a cleanly stopped cluster is consistent, so the server is down while its data directory is
        copied next to it (tmpfs to tmpfs: about 0.1 s for 45 MB); writing the cache, on disk, took 1.1-1.4 s
        here and happens while the tests run. Connections other than :attr:`admin` must be closed first.
        """
        self._close_admin()
        self._shutdown()
        clusters.trim_wal(self.installation, self.run.data)  # less to copy, here and at every start from it
        staging = make_staging_dir(self.run.path.parent, "snapshot")
        clusters.copy_tree(self.run.data, staging / "data")
        lock, self._build_lock = self._build_lock, None  # the writer releases it once the cache is complete
        settings, log_settings = self._start_settings
        target = clusters.store_snapshot_in_background(
            staging, self.snapshots, key, self._superuser_password(), replace, lock, settings.cache_max_size
        )
        try:
            # while it was down, another process may have taken its port: then it moves to another one
            self.process, tcp = _start_listening(
                settings, self.installation, self.account, self.run, log_settings, again=self.tcp
            )
        except BaseException:
            self.stop()
            raise
        if tcp is not None and tcp != self.tcp:
            if self.lease is not None:
                self.lease.moved(tcp)
            self.tcp = tcp
            self._conninfo = make_conninfo(self._conninfo, port=tcp[1])
            self._admin_conninfo = make_conninfo(self._admin_conninfo, port=tcp[1])  # the socket file's name
        self.snapshot = key
        return target

    def _superuser_password(self) -> Secret:
        password = self.passfile.password(clusters.SUPERUSER)
        assert password is not None  # written by _launch
        return password

    def _release_build_lock(self) -> None:
        if self._build_lock is not None:
            self._build_lock.release()
            self._build_lock = None

    def _shutdown(self, immediate: bool = False) -> None:
        """Fast shutdown (a checkpoint: the cluster is consistent, as a snapshot needs), or, for a cluster about
        to be deleted, immediate shutdown: no checkpoint, about 10 ms less at the end of every run."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT if immediate else signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _kill(self.process)
        else:
            _reap_orphans(self.run)

    @property
    def exited(self) -> int | None:
        """The postmaster's exit status when it is gone (negative: the signal that killed it), else None."""
        return self.process.poll()

    def describe_exit(self) -> str | None:
        code = self.exited
        if code is None:
            return None
        if isinstance(self.process, keepalive.Postmaster):
            return f"the local PostgreSQL server (pid {self.pid}, kept alive by an earlier run) exited during the run"
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        return f"the local PostgreSQL server (pid {self.pid}) exited during the run ({how})"

    def log_tail(self, lines: int = 15) -> str:
        """The end of the server's log (its own output and the logging collector's messages), indented."""
        return log_tail(self.run, lines)

    def detach(self) -> None:
        """Leave the server running after this process exits (kept databases of failed tests); it is
        marked so that later runs do not reap it, and ``pgsandbox clean`` stops it."""
        self._end(keep_running=True)

    def stop(self) -> None:
        """Immediate shutdown, then remove the run directory. Safe to call twice."""
        self._end(keep_running=False)

    def stop_keeping_databases(self) -> None:
        """The server keeps running for the kept databases (:meth:`detach`)."""
        self.detach()

    def abandon(self) -> None:
        """Its directory, and any of its processes still exiting, go."""
        self.stop()

    def _end(self, keep_running: bool) -> None:
        if self._stopped:
            return
        self._stopped = True
        trace.mark("server: stopping")
        atexit.unregister(self.stop)
        if self.lease is not None and not keep_running and self.process.poll() is None and self._leave_running():
            self._release_build_lock()
            self._finish_copy_ahead()
            clusters.wait_for_cache_writes()
            return
        self._close_admin()
        if self.lease is not None:  # kept for failed tests' databases, or gone: no longer kept alive
            self.lease.forget()
        if keep_running:
            runs.mark_kept(self.run)
        else:
            self._shutdown(immediate=True)  # its data goes with the run directory
            shutil.rmtree(self.run.path, ignore_errors=True)
        self._release_build_lock()
        self._finish_copy_ahead()
        clusters.wait_for_cache_writes()

    def _finish_copy_ahead(self) -> None:
        """The next start's copy of the cluster, made while this server ran: waited for (it is done by now unless
        the run was very short) and put where that start takes it."""
        if self.copy_ahead is not None:
            self.copy_ahead.finish()
            self.copy_ahead = None

    def _leave_running(self) -> bool:
        """pg_keep_alive: leave the server to the next run (or to its watcher, after the idle time) without this
        run's credentials: its role may no longer log in at once, and its databases and role are dropped by the
        watcher once this process lets go (else here). False when the server cannot be asked: it is then
        stopped."""
        assert self.lease is not None
        deferred = self.lease.watcher_cleans_up
        try:
            admin = self.admin
            if deferred:
                if self.login is not None:
                    admin.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(self.login.user)))
            else:
                rows = admin.execute(
                    "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", [self.prefix]
                ).fetchall()
                for (name,) in rows:
                    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
                if self.login is not None:
                    drop_login(admin, self.login)
        except psycopg.Error:
            return False
        finally:
            self._close_admin()
        if deferred:
            self.lease.detach(self.prefix, self.login.user if self.login is not None else None)
        else:
            self.lease.detach()
        return True


def _keep_alive_key(settings: Settings, prepared: launch.Prepared) -> str:
    """What a kept-alive server was started with (keepalive.server_key)."""
    log_format = statement_log.choose_format(settings.sql_log, prepared.installation.major)
    initdb_args = (*clusters.DEFAULT_INITDB_ARGS, *settings.initdb_args)
    return keepalive.server_key(
        settings, prepared.installation, prepared.account.name, prepared.root, log_format, initdb_args, TEST_SETTINGS
    )


def _altered_system(run: runs.RunDir) -> bool:
    """Whether postgresql.auto.conf holds a setting (ALTER SYSTEM)."""
    try:
        lines = (run.data / "postgresql.auto.conf").read_text().splitlines()
    except OSError:
        return False
    return any(line.strip() and not line.lstrip().startswith("#") for line in lines)


def _new_superuser_password(
    run: runs.RunDir, tcp: tuple[str, int] | None, current: Secret, quiet: bool
) -> tuple[Passfile, str, str, psycopg.Connection[Any]]:
    """Connect as the superuser with its ``current`` password (the cached cluster's, or the run's before) and give
    it a new one, kept in this run's passfile only (passfile.py; any port and host: the file is the run's own,
    and a restart may move the server to another port). Returns the passfile, the admin's conninfo (the socket:
    private to the run, and a connect costs less), the clients' (TCP, which code that parses host and port out
    of a URL understands) and the admin connection (``quiet``: its statements are not logged)."""
    passfile = Passfile(run.path / FILE_NAME)
    passfile.add(clusters.SUPERUSER, secrets.token_urlsafe(32))
    admin_conninfo = make_conninfo(
        host=str(run.socket_dir),
        port=SOCKET_PORT if tcp is None else tcp[1],
        user=clusters.SUPERUSER,
        dbname="postgres",
        password=NO_PASSWORD,
        passfile=str(passfile.path),
    )
    conninfo = admin_conninfo if tcp is None else make_conninfo(admin_conninfo, host=_connect_host(tcp[0]))
    options: dict[str, Any] = {"options": QUIET_OPTIONS} if quiet else {}
    admin = _connect_with(admin_conninfo, current, run, autocommit=True, **options)
    try:
        admin.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(clusters.SUPERUSER),
                sql.Literal(scram_verifier(passfile.password(clusters.SUPERUSER) or "")),
            )
        )
    except BaseException:
        admin.close()
        raise
    return passfile, admin_conninfo, conninfo, admin


def _connect_with(conninfo: str, password: Secret, run: runs.RunDir, **kwargs: Any) -> psycopg.Connection[Any]:
    """One connection with a password the run's passfile does not hold (the cached cluster's, replaced at once):
    a passfile of its own for that connect, in the run directory, so that no conninfo in a frame holds it."""
    once = Passfile(run.path / f"{FILE_NAME}.cached")
    try:
        once.add(str(conninfo_to_dict(conninfo)["user"]), password)
        return psycopg.connect(make_conninfo(conninfo, passfile=str(once.path)), **kwargs)
    finally:
        once.path.unlink(missing_ok=True)
