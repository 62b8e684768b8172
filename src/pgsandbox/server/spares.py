"""A copy of a cached cluster made ready, after a run, for the next local server's start: the next start renames
it into its run directory instead of copying (24 MB and a thousand files for an empty cluster: 30 ms on an idle
machine, 50-100 ms while the main thread imports what the tests need, and the server's start waits for it).

The copy is made by a background shell (``cp -a``, then a rename into place) that this process does not wait for,
into a staging directory named after this process (``.spare-<pid>.<start>-...``: half-written by a killed run, it
is removed as the other staging directories are); only a complete copy gets the name a start takes
(``spare-<key>-...``). The key names the cache entry (its path and identity), so a rebuilt or pruned entry's
spare is never taken: it is removed, as are spares beyond :data:`MAX_SPARES` per runtime directory, by the next
spare made there, and by ``pgsandbox clean``. A spare is made only for a cluster that starts often: one that
another start used within :data:`HOT_SECONDS`, or one this run's start took a spare of.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from pgsandbox.common import staging

PREFIX = "spare-"
MAX_SPARES = 2  # per runtime directory: the clusters of the last two projects (or template sets) started
HOT_SECONDS = 3600.0

# $1 the cached cluster, $2 the staging directory, $3 the spare's name: renamed only once the copy is complete
_MAKE = 'cp -a "$1" "$2/data" && mv "$2" "$3" || rm -rf "$2"'


def key_of(source: Path) -> str:
    """The cache entry ``source`` (a cached cluster's data directory) as it is now: a rebuilt entry is another."""
    found = source.stat()
    return hashlib.sha256(f"{source}\0{found.st_ino}\0{found.st_mtime_ns}".encode()).hexdigest()[:16]


def spares_in(parent: Path) -> list[Path]:
    """Complete spares in a runtime directory (``<base>/pgsandbox-<uid>``), oldest first."""
    found: list[tuple[float, Path]] = []
    for path in parent.glob(f"{PREFIX}*"):
        with contextlib.suppress(OSError):
            found.append((path.stat().st_mtime, path))
    return [path for _, path in sorted(found)]


def discard(spare: Path) -> None:
    """Remove a spare without racing a start that takes it: renamed first (one of the two renames wins), then
    removed under a staging name of this process's (removed as a killed run's half-written directory if this
    process dies meanwhile)."""
    try:
        doomed = Path(tempfile.mkdtemp(prefix=f".spare-{staging.owner_tag()}-", dir=spare.parent))
        os.rename(spare, doomed / spare.name)
    except OSError:
        return  # gone already, or taken
    shutil.rmtree(doomed, ignore_errors=True)


def take(source: Path, destination: Path, parent: Path) -> bool:
    """Move a spare of ``source`` to ``destination`` (which must not exist); False when there is none. Two starts
    may race for one spare: the rename gives it to one of them."""
    try:
        key = key_of(source)
    except OSError:
        return False
    for spare in sorted(parent.glob(f"{PREFIX}{key}-*")):
        try:
            os.rename(spare / "data", destination)
        except OSError:
            continue
        with contextlib.suppress(OSError):
            spare.rmdir()  # empty now (a discard that renamed it meanwhile removes it)
        return True
    return False


def make_in_background(source: Path, parent: Path) -> bool:
    """Start copying ``source`` into a spare in ``parent``, unless one is there; True when started.
    Older spares beyond :data:`MAX_SPARES`, and those of the same cache entry before a rebuild, go first."""
    try:  # the runtime directory may be gone (removed with the run that made it), or the cache entry
        key = key_of(source)
        spares = spares_in(parent)
    except OSError:
        return False
    if any(path.name.startswith(f"{PREFIX}{key}-") for path in spares):
        return False
    for stale in spares[: max(0, len(spares) - MAX_SPARES + 1)]:
        discard(stale)
    cp = shutil.which("cp")
    if cp is None or os.name != "posix":
        return False
    try:
        work = staging.make_staging_dir(parent, ".spare")
    except OSError:
        return False
    final = parent / f"{PREFIX}{key}-{work.name.rsplit('-', 1)[-1]}"
    try:
        # the shell leaves the copy running and exits: nothing of it is left to wait for at this process's end
        subprocess.run(
            ["sh", "-c", f"({_MAKE}) >/dev/null 2>&1 &", "sh", str(source), str(work), str(final)],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal is pytest's, not the copy's
        )
    except (OSError, subprocess.CalledProcessError):
        shutil.rmtree(work, ignore_errors=True)
        return False
    return True
