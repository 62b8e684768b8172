"""A throwaway server: a copy of the cached cluster, started directly and polled until ready."""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import psycopg
from filelock import BaseFileLock
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgsandbox.binaries import Installation, find_installations, select_installation, why_chosen
from pgsandbox.common import staging
from pgsandbox.common.progress import Progress
from pgsandbox.common.redact import Secret, redact
from pgsandbox.common.staging import make_staging_dir
from pgsandbox.errors import ServerStartError
from pgsandbox.server import clusters, idle_watch, keepalive, osuser, reaper, runs, statement_log
from pgsandbox.server.base import Server, new_run_id
from pgsandbox.server.passfile import FILE_NAME, NO_PASSWORD, Passfile
from pgsandbox.server.roles import drop_login
from pgsandbox.server.scram import SCRAM_ITERATIONS, scram_verifier
from pgsandbox.server.tags import QUIET_OPTIONS
from pgsandbox.settings import Settings, listens_on_tcp

SOCKET_PORT = 5432  # only names the socket file: the socket directory is private to the run
START_TIMEOUT = 60.0
COLLECTOR_DRAIN_TIMEOUT = 5.0
STOP_TIMEOUT = 15.0
PORT_ATTEMPTS = 5  # a free port picked by pgsandbox may be taken before the server binds it: pick again
PORT_IN_USE = "already in use"  # EADDRINUSE in the server's log (English: initdb --locale=C)
CANNOT_LISTEN = ("could not bind", "could not create any TCP/IP sockets")

TEST_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "shared_buffers": "32MB",
    "max_connections": "200",
    "checkpoint_timeout": "1h",
    "password_encryption": "scram-sha-256",
    "logging_collector": "off",
    "log_min_messages": "warning",
    # dynamic shared memory as files in the data directory (pg_dynshmem), not /dev/shm/PostgreSQL.*: a server
    # killed with kill -9 cannot remove its segments, and the run's directory takes the files with it (on tmpfs,
    # the default, the same memory as /dev/shm; on disk, pages the kernel may write back: bench/dsm.py)
    "dynamic_shared_memory_type": "mmap",
}

