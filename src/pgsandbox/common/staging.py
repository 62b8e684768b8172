"""Half-written directories: named after their owner, so that those of a killed process are found and removed.

A cluster being made by initdb, a snapshot being copied aside or into the cache, binaries being copied or an
archive being unpacked are first written to a staging directory and renamed into place when complete. A
process killed with ``kill -9`` in between leaves the staging directory behind. Its name carries the owner's
pid and process start time (``initdb-<pid>.<start>-<random>``), so a later run can tell a dead owner's
directory from a live one's without any file written after the directory exists, and a reused pid is not
mistaken for the owner.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

KINDS = ("initdb", "snapshot", ".build", ".copy", ".unpack", ".spare")
# a staging directory named before owners were marked: abandoned when untouched for this long
UNMARKED_AGE_SECONDS = 24 * 3600.0
_NAME = re.compile(r"^(?P<kind>initdb|snapshot|\.build|\.copy|\.unpack|\.spare)-(?:(?P<pid>\d+)\.(?P<started>\d+)-)?")


CLOCK_TOLERANCE_SECONDS = 2.0  # without /proc: a start time on the wall clock, which a clock step moves


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in a unit that does not move while it runs: clock ticks since boot (Linux:
    /proc/<pid>/stat, field 22), else whole seconds of psutil's ``create_time()``; None when there is no such
    process. psutil's ``create_time()`` adds the boot time, which the kernel derives from the clock on every
    read, so a clock step (NTP, a VM's time sync) moves every process's start by a second or more: a live run
    looked dead to another run's leftover reaper, which stopped its server (seen as "Connection refused" in
    every xdist worker)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None  # a machine with /proc that has no such process
    except OSError:
        pass
    else:
        fields = stat[stat.rindex(")") + 2 :].split()  # the command name (field 2) may hold spaces and parentheses
        return int(fields[19])
    import psutil  # only without /proc (macOS): on Linux a server's start does not import it (30 ms loaded)

    try:
        return int(psutil.Process(pid).create_time())
    except psutil.NoSuchProcess:
        return None
    except psutil.Error as error:  # no permission: not knowable
        raise ProcessUnknown(pid) from error


class ProcessUnknown(Exception):
    """Whether a process runs, or when it started, cannot be told (no permission)."""


def is_running(pid: int, started: int) -> bool:
    """Whether process ``pid`` is the one that started at ``started`` (:func:`process_start`), not a later
    process that reused its pid. True when that cannot be told (no permission)."""
    try:
        now = process_start(pid)
    except ProcessUnknown:
        return True
    if now is None:
        return False
    tolerance = 0 if Path("/proc/self/stat").exists() else CLOCK_TOLERANCE_SECONDS
    return abs(now - started) <= tolerance


def owner_tag() -> str:
    pid = os.getpid()
    return f"{pid}.{process_start(pid)}"


def make_staging_dir(parent: Path, kind: str) -> Path:
    """A new, empty staging directory of ``kind`` in ``parent``, marked with this process as its owner."""
    assert kind in KINDS, kind
    return Path(tempfile.mkdtemp(prefix=f"{kind}-{owner_tag()}-", dir=parent))


@dataclass(frozen=True)
class Abandoned:
    """A staging directory whose owner is dead."""

    path: Path
    size: int

    def describe(self) -> str:
        return f"{self.path} ({self.size / 1e6:.1f} MB, half-written by a killed run)"


def owner_alive(path: Path, now: float | None = None) -> bool:
    """Whether the process that named ``path`` still runs (True for a name that is not a staging directory's)."""
    match = _NAME.match(path.name)
    if match is None:
        return True
    if match["pid"] is None:
        try:
            return (now or time.time()) - path.stat().st_mtime < UNMARKED_AGE_SECONDS
        except OSError:
            return True
    return is_running(int(match["pid"]), int(match["started"]))


def find_abandoned(parents: list[Path]) -> list[Abandoned]:
    """The staging directories directly inside ``parents`` whose owner is dead."""
    found: list[Abandoned] = []
    seen: set[Path] = set()
    for parent in parents:
        try:
            children = sorted(parent.iterdir())
        except OSError:
            continue
        for path in children:
            if path in seen or not _NAME.match(path.name) or path.is_symlink() or not path.is_dir():
                continue
            seen.add(path)
            if not owner_alive(path):
                found.append(Abandoned(path, tree_size(path)))
    return found


def remove(abandoned: Abandoned) -> None:
    shutil.rmtree(abandoned.path, ignore_errors=True)


SIZE_RECORD = ".size"  # in a finished cache entry: its size in bytes, so that the cache's total walks no entry
READY_MARKERS = ("ready", ".ready")  # what marks a finished cache entry (clusters, snapshots / installations)


def write_size_record(entry: Path) -> int:
    """Record the size of ``entry``, a cache entry that is complete and will not change again (written just before
    it is marked ready). The record holds the bytes of everything in the entry but itself; returns the entry's
    bytes with the record, as :func:`read_size_record` does."""
    size = tree_size(entry) - _file_size(entry / SIZE_RECORD)
    text = f"{size}\n"
    partial = entry / f"{SIZE_RECORD}.{os.getpid()}"
    partial.write_text(text)
    os.replace(partial, entry / SIZE_RECORD)  # a count that reads it meanwhile sees all of it or nothing
    return size + len(text.encode())


def read_size_record(entry: Path) -> int | None:
    """The bytes of ``entry`` with its record included, or None when it has no readable record."""
    try:
        text = (entry / SIZE_RECORD).read_text()
        return int(text) + len(text.encode())
    except (OSError, ValueError):
        return None


def _file_size(path: Path) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def tree_size(root: Path) -> int:
    """Bytes of the files under ``root`` (not following links)."""
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(directory, name)).st_size
    return total
