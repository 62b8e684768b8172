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

import psutil

KINDS = ("initdb", "snapshot", ".build", ".copy", ".unpack")
# a staging directory named before owners were marked: abandoned when untouched for this long
UNMARKED_AGE_SECONDS = 24 * 3600.0
_NAME = re.compile(r"^(?P<kind>initdb|snapshot|\.build|\.copy|\.unpack)-(?:(?P<pid>\d+)\.(?P<started>\d+)-)?")


def owner_tag() -> str:
    me = psutil.Process()
    return f"{me.pid}.{int(me.create_time())}"


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
    try:
        started = psutil.Process(int(match["pid"])).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True
    return abs(int(started) - int(match["started"])) <= 1


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


def tree_size(root: Path) -> int:
    """Bytes of the files under ``root`` (not following links)."""
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(directory, name)).st_size
    return total
