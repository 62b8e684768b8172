"""A copy of a cached cluster made ready for the next local server's start: the next start renames it into its run
directory instead of copying (24 MB and a thousand files for an empty cluster: 30 ms on an idle machine, 50-100
ms while the main thread imports what the tests need, and the server's start waits for it).

The copy is made while this run's server runs (``cp -a`` in a child process, started once the server is ready)
into a staging directory named after this process (``.spare-<pid>.<start>-...``: half-written by a killed run, it
is removed as the other staging directories are), and the server's stop waits for it and renames it to the name a
start takes (``spare-<key>-...``): nothing of it outlives the run. The key names the cache entry (its path and
identity), so a rebuilt or pruned entry's spare is never taken: it is removed at the next start when its cache
entry is gone (each spare records it), else with the spares beyond :data:`MAX_SPARES` per runtime directory
when the next spare is made there, and by ``pgsandbox clean``. A spare
is made only of a cluster that starts often: one that another start used within :data:`HOT_SECONDS`, or one
whose spare this start took.
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

FINISH_TIMEOUT = 60.0  # seconds the server's stop waits for the copy (24 MB: tens of milliseconds)


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


SOURCE_FILE = "source"  # in a spare: the cached cluster it copies, so that one whose cache entry went goes too


def remove_orphans(parent: Path) -> list[Path]:
    """Spares whose cached cluster is gone (the cache cleaned or pruned, a temporary cache removed): never taken
    again, so removed (each start sweeps its runtime directory)."""
    removed = []
    for spare in spares_in(parent):
        try:
            source = Path((spare / SOURCE_FILE).read_text())
        except OSError:
            continue  # taken meanwhile (or made by an older pgsandbox: MAX_SPARES bounds those)
        if not source.is_dir():
            discard(spare)
            removed.append(spare)
    return removed


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
            (spare / SOURCE_FILE).unlink()
            spare.rmdir()  # empty now (a discard that renamed it meanwhile removes it)
        return True
    return False


class CopyAhead:
    """A spare being made while this run's server runs (:meth:`start`); :meth:`finish` at its stop."""

    def __init__(self, process: subprocess.Popen[bytes], source: Path, work: Path, final: Path) -> None:
        self.process = process
        self.source = source
        self.work = work
        self.final = final

    @classmethod
    def start(cls, source: Path, parent: Path) -> CopyAhead | None:
        """Start copying ``source`` for the next start, unless a spare of it is there already. Older spares beyond
        :data:`MAX_SPARES`, and those of the same cache entry before a rebuild, go first."""
        try:  # the runtime directory may be gone (removed with the run that made it), or the cache entry
            key = key_of(source)
            spares = spares_in(parent)
        except OSError:
            return None
        if any(path.name.startswith(f"{PREFIX}{key}-") for path in spares):
            return None
        for stale in spares[: max(0, len(spares) - MAX_SPARES + 1)]:
            discard(stale)
        cp = shutil.which("cp")
        if cp is None or os.name != "posix":
            return None
        try:
            work = staging.make_staging_dir(parent, ".spare")
        except OSError:
            return None
        final = parent / f"{PREFIX}{key}-{work.name.rsplit('-', 1)[-1]}"
        try:
            process = subprocess.Popen(
                [cp, "-a", str(source), str(work / "data")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in the terminal is pytest's, which stops the copy at the server's
            )
        except OSError:
            shutil.rmtree(work, ignore_errors=True)
            return None
        return cls(process, source, work, final)

    def finish(self) -> bool:
        """Wait for the copy and give it the name a start takes; True when it is there. A copy that failed (or a
        cache entry removed meanwhile) leaves nothing."""
        try:
            done = self.process.wait(FINISH_TIMEOUT) == 0
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            done = False
        if done:
            try:
                (self.work / SOURCE_FILE).write_text(str(self.source))
                os.rename(self.work, self.final)
                return True
            except OSError:
                pass
        shutil.rmtree(self.work, ignore_errors=True)
        return False

    def abandon(self) -> None:
        """Stop the copy and remove it (the server's start failed, or a run ends without a server to take)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        shutil.rmtree(self.work, ignore_errors=True)
