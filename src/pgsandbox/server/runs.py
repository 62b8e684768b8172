"""Run directories: where a local server keeps its data, socket and log, and how leftovers are found.

A run directory holds ``owner.json`` (the pytest process that owns it). A run killed with ``kill -9``
leaves its directory and its postmaster behind; the next run finds the owner gone, checks that the
postmaster really serves that directory (its working directory is the data directory), stops it and
removes the directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pgsandbox.binaries import archives
from pgsandbox.common import staging
from pgsandbox.errors import ServerStartError
from pgsandbox.server.osuser import ROOT_SHARED_CACHE, Account, can_reach

if TYPE_CHECKING:
    import psutil

MIN_SHM_FREE = 512 * 1024 * 1024
STARTING_GRACE_SECONDS = 60.0


def default_runtime_base() -> Path:
    """RAM-backed /dev/shm when it exists with room (clones are ~25x faster there), else the temp dir."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free >= MIN_SHM_FREE:
            return shm
    except OSError:
        pass
    return Path(tempfile.gettempdir())


def user_dir(base: Path) -> Path:
    """``<base>/pgsandbox-<uid>``: this OS user's runs, spares and half-written directories in a runtime base."""
    return base / f"pgsandbox-{os.geteuid()}"


def runtime_parent(base: Path) -> Path:
    """:func:`user_dir`, made: one per invoking user, traversable by the server's account."""
    parent = user_dir(base)
    parent.mkdir(parents=True, exist_ok=True)
    parent.chmod(0o755 if os.geteuid() == 0 else 0o700)
    return parent


RUNTIME_FIX = (
    "set pg_runtime_dir to a writable directory with room (512 MB or more), or unset it (the default is /dev/shm "
    "when it has room, else the temporary directory)."
)


def check_runtime_base(base: Path, account: Account, source: str) -> Path:
    """``runtime_parent(base)``, or :class:`ServerStartError` saying why the server cannot keep its data
    there: not a directory, not writable, or not enterable by the server's OS account (as root)."""
    fix = RUNTIME_FIX
    existed = user_dir(base).is_dir()
    try:
        parent = runtime_parent(base)
        probe = Path(tempfile.mkdtemp(prefix=".write-test-", dir=parent))
        probe.rmdir()
    except OSError as error:
        reason = error.strerror or str(error)
        in_the_way = [p for p in [user_dir(base), base, *base.parents] if p.is_file()]
        if in_the_way:
            reason = f"{in_the_way[-1]} is a file, not a directory"
        raise ServerStartError(f"the local server cannot keep its data in {base} ({source}): {reason}.", fix) from None
    if not can_reach(parent, account):
        if not existed:
            with contextlib.suppress(OSError):
                parent.rmdir()
        blocker = next((p for p in [*reversed(parent.parents), parent] if not can_reach(p, account)), parent)
        mode = oct(blocker.stat().st_mode & 0o777)[2:] if blocker.exists() else "?"
        raise ServerStartError(
            f"the local server runs as the OS user {account.name!r} (PostgreSQL refuses to run as root), which "
            f"cannot enter {blocker} (mode {mode}), on the way to its data in {base} ({source}).",
            f"let every user enter it (chmod o+x {blocker}; `mktemp -d` makes 0700 directories), or {fix}",
        )
    return parent


def is_out_of_space(error: BaseException) -> bool:
    """``cp``/``shutil.copytree`` failing for want of room (``shutil.Error`` lists each file)."""
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error)[:2000]


def new_run_id() -> str:
    """Short, random and lower-case: part of every database name a run creates."""
    return secrets.token_hex(4)


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def socket_dir(self) -> Path:
        return self.path / "sock"

    @property
    def log(self) -> Path:
        return self.path / "server.log"

    @property
    def owner_file(self) -> Path:
        return self.path / "owner.json"


def create_run_dir(base: Path, run_id: str, account: Account) -> RunDir:
    path = runtime_parent(base) / f"run-{run_id}"
    path.mkdir(mode=0o700)
    run = RunDir(path)
    _write_owner(run)
    run.socket_dir.mkdir(mode=0o700)
    run.log.touch(mode=0o600)
    account.chown(run.path)
    return run