HBA = """\
# pgsandbox: every connection authenticates with SCRAM, socket and TCP alike
local all all scram-sha-256
host  all all 127.0.0.1/32 scram-sha-256
host  all all ::1/128 scram-sha-256
"""


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
        cls, settings: Settings | None = None, progress: Progress | None = None, snapshots: Sequence[str] = ()
    ) -> LocalServer:
        """Start a server from the cached cluster, or from the first of ``snapshots`` the cache holds.

        A snapshot is a cluster saved by :meth:`save_snapshot` after templates were built in it: starting
        from one makes those templates a cache hit without running any migration.
        """
        settings = settings or Settings()
        if os.name != "posix":
            raise ServerStartError(
                "pgsandbox cannot run a local PostgreSQL server on this platform yet (Linux and macOS only).",
                "use an existing server: --pg-dsn postgresql://user:password@host:5432/postgres (or PGSANDBOX_DSN).",
            )
        root = clusters.cache_root(settings.cache)
        search = find_installations(settings.bin, cache_root=root, say=progress)
        installation = select_installation(
            search, settings.version, settings.source_of("bin"), settings.extensions, settings.source_of("extensions")
        )
        if progress and settings.extensions:
            why = why_chosen(
                installation,
                search,
                settings.version,
                settings.extensions,
                settings.source_of("version"),
                settings.source_of("extensions"),
            )
            progress(f"using {installation.describe()}: {why}")
        account = osuser.server_account(progress)
        installation = osuser.reachable_installation(installation, account, root, progress)
        base = settings.runtime_dir or runs.default_runtime_base()
        runs.check_runtime_base(base, account, settings.source_of("runtime_dir"))
        for leftover in runs.find_leftovers(runs.search_bases(settings.runtime_dir)):
            runs.remove_leftover(leftover)
            if progress:
                progress(f"stopped a server left behind by a killed run: {leftover.describe()}")
        for abandoned in runs.find_abandoned(runs.search_bases(settings.runtime_dir), root):
            staging.remove(abandoned)
            if progress:
                progress(f"removed {abandoned.describe()}")
        key = ""
        if settings.keep_alive:
            log_format = statement_log.choose_format(settings.sql_log, installation.major)
            initdb_args = (*clusters.DEFAULT_INITDB_ARGS, *settings.initdb_args)
            key = keepalive.server_key(
                settings, installation, account.name, root, log_format, initdb_args, TEST_SETTINGS
            )
            kept = cls._attach_kept(settings, installation, account, root, base, key, snapshots, progress)
            if kept is not None:
                return kept
        run_id = new_run_id()
        run = runs.create_run_dir(base, run_id, account)
        snapshot_dir = clusters.snapshot_dir(root, installation, settings.initdb_args)
        build_lock = clusters.snapshot_build_lock(snapshot_dir, list(snapshots), progress)
        try:
            with clusters.snapshot_source(snapshot_dir, list(snapshots)) as found:
                if found:
                    clusters.copy_tree(found[1].data, run.data)
                    password, fresh = found[1].password, False
            if not found:
                with clusters.cluster_source(
                    installation,
                    account,
                    root,
                    runs.runtime_parent(base),
                    settings.initdb_args,
                    progress,
                    settings.cache_max_size,
                ) as cluster:
                    clusters.copy_tree(cluster.data, run.data)
                password, fresh = cluster.password, cluster.fresh
            account.chown(run.data)
            run.data.chmod(0o700)
            (run.data / "pg_hba.conf").write_text(HBA)
            account.chown(run.data / "pg_hba.conf")
            server = cls._launch(settings, installation, account, run, run_id, password)
        except BaseException as error:
            shutil.rmtree(run.path, ignore_errors=True)
            if build_lock:
                build_lock.release()
            # the cluster's copy (cp, copytree listing every file) or initdb (which works there too) ran out
            if isinstance(error, (OSError, shutil.Error, ServerStartError)) and runs.is_out_of_space(error):
                raise _out_of_space(base, settings.source_of("runtime_dir")) from None
            raise
        server.snapshots = snapshot_dir
        server.snapshot = found[0] if found else None
        server.fresh_cluster = fresh
        if build_lock and found and found[0] == snapshots[0]:
            build_lock.release()  # another run built it while this one waited
            build_lock = None
        server._build_lock = build_lock
        if settings.keep_alive:
            server.lease = keepalive.begin(
                run, key, settings.keep_alive, server.tcp, snapshots[:1], server.installation, SOCKET_PORT
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
            run_id = new_run_id()
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
    def _launch(
        cls,
        settings: Settings,
        installation: Installation,
        account: osuser.Account,
        run: runs.RunDir,
        run_id: str,
        cached_password: str,
    ) -> LocalServer:
        log_format = statement_log.choose_format(settings.sql_log, installation.major)
        log_settings: dict[str, str] = {}
        if log_format:
            log_dir = run.path / "log"
            log_dir.mkdir(mode=0o700, exist_ok=True)
            account.chown(log_dir)
            log_settings = statement_log.server_settings(log_dir, log_format)
        process, tcp = _start_listening(settings, installation, account, run, log_settings)
        try:
            access = _new_superuser_password(run, tcp, Secret(cached_password), quiet=bool(log_format))
        except BaseException:
            _kill(process)
            raise
        logs = (log_format, log_settings)
        return cls._serving(settings, installation, account, run, run_id, process, tcp, access, logs)

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
        atexit.unregister(self.stop)
        if self.lease is not None and not keep_running and self.process.poll() is None and self._leave_running():
            self._release_build_lock()
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
        clusters.wait_for_cache_writes()

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


def _out_of_space(base: Path, source: str) -> ServerStartError:
    try:
        free = f"{shutil.disk_usage(base).free // 2**20} MB free"
    except OSError:
        free = "too little room"
    return ServerStartError(
        f"the local server's data does not fit in {base} ({source}): it has {free}, and a server needs about "
        "40 MB to start, more for its templates and each test's clone.",
        "free space there, or " + runs.RUNTIME_FIX,
    )


def _start_listening(
    settings: Settings,
    installation: Installation,
    account: osuser.Account,
    run: runs.RunDir,
    log_settings: dict[str, str],
    again: tuple[str, int] | None = None,
) -> tuple[subprocess.Popen[bytes], tuple[str, int] | None]:
    """Write the configuration, start postgres and wait until it is ready; return it and its TCP address.

    The port is picked free just before the server binds it, so another process may take it in between: then
    another is picked, up to :data:`PORT_ATTEMPTS` times. ``again``: the address of a server started before
    (a restart), tried first.
    """
    in_use_before = _port_conflicts(run)  # the log is appended to by every start
    picked: list[int] = []
    for attempt in range(PORT_ATTEMPTS):
        tcp = again if again and attempt == 0 else _tcp_address(settings)
        _write_config(run, installation, account, settings, tcp, log_settings)
        process = _spawn(installation, account, run)
        try:
            _wait_ready(process, run)
            return process, tcp
        except ServerStartError:
            _kill(process)
            log = _read_log(run)
            if tcp is None or not any(text in log for text in CANNOT_LISTEN):
                raise
            in_use = _port_conflicts(run) > in_use_before
            in_use_before = _port_conflicts(run)
            if in_use and settings.port == 0:
                picked.append(tcp[1])
                if attempt + 1 < PORT_ATTEMPTS:
                    continue
                raise ServerStartError(
                    f"the local server could not listen on {tcp[0]}: each of the {len(picked)} free ports "
                    f"pgsandbox picked ({', '.join(map(str, picked))}) was taken by another process before the "
                    "server could bind it.\n" + _tail(log),
                    "run again; if it keeps happening, set --pg-port to a port nothing else uses, or "
                    "pg_listen = none to use the Unix socket only.",
                ) from None
            if in_use:
                raise ServerStartError(
                    f"the local server could not listen on {tcp[0]}:{tcp[1]}: the port is in use.\n" + _tail(log),
                    "choose another --pg-port (or 0 for a free one), or stop what uses that port.",
                ) from None
            raise ServerStartError(
                f"the local server could not listen on {tcp[0]} port {tcp[1]} "
                f"({settings.source_of('listen')}).\n" + _tail(log),
                "set pg_listen to an address of this machine (127.0.0.1, ::1, or * for all of them), or to "
                "none to use the Unix socket only.",
            ) from None
    raise AssertionError("unreachable: the last attempt returns or raises")


def _port_conflicts(run: runs.RunDir) -> int:
    """How many times the server's output (its own file and the logging collector's) says a port was in use."""
    count = 0
    for path in [run.log, *sorted((run.path / "log").glob("*"))]:
        try:
            count += path.read_bytes().count(PORT_IN_USE.encode())
        except OSError:
            continue
    return count


def _tcp_address(settings: Settings) -> tuple[str, int] | None:
    """Where the server listens besides its socket: ``pg_listen`` (127.0.0.1 by default) and ``pg_port`` or a
    free port; None with ``pg_listen = none``."""
    if settings.listen is None or not listens_on_tcp(settings.listen):
        return None
    try:
        port = settings.port or _free_port(settings.listen)
    except OSError as error:
        raise ServerStartError(
            f"the local server cannot listen on {settings.listen} ({settings.source_of('listen')}): {error}.",
            "set pg_listen to an address of this machine (127.0.0.1, ::1, or * for all of them), or to none to "
            "use the Unix socket only.",
        ) from None
    return settings.listen, port


def _free_port(listen: str) -> int:
    """A port nothing listens on now; the server binds it a moment later (a race that start() retries)."""
    host = _connect_host(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _connect_host(listen: str) -> str:
    first = listen.split(",")[0].strip()
    return {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(first, first)


def _write_config(
    run: runs.RunDir,
    installation: Installation,
    account: osuser.Account,
    settings: Settings,
    tcp: tuple[str, int] | None,
    log_settings: dict[str, str],
) -> None:
    values = {**TEST_SETTINGS, **log_settings}
    if installation.major >= 16:
        values["scram_iterations"] = str(SCRAM_ITERATIONS)
    values["unix_socket_directories"] = str(run.socket_dir)
    values["listen_addresses"] = tcp[0] if tcp else ""
    values["port"] = str(tcp[1] if tcp else SOCKET_PORT)
    values.update(dict(settings.server_settings))
    lines = ["# written by pgsandbox for this run"]
    lines += ["{} = '{}'".format(name, value.replace("'", "''")) for name, value in values.items()]
    conf = run.data / "pgsandbox.conf"
    conf.write_text("\n".join(lines) + "\n")
    main = run.data / "postgresql.conf"
    text = main.read_text()
    if "include_if_exists = 'pgsandbox.conf'" not in text:
        main.write_text(text + "\ninclude_if_exists = 'pgsandbox.conf'\n")
    account.chown(conf)


def _spawn(installation: Installation, account: osuser.Account, run: runs.RunDir) -> subprocess.Popen[bytes]:
    log: IO[bytes]
    with open(run.log, "ab") as log:
        return subprocess.Popen(
            [str(installation.tool("postgres")), "-D", str(run.data)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(run.path),
            start_new_session=True,  # Ctrl-C in the terminal reaches pytest, which stops the server
            **account.popen_kwargs(),
        )


def _wait_ready(process: subprocess.Popen[bytes], run: runs.RunDir) -> None:
    """Poll postmaster.pid for the "ready" status PostgreSQL writes once it accepts connections."""
    pid_file = run.data / "postmaster.pid"
    deadline = time.monotonic() + START_TIMEOUT
    delay = 0.001
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _wait_for_collector(run)
            raise ServerStartError(
                f"the local PostgreSQL server exited while starting (exit {process.returncode}). "
                f"Its log ({run.log}) ends with:\n{_tail(_read_log(run))}",
                "fix the setting the log names (pg_server_settings?), or run `pgsandbox doctor`.",
            )
        try:
            lines = pid_file.read_text().splitlines()
        except OSError:
            lines = []
        if len(lines) >= 8 and lines[7].strip() == "ready":
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    raise ServerStartError(
        f"the local PostgreSQL server did not become ready within {START_TIMEOUT:.0f} s. "
        f"Its log ends with:\n{_tail(_read_log(run))}",
        "check the machine's load and the log above; run `pgsandbox doctor`.",
    )


def _wait_for_collector(run: runs.RunDir) -> None:
    """The postmaster has exited, but its logging collector may still be writing the postmaster's last words
    (why it stopped) and exits only then. PostgreSQL's processes each lead their own process group but all work
    in the data directory: wait, bounded, until none is left there before the log is read."""
    deadline = time.monotonic() + COLLECTOR_DRAIN_TIMEOUT
    delay = 0.001
    while time.monotonic() < deadline and _processes_in(run.data):
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def log_tail(run: runs.RunDir, lines: int = 15) -> str:
    """The end of a run's server log; when its postmaster is dead, once the logging collector has written its last
    words (a running server's collector never exits: no waiting for it)."""
    if runs.postmaster_serving(run) is None:
        _wait_for_collector(run)
    return _tail(_read_log(run), lines)


def _reap_orphans(run: runs.RunDir) -> None:
    """A postmaster that died on its own (``kill -9``, the OOM killer) leaves its children to notice and exit,
    and its shared memory segment behind: wait for the first (bounded; then SIGKILL), remove the second."""
    _wait_for_collector(run)
    for pid in _pids_in(run.data):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    try:
        # postmaster.pid, line 7: the System V shared memory key and id (nobody is attached any more)
        shmid = (run.data / "postmaster.pid").read_text().splitlines()[6].split()[1]
    except (OSError, IndexError):
        return
    ipcrm = shutil.which("ipcrm")
    if ipcrm and shmid.isdigit():
        subprocess.run([ipcrm, "-m", shmid], capture_output=True)


def _pids_in(directory: Path) -> list[int]:
    """Live processes whose working directory is ``directory`` (Linux; elsewhere none are known)."""
    target = str(directory.resolve())
    found = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if os.readlink(cwd) == target:
                found.append(int(cwd.parent.name))
        except (OSError, ValueError):
            continue
    return found


def _processes_in(directory: Path) -> bool:
    """Whether a live process has ``directory`` as its working directory (Linux; elsewhere nothing is known)."""
    target = str(directory.resolve())
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            if os.readlink(cwd) == target:
                return True
        except OSError:
            continue  # gone, a zombie, or not ours to see
    return False


def _read_log(run: runs.RunDir) -> str:
    """The server's output: its own file, then what it wrote once its logging collector ran."""
    try:
        text = run.log.read_text(errors="replace")
    except OSError:
        text = ""
    return redact(text + "\n" + statement_log.server_messages(run.path / "log"))


def _tail(log: str, lines: int = 15) -> str:
    return "\n".join("    " + line for line in log.strip().splitlines()[-lines:])


def _kill(process: subprocess.Popen[bytes] | keepalive.Postmaster) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
