"""The files a template build read: kept with the template, so that a change to one rebuilds it.

A ``python:`` migration or a hook that reads a package file (a ``schema.sql``, a CSV of seed rows) gets a
stale template when that file changes, unless the user listed it in ``pg_migrations_inputs``. During a build
an audit hook (``sys.addaudithook``, the "open" event) records the files opened for reading; the files of
Python itself, of installed packages and of pgsandbox are left out, and so are Python modules (whether a
module is opened during the build depends on whether something imported it before: not a reliable record).
The record (path and SHA-256) is stored with the template; a template whose recorded file changed is rebuilt.

An audit hook cannot be removed: one is added on the first build and does nothing (a dictionary lookup)
outside builds.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import site
import sys
import sysconfig
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

# pgsandbox's own threads (cluster caches, clones) copy files while a build may run
OWN_THREADS = ("pgsandbox-cache-writer", "pgsandbox-snapshot-writer", "pgsandbox-clone-")
CODE_SUFFIXES = (".py", ".pyc", ".pyi", ".pth", ".so", ".pyd")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

_recorders: list[tuple[set[str], set[str]]] = []  # (opened for reading, opened for writing) per build
_hooked = False
_lock = threading.Lock()


PACKAGE_DIR = str(Path(__file__).resolve().parents[1])  # pgsandbox itself


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if event != "open" or not _recorders:
        return
    path, _, flags = args
    if not isinstance(path, (str, bytes, os.PathLike)) or threading.current_thread().name.startswith(OWN_THREADS):
        return
    name = os.path.abspath(os.fsdecode(path))
    writes = isinstance(flags, int) and bool(flags & WRITE_FLAGS)
    for read, written in _recorders:
        (written if writes else read).add(name)


@contextlib.contextmanager
def recording() -> Iterator[set[str]]:
    """The absolute paths of the files opened for reading while the block runs (unfiltered), except those it
    also wrote: a file the build wrote is its output (a temporary file), not an input."""
    global _hooked
    with _lock:
        if not _hooked:
            sys.addaudithook(_hook)
            _hooked = True
    read: set[str] = set()
    written: set[str] = set()
    recorder = (read, written)
    _recorders.append(recorder)
    try:
        yield read
    finally:
        _recorders.remove(recorder)
        read -= written


def ignored_roots() -> tuple[str, ...]:
    """Directories of Python itself, installed packages and pgsandbox (each ending with a separator)."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, PACKAGE_DIR}
    roots.update(path for path in sysconfig.get_paths().values())
    with contextlib.suppress(AttributeError):
        roots.update(site.getsitepackages())
    with contextlib.suppress(AttributeError):
        roots.add(site.getusersitepackages())
    roots.update(("/dev", "/proc", "/sys"))
    return tuple(os.path.join(os.path.realpath(root), "") for root in roots if root)


def watched(opened: Iterable[str], inputs: Iterable[Path]) -> list[Path]:
    """Of the files a build opened, those worth watching: regular data files of the project (or anywhere
    else), not among the migrators' hashed inputs, not Python's, an installed package's or pgsandbox's."""
    ignored = ignored_roots()
    hashed = {os.path.realpath(path) for path in inputs}
    found = set()
    for name in opened:
        real = os.path.realpath(name)
        if real in hashed or real.endswith(CODE_SUFFIXES) or "__pycache__" in real:
            continue
        if real.startswith(ignored) or not os.path.isfile(real):
            continue
        found.add(Path(real))
    return sorted(found)


def digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def record(files: Iterable[Path], root: Path | None) -> dict[str, str]:
    """{path: sha256}; paths under ``root`` relative to it (the same project in another checkout matches)."""
    result = {}
    for path in files:
        sha = digest(path)
        if sha is not None:
            result[shown(path, root)] = sha
    return result


def shown(path: Path, root: Path | None) -> str:
    if root is not None:
        with contextlib.suppress(ValueError):
            return str(path.relative_to(root))
    return str(path)


def changed(recorded: Mapping[str, str], root: Path | None) -> list[str]:
    """The recorded files whose content is not what the build read (or that are gone)."""
    stale = []
    for name, sha in recorded.items():
        path = Path(name)
        if not path.is_absolute() and root is not None:
            path = root / path
        if digest(path) != sha:
            stale.append(name)
    return stale
