"""Many runs, one server: a run killed with kill -9 leaves databases and a role; the next run (or
``pgsandbox reap``) drops them once the run's lock is gone, and never touches anything else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgsandbox import LocalServer, Sandbox, Settings
from pgsandbox.cli import main as cli
from pgsandbox.server import reaper

pytestmark = pytest.mark.slow  # every test here starts a server or a process

SCHEMA = "create table items (id serial primary key, name text);\n"

# a run that is killed in the middle of its test, holding a session database and a database clone
STUCK = """
    import os
    import time

    import pytest

    @pytest.mark.pg(isolation="database")
    def test_stuck(pg_conn):
        pg_conn.execute("insert into items (name) values ('x')")
        pg_conn.commit()
        open(os.environ["READY"], "w").close()
        time.sleep(120)
"""


def project(root: Path) -> None:
    (root / "migrations").mkdir(exist_ok=True)
    (root / "migrations/1.sql").write_text(SCHEMA)
    (root / "pyproject.toml").write_text('[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n')


def wait_for(condition: object, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def killed_run(tmp_path: Path, shared: LocalServer, shared_dsn: str) -> Iterator[reaper.Run]:
    """A pytest run on the shared server, killed with SIGKILL while its test runs: what it left."""
    root = tmp_path / "killed"
    root.mkdir()
    project(root)
    (root / "test_stuck.py").write_text(textwrap.dedent(STUCK))
    ready = tmp_path / "ready"
    before = set(reaper.runs_on(shared.admin))
    runner = subprocess.Popen(
        [sys.executable, "-m", "pytest", f"--pg-dsn={shared_dsn}", "-p", "no:randomly", "-q"],
        cwd=root,
        env={**os.environ, "READY": str(ready)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(ready.exists)
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait()
    finally:
        if runner.poll() is None:
            runner.kill()
    (new,) = [run for run_id, run in reaper.runs_on(shared.admin).items() if run_id not in before]
    wait_for(lambda: not reaper.alive(shared.admin, new.run_id))  # the server notices the closed connections
    yield new
    reaper.drop_dead_runs(shared.admin, [new], include_kept=True)


def existing(shared: LocalServer, names: list[str]) -> set[str]:
    rows = shared.admin.execute(
        "select datname from pg_database where datname = any(%(names)s) "
        "union all select rolname from pg_roles where rolname = any(%(names)s)",
        {"names": names},
    ).fetchall()
    return {row[0] for row in rows}


@pytest.fixture
def bystanders(shared: LocalServer) -> Iterator[list[str]]:
    """Databases and a role that only look like pgsandbox's: nobody may touch them."""
    names = ["myapp_test", "pgsandbox_notarun", "pgsandbox_tests_of_someone"]
    admin = shared.admin
    for name in names[:2]:
        admin.execute(f'create database "{name}"')
    admin.execute(f'create role "{names[2]}"')
    yield names
    for name in names[:2]:
        admin.execute(f'drop database if exists "{name}"')
    admin.execute(f'drop role if exists "{names[2]}"')


def test_the_next_run_reaps_a_killed_run(
    tmp_path: Path, shared: LocalServer, shared_dsn: str, killed_run: reaper.Run, bystanders: list[str]
) -> None:
    left = [*killed_run.databases, *killed_run.roles]
    assert len(killed_run.databases) >= 2 and killed_run.roles  # its session database, clones, its role
    assert killed_run.started is not None and killed_run.pid

    # within the grace period (default 300 s) the next run leaves it alone
    project(tmp_path)
    with Sandbox.start(Settings(dsn=shared_dsn, migrations=("sql:migrations",)), root=tmp_path) as box:
        assert box.drop_dead_runs() == []
        assert existing(shared, left) == set(left)

    lines: list[str] = []
    settings = Settings(dsn=shared_dsn, migrations=("sql:migrations",), reap_grace=0)
    with Sandbox.start(settings, root=tmp_path, progress=lines.append):
        pass
    assert existing(shared, left) == set()
    assert any(line.startswith(f"reaped what run {killed_run.run_id} on ") for line in lines), lines
    assert existing(shared, bystanders) == set(bystanders)


def test_pgsandbox_reap_lists_then_drops(
    shared: LocalServer,
    shared_dsn: str,
    killed_run: reaper.Run,
    bystanders: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    left = [*killed_run.databases, *killed_run.roles]
    own = shared.create_database()  # the server's own run is alive: its databases stay (other tests use them)
    assert cli(["reap", f"--dsn={shared_dsn}", "--grace=3600", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"leave run {killed_run.run_id}" in out
    assert cli(["reap", f"--dsn={shared_dsn}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would reap run {killed_run.run_id}" in out and all(name in out for name in left)
    assert str(shared.reveal_password()) not in out
    assert existing(shared, left) == set(left)
    assert cli(["reap", f"--dsn={shared_dsn}"]) == 0
    assert f"reap run {killed_run.run_id}" in capsys.readouterr().out
    assert existing(shared, left) == set()
    assert existing(shared, bystanders) == set(bystanders)
    assert existing(shared, [own]) == {own}
    shared.drop_database(own)


@pytest.mark.usefixtures("machine_wide_servers")  # its kept run: `pgsandbox clean` elsewhere would take it
def test_a_live_run_and_kept_databases_are_left_alone(tmp_path: Path, shared: LocalServer, shared_dsn: str) -> None:
    project(tmp_path)
    settings = Settings(dsn=shared_dsn, migrations=("sql:migrations",))
    with Sandbox.start(settings, root=tmp_path) as live:
        db = live.open("database", "kept")
        live.close(db, keep=True)
        assert reaper.alive(shared.admin, live.server.run_id)
        assert live.server.run_id not in {run.run_id for run in reaper.stale_runs(shared.admin, 0)}
    # the run ended; its kept database stays for its user, even for pgsandbox reap, unless asked
    (run,) = [run for run in reaper.runs_on(shared.admin).values() if run.run_id == live.server.run_id]
    assert run.kept == [db.name] and run.databases == []
    reaper.drop_dead_runs(shared.admin, [run])
    assert existing(shared, [db.name]) == {db.name}
    reaper.drop_dead_runs(shared.admin, [run], include_kept=True)
    assert existing(shared, [db.name, *run.roles]) == set()
