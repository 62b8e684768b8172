"""A local server's postgres started, without psycopg: the cached cluster copied into a run directory, its
configuration written, postgres spawned and polled until ready (local.py then connects, rotates the password and
makes the server object). Importing this module imports no client library, so that the pytest plugin can start
postgres in a thread while its main thread imports psycopg and the rest (pytest/state.py BackgroundStart)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from filelock import BaseFileLock

from pgsandbox.binaries import Installation, find_installations, select_installation, why_chosen
from pgsandbox.common import staging, trace
from pgsandbox.common.progress import Progress
from pgsandbox.common.redact import redact
from pgsandbox.errors import ServerStartError
from pgsandbox.server import clusters, keepalive, osuser, runs, spares, statement_log
from pgsandbox.server.scram import SCRAM_ITERATIONS
from pgsandbox.settings import Settings, listens_on_tcp

SOCKET_PORT = 5432  # only names the socket file: the socket directory is private to the run
START_TIMEOUT = 60.0
COLLECTOR_DRAIN_TIMEOUT = 5.0
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


@dataclass(frozen=True)
class Prepared:
    """What a local server runs with: its installation, the OS account, the cache and the runtime directory."""

    installation: Installation
    account: osuser.Account
    root: Path  # the cache
    base: Path  # where run directories go


def prepare(settings: Settings, progress: Progress | None) -> Prepared:
    """Choose the installation and the account, check the runtime directory, clear what killed runs left."""
    trace.mark("server: preparing")
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
    for searched in runs.search_bases(settings.runtime_dir):
        spares.remove_orphans(runs.user_dir(searched))
    trace.mark("server: prepared")
    return Prepared(installation, account, root, base)


@dataclass
class Launched:
    """A postmaster that is ready, in a run directory of its own, still with the cached cluster's superuser
    password (local.py replaces it before any other client can connect: the socket directory is the run's)."""

    prepared: Prepared
    run_id: str
    run: runs.RunDir
    snapshot_dir: Path
    snapshot: str | None  # the key of the cached cluster it started from, None for the initdb cluster
    fresh: bool  # its cluster came from initdb in this start
    cached_password: str
    build_lock: BaseFileLock | None  # held while this run may build and save the first snapshot
    process: subprocess.Popen[bytes]
    tcp: tuple[str, int] | None
    log_format: str | None
    log_settings: dict[str, str]
    copy_ahead: spares.CopyAhead | None = None  # the next start's copy of the cluster, made meanwhile

    def discard(self) -> None:
        """Stop it and remove its run directory (its start failed after this step, or nobody took it)."""
        if self.copy_ahead is not None:
            self.copy_ahead.abandon()
            self.copy_ahead = None
        _kill(self.process)
        shutil.rmtree(self.run.path, ignore_errors=True)
        if self.build_lock:
            self.build_lock.release()
            self.build_lock = None


def launch(settings: Settings, prepared: Prepared, snapshots: list[str], progress: Progress | None) -> Launched:
    """Copy the first of ``snapshots`` the cache holds (else the initdb cluster) into a new run directory and
    start postgres on it."""
    installation, account, root, base = prepared.installation, prepared.account, prepared.root, prepared.base
    run_id = runs.new_run_id()
    run = runs.create_run_dir(base, run_id, account)
    snapshot_dir = clusters.snapshot_dir(root, installation, settings.initdb_args)
    build_lock = clusters.snapshot_build_lock(snapshot_dir, snapshots, progress)
    parent = runs.runtime_parent(base)
    spare_of: Path | None = None
    try:
        with clusters.snapshot_source(snapshot_dir, snapshots) as found:
            if found:
                spare_of = _copy(found[1], run, parent)
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
                spare_of = None if cluster.fresh else _copy(cluster, run, parent)
                if cluster.fresh:
                    clusters.copy_tree(cluster.data, run.data)
            password, fresh = cluster.password, cluster.fresh
        trace.mark("server: cluster copied")
        if run.data.stat().st_uid != account.uid:  # cp -a kept the cache's owner, the server's account, as root
            account.chown_tree(run.data)
        run.data.chmod(0o700)
        (run.data / "pg_hba.conf").write_text(HBA)
        account.chown(run.data / "pg_hba.conf")
        log_format = statement_log.choose_format(settings.sql_log, installation.major)
        log_settings: dict[str, str] = {}
        if log_format:
            log_dir = run.path / "log"
            log_dir.mkdir(mode=0o700, exist_ok=True)
            account.chown(log_dir)
            log_settings = statement_log.server_settings(log_dir, log_format)
        process, tcp = _start_listening(settings, installation, account, run, log_settings)
    except BaseException as error:
        shutil.rmtree(run.path, ignore_errors=True)
        if build_lock:
            build_lock.release()
        # the cluster's copy (cp, copytree listing every file) or initdb (which works there too) ran out
        if isinstance(error, (OSError, shutil.Error, ServerStartError)) and runs.is_out_of_space(error):
            raise _out_of_space(base, settings.source_of("runtime_dir")) from None
        raise
    snapshot = found[0] if found else None
    if build_lock and found and found[0] == snapshots[0]:
        build_lock.release()  # another run built it while this one waited
        build_lock = None
    return Launched(
        prepared,
        run_id,
        run,
        snapshot_dir,
        snapshot,
        fresh,
        password,
        build_lock,
        process,
        tcp,
        log_format,
        log_settings,
        # once postgres is up: the copy does not compete with its start
        spares.CopyAhead.start(spare_of, parent) if spare_of is not None else None,
    )


def _copy(source: clusters.CachedCluster, run: runs.RunDir, parent: Path) -> Path | None:
    """The cached cluster into the run directory: a spare of it when one is ready, else a copy. Returns the cached
    cluster when it starts often (used by another start within the hour, or a spare was there): a spare of it is
    made for the next start while this server runs."""
    if spares.take(source.data, run.data, parent):
        return source.data
    clusters.copy_tree(source.data, run.data)
    return source.data if source.recently_used(spares.HOT_SECONDS) else None


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
        trace.mark("server: postgres spawned")
        try:
            _wait_ready(process, run)
            trace.mark("server: postgres ready")
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
