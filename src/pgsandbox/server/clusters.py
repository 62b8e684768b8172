"""The clusters of the cache directory: initdb runs once per (binaries, initdb options); a snapshot is a stopped
cluster holding built templates; the least recently used go beyond pg_cache_max_size.

Each run copies the cached cluster instead of running initdb. The cached cluster's superuser password
lives beside it (0600); every run replaces it with a fresh random one before anything else connects.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import platformdirs
from filelock import BaseFileLock, FileLock, Timeout

from pgsandbox.binaries import Installation, build_id
from pgsandbox.common.progress import Progress
from pgsandbox.common.redact import Secret, redact, register_secret
from pgsandbox.common.staging import (
    READY_MARKERS,
    make_staging_dir,
    read_size_record,
    tree_size,
    write_size_record,
)
from pgsandbox.errors import PgSandboxWarning, ServerStartError
from pgsandbox.server.osuser import Account

LAYOUT = 1  # bump when the cached cluster's shape changes
SUPERUSER = "postgres"
DEFAULT_INITDB_ARGS = ("--encoding=UTF8", "--locale=C", "--wal-segsize=1")


def default_cache_root() -> Path:
    env = os.environ.get("PGSANDBOX_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("pgsandbox", appauthor=False))


def cache_root(configured: Path | None = None) -> Path:
    """The cache directory, created if needed; a read-only one falls back to a temporary one."""
    root = configured or default_cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
        return root
    except OSError as error:
        fallback = Path(tempfile.gettempdir()) / f"pgsandbox-cache-{os.geteuid()}"
        fallback.mkdir(mode=0o700, exist_ok=True)
        warnings.warn(
            PgSandboxWarning(
                f"pgsandbox cache {root} is not writable ({error.strerror}); using {fallback} for this run. "
                "Set PGSANDBOX_CACHE or pg_cache to a writable directory to keep the cache between runs."
            ),
            stacklevel=2,
        )
        return fallback


@dataclass(frozen=True)
class CachedCluster:
    data: Path
    password: str
    fresh: bool = False  # initdb made it just now (it goes into the cache after)
    used_before: float | None = None  # when a start last used it (wall clock), None if never

    def recently_used(self, seconds: float) -> bool:
        return self.used_before is not None and time.time() - self.used_before < seconds


def initdb_key(installation: Installation, initdb_args: tuple[str, ...], root: Path) -> str:
    """The build of the binaries (not where they are: binaries.build_id) and initdb's options."""
    material = json.dumps([LAYOUT, build_id(installation, root), installation.version_text, list(initdb_args)])
    return hashlib.sha256(material.encode()).hexdigest()[:16]


_writers: list[threading.Thread] = []


def wait_for_cache_writes() -> None:
    """Block until clusters built by this process are in the cache."""
    while _writers:
        _writers.pop().join()


@contextlib.contextmanager
def cluster_source(
    installation: Installation,
    account: Account,
    root: Path,
    scratch: Path,
    initdb_args: tuple[str, ...] = (),
    progress: Progress | None = None,
    max_size: int = 0,
) -> Iterator[CachedCluster]:
    """A pristine cluster for these binaries and options to copy from inside the ``with`` block.

    From the cache when it is there. Otherwise initdb runs (as the server's account, in ``scratch``) under a
    file lock, the caller copies the fresh cluster, and a background thread stores it in the cache and then
    releases the lock: writing 30 MB to a disk cache would otherwise double a cold start.
    """
    args = (*DEFAULT_INITDB_ARGS, *initdb_args)
    target = root / "initdb" / initdb_key(installation, args, root)
    # a writer of this process may hold the lock, even once "ready" is there (it releases the lock last): wait
    # for it (filelock 4 refuses, rather than waits for, a lock another instance acquired in this thread)
    wait_for_cache_writes()
    target.parent.mkdir(parents=True, exist_ok=True)
    # held while the caller copies a cached cluster, so that pruning (prune_cache) leaves it alone, and while
    # a new one is made and stored, so that concurrent runs wait for it instead of running initdb too
    lock = FileLock(str(target) + ".lock", thread_local=False)
    lock.acquire()
    if (target / "ready").exists():
        try:
            password: str = Secret((target / "password").read_text().strip())
            register_secret(password)
            used_before = _touch(target / "ready")
            yield CachedCluster(target / "data", password, used_before=used_before)
        finally:
            lock.release()
        return
    try:
        work, password = _initdb(installation, account, scratch, args, target, progress)
    except BaseException:
        lock.release()
        raise
    try:
        yield CachedCluster(work / "data", password, fresh=True)
    except BaseException:
        lock.release()
        shutil.rmtree(work, ignore_errors=True)
        raise
    writer = threading.Thread(
        target=_store, args=(work, target, password, lock, max_size), name="pgsandbox-cache-writer"
    )
    writer.start()
    _writers.append(writer)


