"""``pg_keep_alive``: a local server outlives its run for an idle time, and the next run with the same binaries and
server settings attaches to it instead of starting one.

One run at a time: a run holds the server's exclusive lock (idle_watch.py) from its attach to its end, so a second
run at the same moment finds it taken and starts a server of its own (kept alive too). Each run rotates the
superuser's password (the new one is only in the run's passfile, 0600 in the 0700 run directory) and gets a login
role of its own; at its end its databases and role are dropped, and the next run drops whatever a killed one
left (reaper.py). What stays from run to run is the templates (named by their input hash) and the cluster.

A detached watcher (idle_watch.py, one per server) stops the server once no run has been attached for the idle
time, also after a run killed with ``kill -9``; a later run with ``pg_keep_alive`` restarts a watcher that died,
and ``pgsandbox clean`` stops an idle server and its watcher.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgsandbox._version import __version__
from pgsandbox.binaries import Installation
from pgsandbox.common import staging
from pgsandbox.common.redact import Secret
from pgsandbox.server import idle_watch, runs
from pgsandbox.server.clusters import SUPERUSER
from pgsandbox.server.passfile import FILE_NAME
from pgsandbox.server.tags import QUIET_OPTIONS
from pgsandbox.settings import Settings

KEY_LAYOUT = 1  # bump when what a kept-alive server must share with a run changes
LOCK_RETRY_SECONDS = 2.0  # the watcher, or a run that died, may hold the lock (for moments): wait that long


def server_key(
    settings: Settings,
    installation: Installation,
    account: str,
    cache_root: Path,
    log_format: str | None,
    initdb_args: tuple[str, ...],
    fixed: Mapping[str, str],
) -> str:
    """What a kept-alive server must have been started with for a run to use it: pgsandbox's version and fixed
    server settings, the binaries, the OS account, the cache (its snapshots), the initdb arguments, the server
    settings, the listen address and port, and the statement log's format."""
    material = [
        KEY_LAYOUT,
        __version__,
        dict(fixed),
        str(installation.bindir.resolve()),
        installation.version_text,
        account,
        str(cache_root.resolve()),
        list(initdb_args),
        sorted(settings.server_settings),
        settings.listen,
        settings.port,
        log_format,
    ]
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Lease:
    """This run's hold on a kept-alive server: its lock (released when this process ends, however it ends)."""

    run: runs.RunDir
    fd: int | None
    key: str
    _cleans_up: bool | None = None

    def state(self) -> dict[str, Any]:
        return idle_watch.read_state(self.run.path) or {}

    @property
    def watcher_cleans_up(self) -> bool:
        """The watcher drops what a run leaves (it has ``psql``): the run need not wait for it."""
        if self._cleans_up is None:
            self._cleans_up = bool(self.state().get("psql"))
        return self._cleans_up

    def detach(self, prefix: str | None = None, login: str | None = None) -> None:
        """The run is done with the server: it stays up for the idle time from now. ``prefix``, ``login``: the
        run's databases and role, for the watcher to drop (idle_watch.drop_left_behind)."""
        state = self.state()
        if state:
            state["idle_since"] = time.time()
            state["holder"] = None
            if prefix:
                state["cleanup"] = [*state.get("cleanup", ()), {"prefix": prefix, "login": login}]
            idle_watch.write_state(self.run.path, state)
        self._unlock()

    def forget(self) -> None:
        """No longer kept alive (kept for failed tests' databases, or stopped): the watcher ends."""
        with contextlib.suppress(OSError):
            (self.run.path / idle_watch.STATE_FILE).unlink()
        self._unlock()

    def moved(self, tcp: tuple[str, int]) -> None:
        """The server listens on another port now (a restart found its port taken)."""
        state = self.state()
        state["tcp"] = list(tcp)
        idle_watch.write_state(self.run.path, state)

    def _unlock(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def begin(
    run: runs.RunDir,
    key: str,
    idle: float,
    tcp: tuple[str, int] | None,
    templates: Sequence[str],
    installation: Installation,
    socket_port: int,
) -> Lease:
    """Keep the server just started in ``run`` alive after this run, and start its watcher. ``templates``: the
    input hash of the templates this run uses (a later run that wants them prefers this server)."""
    psql = installation.tool("psql")
    fd = idle_watch.try_lock(run.path)
    assert fd is not None, "a new run directory's lock is free"
    state = {
        "key": key,
        "idle": idle,
        "idle_since": None,
        "tcp": list(tcp) if tcp else None,
        "attaches": 0,
        "holder": _this_process(),
        "templates": list(templates),
        # what the watcher needs to drop what runs leave behind (idle_watch.drop_left_behind)
        "psql": str(psql) if psql.exists() else None,
        "superuser": SUPERUSER,
        "port": socket_port,
        "options": QUIET_OPTIONS,
    }
    idle_watch.write_state(run.path, state)
    lease = Lease(run, fd, key)
    _ensure_watcher(lease)
    return lease


def find(bases: list[Path], key: str, idle: float, templates: Sequence[str] = (), cached: bool = False) -> Lease | None:
    """A kept-alive server for ``key`` that no run uses, taken for this run (its idle time set to ``idle``).
    One whose runs used ``templates`` first; another only unless ``cached`` (the cache has a cluster with them,
    which a new server starts from faster than a migration builds them)."""
    matching = []
    for run in candidates(bases):
        state = idle_watch.read_state(run.path)
        if state is None or state.get("key") != key or runs.is_kept(run):
            continue
        has_them = set(templates) <= set(state.get("templates", ()))
        if has_them or not cached:
            matching.append((not has_them, run))
    for _, run in sorted(matching, key=lambda found: found[0]):
        fd = _lock(run)
        if fd is None:
            continue  # another run uses it
        state = idle_watch.read_state(run.path)
        if state is None or state.get("key") != key or idle_watch.postmaster(run.path) is None:
            os.close(fd)
            continue
        runs.take_ownership(run)
        known = list(state.get("templates", ()))
        state.update(
            holder=_this_process(),
            idle=idle,
            idle_since=None,
            attaches=int(state.get("attaches", 0)) + 1,
            templates=known + [key for key in templates if key not in known],
        )
        idle_watch.write_state(run.path, state)
        lease = Lease(run, fd, key)
        _ensure_watcher(lease)
        return lease
    return None


def tcp_of(lease: Lease) -> tuple[str, int] | None:
    tcp = lease.state().get("tcp")
    return (str(tcp[0]), int(tcp[1])) if tcp else None


def candidates(bases: list[Path]) -> list[runs.RunDir]:
    """This OS user's run directories that are kept alive, newest first."""
    found = []
    for base in bases:
        parent = runs.user_dir(base)
        found += [runs.RunDir(path) for path in parent.glob("run-*") if (path / idle_watch.STATE_FILE).exists()]
    return sorted(found, key=lambda run: _mtime(run.path / idle_watch.STATE_FILE), reverse=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _this_process() -> list[int | None]:
    return [os.getpid(), staging.process_start(os.getpid())]


def _held_by_a_live_run(run: runs.RunDir) -> bool:
    holder = (idle_watch.read_state(run.path) or {}).get("holder")
    if not holder:
        return False
    return staging.is_running(int(holder[0]), int(holder[1]))


def _lock(run: runs.RunDir) -> int | None:
    """The server's lock, unless a live run holds it; a moment's wait when only the watcher (or a run that just
    died) could."""
    deadline = time.monotonic() + LOCK_RETRY_SECONDS
    while True:
        fd = idle_watch.try_lock(run.path)
        if fd is not None or _held_by_a_live_run(run) or time.monotonic() > deadline:
            return fd
        time.sleep(0.005)


def previous_superuser_password(run: runs.RunDir) -> Secret | None:
    """The superuser's password the last run gave the server, from its passfile (this run replaces it)."""
    try:
        lines = (run.path / FILE_NAME).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = _split_passfile_line(line)
        if len(fields) == 5 and fields[3] == SUPERUSER:
            return Secret(fields[4])
    return None


def _split_passfile_line(line: str) -> list[str]:
    fields, current, escaped = [], "", False
    for char in line:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append(current)
            current = ""
        else:
            current += char
    return [*fields, current]


# -- the watcher ------------------------------------------------------------------------------------------


def _ensure_watcher(lease: Lease) -> None:
    """Start the server's watcher unless the one it has still runs (call with the lock held)."""
    state = lease.state()
    if _watcher_running(state):
        return
    process = subprocess.Popen(
        [sys.executable, "-I", "-S", idle_watch.__file__, str(lease.run.path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
        start_new_session=True,  # Ctrl-C and a killed process group of the run leave it alone
    )
    state["watcher"] = [process.pid, staging.process_start(process.pid)]
    idle_watch.write_state(lease.run.path, state)
    _detached.append(process)  # so that the Popen object's collection does not warn while it runs


_detached: list[subprocess.Popen[bytes]] = []


def _stop_watcher(run: runs.RunDir) -> None:
    state = idle_watch.read_state(run.path) or {}
    if _watcher_running(state):
        with contextlib.suppress(OSError):
            os.kill(int(state["watcher"][0]), signal.SIGTERM)


def _watcher_running(state: dict[str, Any]) -> bool:
    """Whether the watcher the record names still runs (not a zombie its parent, a run still alive, has not
    reaped, and not a later process with its pid)."""
    watcher = state.get("watcher")
    if not watcher:
        return False
    pid = int(watcher[0])
    return idle_watch.alive(pid) and staging.is_running(pid, int(watcher[1]))


# -- doctor, clean, the next run's sweep ------------------------------------------------------------------


@dataclass(frozen=True)
class KeptAlive:
    """A kept-alive server, for ``pgsandbox doctor``."""

    run: runs.RunDir
    key: str
    postmaster: int | None
    in_use: bool
    stops_in: float | None  # seconds; None while a run uses it

    def describe(self) -> str:
        server = f"server pid {self.postmaster}" if self.postmaster else "no server running"
        if self.in_use:
            when = "in use by a run now"
        elif self.stops_in is None:
            when = "idle, stops once its idle time has passed"
        else:
            when = f"idle, stops in {_duration(self.stops_in)}"
        return f"{self.run.path} ({server}, key {self.key}, {when})"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds} s"


def in_use_by_a_run(run: runs.RunDir) -> bool:
    """Whether a live run holds the server (the watcher's moments with the lock do not count)."""
    return _held_by_a_live_run(run)


def kept_alive(bases: list[Path]) -> list[KeptAlive]:
    found = []
    now = time.time()
    for run in candidates(bases):
        state = idle_watch.read_state(run.path)
        if state is None:
            continue
        idle_since = state.get("idle_since")
        in_use = in_use_by_a_run(run)
        stops_in = None if in_use or idle_since is None else float(idle_since) + float(state["idle"]) - now
        pid = idle_watch.postmaster(run.path)
        found.append(KeptAlive(run, str(state.get("key")), pid, in_use, stops_in))
    return found


def stop(run: runs.RunDir) -> bool:
    """Stop an idle kept-alive server, its watcher, and remove its directory; False when a run uses it."""
    fd = _lock(run)
    if fd is None:
        return False
    try:
        _stop_watcher(run)
        pid = idle_watch.postmaster(run.path)
        if pid is not None:
            runs.stop_postmaster(pid)
        runs.remove_leftover(runs.Leftover(run, None))
    finally:
        os.close(fd)
    return True


def discard(lease: Lease) -> None:
    """Stop a kept-alive server this run holds (it failed to serve) and remove its directory."""
    _stop_watcher(lease.run)
    pid = idle_watch.postmaster(lease.run.path)
    if pid is not None:
        runs.stop_postmaster(pid)
    runs.remove_leftover(runs.Leftover(lease.run, None))
    lease._unlock()


def sweep(bases: list[Path]) -> None:
    """At a run's start: an idle kept-alive server whose watcher died (the machine's processes were killed) gets
    a new one, which stops it when its time has come; one whose postmaster died goes."""
    for run in candidates(bases):
        fd = _lock(run)
        if fd is None:
            continue  # a run uses it
        lease = Lease(run, fd, "")
        try:
            if idle_watch.postmaster(run.path) is None:
                runs.remove_leftover(runs.Leftover(run, None))
            elif lease.state():
                _ensure_watcher(lease)
        finally:
            lease._unlock()


class Postmaster:
    """A postmaster an earlier run started (a kept-alive server): what :class:`LocalServer` asks of the
    ``subprocess.Popen`` of one it started itself. Its exit status cannot be known (it is not this process's
    child)."""

    adopted = True
    UNKNOWN_EXIT = 1

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not idle_watch.alive(self.pid):
            self.returncode = self.UNKNOWN_EXIT
        return self.returncode

    def send_signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.001
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(["postgres"], timeout or 0)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self.returncode or 0