def create_secrets_dir(run_id: str, base: Path | None = None) -> RunDir:
    """A run directory holding only the run's secrets (its passfile): a run on someone else's server. Like a
    local server's, it goes with the run, is a leftover once its owner is killed, and is kept with the run's
    kept databases (``mark_kept``) until ``pgsandbox clean`` or ``pgsandbox reap --include-kept``."""
    path = runtime_parent(base or default_runtime_base()) / f"run-{run_id}"
    path.mkdir(mode=0o700)
    run = RunDir(path)
    _write_owner(run)
    return run


def take_ownership(run: RunDir) -> None:
    """This process owns the run directory from now on (a kept-alive server another run started)."""
    _write_owner(run)


def _write_owner(run: RunDir) -> None:
    """owner.json: this process, told from a later one with its pid by its start (staging.process_start)."""
    pid = os.getpid()
    run.owner_file.write_text(json.dumps({"pid": pid, "start": staging.process_start(pid)}))


def remove_run_dirs(run_id: str, bases: list[Path]) -> list[Path]:
    """Remove run ``run_id``'s directories (what ``pgsandbox reap`` dropped the databases of): its secrets."""
    removed = []
    for base in bases:
        path = user_dir(base) / f"run-{run_id}"
        if path.is_dir() and not _postmaster_serving(RunDir(path)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def mark_kept(run: RunDir) -> None:
    """The run's server outlives its owner on purpose (``--pg-keep-failed``)."""
    owner = json.loads(run.owner_file.read_text())
    owner["kept"] = True
    run.owner_file.write_text(json.dumps(owner))


KEPT_ALIVE_FILE = "keepalive.json"  # written by keepalive.py (pg_keep_alive)


def is_kept_alive(run: RunDir) -> bool:
    """The run's server outlives it for ``pg_keep_alive`` (keepalive.py): a later run may attach to it."""
    return (run.path / KEPT_ALIVE_FILE).exists()


def is_kept(run: RunDir) -> bool:
    try:
        return bool(json.loads(run.owner_file.read_text()).get("kept"))
    except (OSError, ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class Leftover:
    """A run directory whose owner is gone, and the postmaster still serving it, if any."""

    run: RunDir
    postmaster: int | None

    def describe(self) -> str:
        server = f"server pid {self.postmaster} still running" if self.postmaster else "no server running"
        return f"{self.run.path} ({server})"


def search_bases(configured: Path | None = None) -> list[Path]:
    bases = [configured] if configured else []
    bases += [Path("/dev/shm"), Path(tempfile.gettempdir())]
    unique: list[Path] = []
    for base in bases:
        if base not in unique:
            unique.append(base)
    return unique


def find_leftovers(bases: list[Path], include_kept: bool = False, all_users: bool = False) -> list[Leftover]:
    """Run directories whose owner is gone; servers kept for failed tests only with ``include_kept``. Only this
    OS user's (``pgsandbox-<uid>``) unless ``all_users``."""
    leftovers = []
    for base in bases:
        parents = [user_dir(base)]
        if all_users:
            parents = sorted(path for path in base.glob("pgsandbox-*") if path.name[10:].isdigit())
        for parent in parents:
            leftovers += _leftovers_in(parent, include_kept)
    return leftovers


def _leftovers_in(parent: Path, include_kept: bool) -> list[Leftover]:
    leftovers = []
    if parent.is_dir():
        for path in sorted(parent.glob("run-*")):
            run = RunDir(path)
            if is_kept_alive(run):  # its watcher, `pgsandbox clean` and doctor see to it (keepalive.py)
                continue
            if _owner_alive(run) or (is_kept(run) and not include_kept):
                continue
            leftovers.append(Leftover(run, _postmaster_serving(run)))
    return leftovers


def staging_parents(bases: list[Path], cache_root: Path | None) -> list[Path]:
    """Where half-written directories can be: the runtime directories (initdb, snapshots copied aside) and the
    cache's (clusters and snapshots being stored, binaries being unpacked or copied for the server's user)."""
    parents = [user_dir(base) for base in bases]
    if cache_root is not None:
        parents += [cache_root / "initdb", archives.unpacked_root(cache_root), cache_root / "binaries"]
        parents += sorted(path for path in (cache_root / "snapshots").glob("*") if path.is_dir())
    if os.geteuid() == 0:
        parents.append(ROOT_SHARED_CACHE / "binaries")
    return parents


def find_abandoned(bases: list[Path], cache_root: Path | None) -> list[staging.Abandoned]:
    """Half-written directories (initdb, snapshot, cache writes, unpacking) whose owner was killed."""
    return staging.find_abandoned(staging_parents(bases, cache_root))


def run_size(run: RunDir) -> int:
    return staging.tree_size(run.path)


def live_run(bases: list[Path], run_id: str) -> bool:
    """Whether run ``run_id`` of this user has a directory whose owner still runs."""
    for base in bases:
        path = user_dir(base) / f"run-{run_id}"
        if path.is_dir() and _owner_alive(RunDir(path)):
            return True
    return False


def owner_alive(run: RunDir) -> bool:
    """Whether the process that owns the run directory still runs."""
    return _owner_alive(run)


def _owner_alive(run: RunDir) -> bool:
    try:
        owner = json.loads(run.owner_file.read_text())
    except FileNotFoundError:
        # created a moment ago and owner.json not written yet, or a foreign directory: leave it alone
        try:
            return time.time() - run.path.stat().st_mtime < STARTING_GRACE_SECONDS
        except OSError:
            return True
    except (OSError, ValueError):
        return True
    try:
        pid = int(owner["pid"])
        if owner.get("start") is None:  # written by an older pgsandbox: a start on the wall clock
            return _started_at(pid, float(owner["started"]))
        return staging.is_running(pid, int(owner["start"]))
    except (KeyError, TypeError, ValueError):
        return True


def _started_at(pid: int, started: float) -> bool:
    import psutil  # psutil only for what the standard library cannot do: a server's start on Linux imports none

    try:
        return abs(psutil.Process(pid).create_time() - started) < staging.CLOCK_TOLERANCE_SECONDS
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def _postmaster_serving(run: RunDir) -> int | None:
    import psutil

    try:
        pid = int((run.data / "postmaster.pid").read_text().splitlines()[0])
        process = psutil.Process(pid)
        if Path(process.cwd()).resolve() == run.data.resolve():
            return pid
    except (OSError, ValueError, IndexError, psutil.Error):
        pass
    return None


def _ended(process: psutil.Process) -> bool:
    """Exited: gone, or a zombie that only its parent can reap. The postmaster of a killed run is another
    process's child (init's, or a container's first process, which may reap late or never): waiting for it to
    disappear took 1-2 s per server here, and the whole timeout where nothing reaps."""
    import psutil

    try:
        if process.status() != psutil.STATUS_ZOMBIE:
            return False
    except psutil.NoSuchProcess:
        return True
    with contextlib.suppress(ChildProcessError):  # this process's own child (a kept-alive server it started)
        os.waitpid(process.pid, os.WNOHANG)
    return True


def stop_postmaster(pid: int, timeout: float = 10.0) -> None:
    """Immediate shutdown (the data is throwaway), then SIGKILL if it lingers."""
    import psutil

    try:
        process = psutil.Process(pid)
        children = process.children(recursive=True)
        process.send_signal(signal.SIGQUIT)
    except psutil.NoSuchProcess:
        return
    deadline = time.monotonic() + timeout
    while not _ended(process) and time.monotonic() < deadline:
        time.sleep(0.01)
    for straggler in [process, *children]:
        if not _ended(straggler):
            with contextlib.suppress(psutil.NoSuchProcess):
                straggler.kill()


def postmaster_serving(run: RunDir) -> int | None:
    """The pid of the postmaster serving ``run``'s data directory, if one is running."""
    return _postmaster_serving(run)


def remove_leftover(leftover: Leftover) -> None:
    """Stop the server a killed run left running (if any) and remove its directory."""
    if leftover.postmaster:
        stop_postmaster(leftover.postmaster)
    shutil.rmtree(leftover.run.path, ignore_errors=True)