def _initdb(
    installation: Installation,
    account: Account,
    scratch: Path,
    args: tuple[str, ...],
    target: Path,
    progress: Progress | None,
) -> tuple[Path, str]:
    started = time.perf_counter()
    password = Secret(secrets.token_urlsafe(24))
    register_secret(password)
    work = make_staging_dir(scratch, "initdb")
    pwfile = work / "pwfile"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    account.chown(work)
    command = [
        str(installation.tool("initdb")),
        "-D",
        str(work / "data"),
        "-U",
        SUPERUSER,
        f"--pwfile={pwfile}",
        "--auth=scram-sha-256",
        "--no-sync",
        "--no-instructions",
        *args,
    ]
    out = subprocess.run(command, capture_output=True, text=True, **account.popen_kwargs())
    pwfile.unlink()
    if out.returncode != 0:
        shutil.rmtree(work, ignore_errors=True)
        raise ServerStartError(
            f"initdb failed for {installation.describe()} (exit {out.returncode}):\n"
            + redact((out.stderr or out.stdout).strip()),
            "check pg_initdb_args, or pick other binaries with --pg-bin / --pg-version.",
        )
    trim_wal(installation, work / "data")
    if progress:
        progress(
            f"initdb for PostgreSQL {installation.version_string} took {time.perf_counter() - started:.2f} s; "
            f"caching it in {target}"
        )
    return work, password


WAL_SEGMENT = re.compile(r"^[0-9A-F]{24}$")


def trim_wal(installation: Installation, data: Path) -> None:
    """Remove the WAL segments of a cleanly stopped cluster that hold nothing it needs: every one but its last
    checkpoint's (the others are old, or recycled for later writes). Every run copies the cluster: initdb leaves
    7 segments of 1 MB, a fifth of the cluster's 30 MB. Nothing is removed when the cluster was not shut down
    cleanly, or when pg_controldata is missing or says something else."""
    try:
        out = subprocess.run(
            [str(installation.tool("pg_controldata")), "-D", str(data)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "LC_ALL": "C"},
        )
    except (OSError, subprocess.SubprocessError):
        return
    fields = dict(line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)
    state = fields.get("Database cluster state", "").strip()
    keep = fields.get("Latest checkpoint's REDO WAL file", "").strip()
    if out.returncode != 0 or state != "shut down" or not WAL_SEGMENT.match(keep):
        return
    for path in (data / "pg_wal").iterdir():
        if WAL_SEGMENT.match(path.name) and path.name != keep and path.is_file():
            path.unlink()


def _store(work: Path, target: Path, password: str, lock: FileLock, max_size: int = 0) -> None:
    staging = make_staging_dir(target.parent, ".build")
    try:
        copy_tree(work / "data", staging / "data")
        (staging / "password").write_text(password + "\n")
        (staging / "password").chmod(0o600)
        write_size_record(staging)
        staging.chmod(0o700)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        (target / "ready").touch()
    except OSError as error:
        warnings.warn(PgSandboxWarning(f"pgsandbox could not cache initdb in {target}: {error}"), stacklevel=1)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        lock.release()
    prune_cache(target.parent.parent, max_size)


SNAPSHOTS_KEPT = 3


def snapshot_dir(root: Path, installation: Installation, initdb_args: tuple[str, ...]) -> Path:
    """Where clusters holding built templates are kept, per binaries and initdb options."""
    return root / "snapshots" / initdb_key(installation, (*DEFAULT_INITDB_ARGS, *initdb_args), root)


def snapshot_build_lock(directory: Path, keys: list[str], progress: Progress | None) -> FileLock | None:
    """When the most complete snapshot is missing, a lock held until it is stored (or the run ends), so that
    concurrent runs with the same migrations build the templates once: the others wait, then start from it."""
    if not keys or (directory / keys[0][:32] / "ready").exists():
        return None
    wait_for_cache_writes()  # a snapshot this process is still storing (see cluster_source)
    if (directory / keys[0][:32] / "ready").exists():
        return None
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / f"{keys[0][:32]}.building"), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if progress:
            progress("waiting for another run that is building the same templates")
        lock.acquire()
    return lock


@contextlib.contextmanager
def snapshot_source(directory: Path, keys: list[str]) -> Iterator[tuple[str, CachedCluster] | None]:
    """The first of ``keys`` with a stored cluster (keys are template input hashes, most complete first),
    locked against pruning while the caller copies it."""
    for key in keys:
        target = directory / key[:32]
        if not (target / "ready").exists():
            continue
        with FileLock(str(target) + ".lock"):
            if not (target / "ready").exists():
                continue
            password: str = Secret((target / "password").read_text().strip())
            register_secret(password)
            used_before = _touch(target / "ready")
            yield key, CachedCluster(target / "data", password, used_before=used_before)
            return
    yield None


