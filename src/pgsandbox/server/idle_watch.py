"""The idle timer of a kept-alive server (``pg_keep_alive``): a small detached process per kept-alive server.

Run by path (``python -I -S idle_watch.py RUN_DIR``), so it imports only the standard library and starts in
about 10 ms: nothing of pgsandbox, psycopg or site-packages. keepalive.py imports its functions too.

A run that uses the server holds an exclusive ``flock`` on ``keepalive.lock`` in the run directory for its whole
life; the kernel releases it when that process ends, however it ends (``kill -9`` included). The watcher waits
for that lock; once it has it, nobody is attached: the server has been idle since ``idle_since`` in
``keepalive.json`` (written by a run that detached, or by the watcher itself when a run died attached). After
``idle`` seconds of that, the watcher stops the postmaster and removes the run directory, holding the lock, so
that no run attaches meanwhile. Every change to ``keepalive.json`` is made under the lock.

A run that ends leaves its databases and its (already ``NOLOGIN``) role in ``cleanup``: the watcher, which gets the
lock at that moment, takes the list and lets go of the lock, then drops them with the installation's ``psql``, so
neither that run's exit nor the next run's start waits for ``DROP DATABASE``. What it misses (a run attached and
replaced the superuser's password meanwhile) the next run drops (reaper.py). The watcher holds the lock only for
moments: a run that finds it taken by no live run (``holder``) waits for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STATE_FILE = "keepalive.json"
LOCK_FILE = "keepalive.lock"
STOP_TIMEOUT = 15.0
CLEANUP_TIMEOUT = 120.0
RUN_NAME = re.compile(r"pgsandbox_[0-9a-f]{8}_[a-z0-9_]*")  # what a run names its databases and role
# wakes up at least this often (a check costs about 0.1 ms): a run that attached meanwhile is waited for, and a
# directory `pgsandbox clean` removed ends the watcher
LONGEST_NAP = 1.0


def read_state(run: Path) -> dict[str, Any] | None:
    """The server's keep-alive record; None when it is not (or no longer) kept alive."""
    try:
        state = json.loads((run / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def write_state(run: Path, state: dict[str, Any]) -> None:
    """Replace the record whole (a reader never sees half of it)."""
    partial = run / (STATE_FILE + ".partial")
    partial.write_text(json.dumps(state))
    partial.replace(run / STATE_FILE)


def try_lock(run: Path, wait: bool = False) -> int | None:
    """The exclusive lock on the server (a file descriptor to close to release it), or None when a run holds it
    (``wait``: block until it is free) or the directory is gone."""
    try:
        fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    if not (run / LOCK_FILE).exists():  # removed (the server stopped) while this process waited for it
        os.close(fd)
        return None
    return fd


def _state_letter(pid: int) -> str | None:
    """The process's state (``R``, ``S``, ``Z``...) from /proc; None without /proc or such a process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs and is not a zombie (a postmaster that exited, not yet reaped by its parent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _state_letter(pid) != "Z"


def postmaster(run: Path) -> int | None:
    """The pid of the postmaster serving ``run``'s data directory (its working directory, where /proc says)."""
    data = run / "data"
    try:
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None
    if not alive(pid):
        return None
    with contextlib.suppress(OSError):
        if os.readlink(f"/proc/{pid}/cwd") != str(data.resolve()):
            return None
    return pid


def stop_server(run: Path) -> None:
    """Fast shutdown of the postmaster (SIGKILL after :data:`STOP_TIMEOUT`), then the run directory goes."""
    pid = postmaster(run)
    if pid is not None:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + STOP_TIMEOUT
        delay = 0.001
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        if alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    shutil.rmtree(run, ignore_errors=True)


def check(run: Path, fd: int) -> float | dict[str, Any] | None:
    """With the lock held (nobody attached): stop the server when it has been idle long enough; else the seconds
    left (the watcher sleeps that long), or what the runs left to drop (taken out of the record). None: it is
    gone, or no longer kept alive."""
    state = read_state(run)
    if state is None:
        return None
    if postmaster(run) is None:  # killed, or the machine's tmpfs kept a directory its server lost
        shutil.rmtree(run, ignore_errors=True)
        return None
    if state.get("cleanup"):
        write_state(run, {**state, "cleanup": []})
        return state
    now = time.time()
    if state.get("idle_since") is None:  # the last run died attached: idle from now
        state["idle_since"] = now
        write_state(run, state)
    left = float(state["idle_since"]) + float(state["idle"]) - now
    if left <= 0:
        stop_server(run)
        return None
    return left


def drop_left_behind(run: Path, state: dict[str, Any]) -> bool:
    """Drop the databases and roles of the runs that ended (``state["cleanup"]``: their prefixes and roles)
    through ``psql``, as the superuser of the last run's passfile; False when that could not be done."""
    lines = []
    for item in state.get("cleanup", ()):
        prefix, login = str(item.get("prefix", "")), item.get("login")
        if RUN_NAME.fullmatch(prefix):
            lines.append(
                f"SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE)', datname) FROM pg_database "
                f"WHERE starts_with(datname, '{prefix}') \\gexec"
            )
        if login and RUN_NAME.fullmatch(str(login)):
            lines.append(f'DROP ROLE IF EXISTS "{login}";')
    psql = state.get("psql")
    if not lines or not psql:
        return not lines
    tcp = state.get("tcp")
    env = {
        "PGPASSFILE": str(run / "pgpass"),
        "PGOPTIONS": str(state.get("options", "")),
        "PGCONNECT_TIMEOUT": "10",
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }
    command = [str(psql), "-X", "-q", "-h", str(run / "sock"), "-p", str(tcp[1] if tcp else state.get("port", 5432))]
    command += ["-U", str(state.get("superuser", "postgres")), "-d", "postgres", "-f", "-"]
    try:
        done = subprocess.run(
            command, input="\n".join(lines) + "\n", env=env, capture_output=True, text=True, timeout=CLEANUP_TIMEOUT
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and not done.stderr.strip()


def watch(run: Path) -> None:
    """Until the server is stopped: wait for the runs attached to leave, then for the idle time to pass."""
    while run.is_dir():
        fd = try_lock(run)
        if fd is None:
            fd = try_lock(run, wait=True)
            if fd is None:
                return
        try:
            left = check(run, fd)
        finally:
            os.close(fd)
        if left is None:
            return
        if isinstance(left, dict):
            drop_left_behind(run, left)
            continue
        time.sleep(min(left, LONGEST_NAP))


if __name__ == "__main__":
    watch(Path(sys.argv[1]))