def store_snapshot_in_background(
    staging: Path,
    directory: Path,
    key: str,
    password: str,
    replace: bool,
    lock: BaseFileLock | None,
    max_size: int = 0,
) -> Path:
    """Store ``staging/data`` as a snapshot in a background thread, then remove ``staging`` and release
    ``lock``; :func:`wait_for_cache_writes` waits for it (a server's stop does)."""

    def write() -> None:
        try:
            store_snapshot(staging / "data", directory, key, password, replace, max_size)
        except OSError as error:
            warnings.warn(
                PgSandboxWarning(f"pgsandbox could not cache the cluster in {directory}: {error}"), stacklevel=1
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if lock is not None:
                lock.release()

    writer = threading.Thread(target=write, name="pgsandbox-snapshot-writer")
    writer.start()
    _writers.append(writer)
    return directory / key[:32]


def store_snapshot(
    data: Path, directory: Path, key: str, password: str, replace: bool = False, max_size: int = 0
) -> Path:
    """Copy a stopped cluster's data directory into the snapshot cache; keep the newest few, and the whole cache
    within ``max_size`` bytes (0: no bound)."""
    target = directory / key[:32]
    directory.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(directory, ".build")
    try:
        copy_tree(data, staging / "data")
        (staging / "password").write_text(password + "\n")
        (staging / "password").chmod(0o600)
        write_size_record(staging)
        staging.chmod(0o700)
        with FileLock(str(target) + ".lock"):
            if replace or not (target / "ready").exists():
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
                (target / "ready").touch()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _prune_snapshots(directory)
    prune_cache(directory.parent.parent, max_size)
    return target


def _prune_snapshots(directory: Path) -> None:
    ready = []
    for path in directory.iterdir():
        with contextlib.suppress(OSError):
            ready.append(((path / "ready").stat().st_mtime, path))
    ready.sort(reverse=True)
    for _, path in ready[SNAPSHOTS_KEPT:]:
        with FileLock(str(path) + ".lock"):
            shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path(str(path) + ".lock").unlink()


@dataclass(frozen=True)
class Pruned:
    path: Path
    size: int


def prune_cache(root: Path, max_size: int) -> list[Pruned]:
    """Remove the least recently used clusters (snapshots, then initdb's too) until the cache at ``root`` is
    within ``max_size`` bytes (0: no bound).

    The most recently used snapshot and initdb cluster stay, whatever the bound; so does a cluster a run is
    copying from (its file lock is held: :func:`snapshot_source`, :func:`cluster_source`) or storing. Installed
    binaries are never removed here: a running server uses them and holds no lock on them.
    """
    if max_size <= 0 or not root.is_dir():
        return []
    total = cache_size(root)
    if total <= max_size:
        return []
    candidates: list[tuple[float, Path]] = []
    for kind in (root.glob("snapshots/*/*/ready"), root.glob("initdb/*/ready")):
        used = sorted(((path.stat().st_mtime, path.parent) for path in kind if path.is_file()), reverse=True)
        candidates += used[1:]  # the newest of each kind stays
    pruned: list[Pruned] = []
    for _, path in sorted(candidates):
        if total <= max_size:
            break
        lock = FileLock(str(path) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # a run copies it right now
        try:
            size = entry_size(path)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            lock.release()
        with contextlib.suppress(OSError):
            Path(str(path) + ".lock").unlink()
        total -= size
        pruned.append(Pruned(path, size))
    return pruned


def _touch(ready: Path) -> float | None:
    """Mark a cached cluster used now (pruning keeps the recently used); when it was used before."""
    try:
        before = ready.stat().st_mtime
        os.utime(ready)
    except OSError:
        return None
    return before


def copy_tree(source: Path, destination: Path) -> None:
    """Copy a data directory, keeping modes; ``cp -a`` is about 3x faster than shutil here."""
    cp = shutil.which("cp")
    if cp and os.name == "posix":
        out = subprocess.run([cp, "-a", str(source), str(destination)], capture_output=True, text=True)
        if out.returncode == 0:
            return
        shutil.rmtree(destination, ignore_errors=True)
        if "No space left on device" in out.stderr:  # copytree would list every file that did not fit
            raise OSError(errno.ENOSPC, "No space left on device", str(destination))
    shutil.copytree(source, destination, symlinks=True)


def cache_size(root: Path) -> int:
    """Bytes in the cache. A finished entry (a cluster, a snapshot, installed binaries) is counted by the size
    recorded when it was written (it never changes after); the rest (locks, catalogs, half-written entries) file
    by file. Walking every file of a large cache took about 0.2 s, at the end of every run."""
    total = 0
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as scan:
                entries = list(scan)
        except OSError:
            continue
        if any(entry.name in READY_MARKERS for entry in entries):
            total += entry_size(directory)
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.is_dir():
                    if not entry.is_symlink():  # as os.walk: a link to a directory is neither walked nor counted
                        pending.append(Path(entry.path))
                else:
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def entry_size(entry: Path) -> int:
    """The bytes of a finished cache entry: its size record, else (an entry written before the records) its files
    counted one by one, and then recorded, under the entry's lock, so that the next count reads the record."""
    recorded = read_size_record(entry)
    if recorded is not None:
        return recorded
    lock = FileLock(str(entry) + ".lock", thread_local=False)
    try:
        lock.acquire(timeout=0)
    except OSError:  # Timeout: a run copies, stores or prunes it right now
        return tree_size(entry)
    try:
        if not any((entry / marker).exists() for marker in READY_MARKERS):
            return tree_size(entry)  # pruned or being replaced meanwhile
        try:
            return write_size_record(entry)
        except OSError:  # a cache this user may read but not write
            return tree_size(entry)
    finally:
        lock.release()
