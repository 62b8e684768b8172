"""pg_keep_alive: the local server outlives the run for an idle time; the next run with the same binaries and
settings attaches to it, with fresh credentials; the idle timer fires, also after a run killed with kill -9;
doctor lists the server and clean stops it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from conftest import StartLocal
from pgsandbox.binaries import Installation
from pgsandbox.cli import main as cli_main
from pgsandbox.server import idle_watch, keepalive, runs
from pgsandbox.settings import Settings
from test_leftovers import gone

POLL_TIMEOUT = 60.0


def poll(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + POLL_TIMEOUT
    delay = 0.005
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    raise AssertionError(f"{what} did not happen within {POLL_TIMEOUT} s")


def watcher_of(run: Path) -> int:
    state = idle_watch.read_state(run)
    assert state is not None
    return int(state["watcher"][0])


@pytest.fixture
def kept_alive_stopped(private_runtime: Path) -> Iterator[Path]:
    """Every kept-alive server of the test's runtime directory is stopped at its end."""
    yield private_runtime
    for server in keepalive.kept_alive([private_runtime]):
        keepalive.stop(server.run)


RUN = """
import json, pathlib

def test_record(pg_server, pg):
    pg.execute("create table scratch (id int)")  # in this run's database, which must not reach the next run
    path = pathlib.Path("runs.json")
    done = json.loads(path.read_text()) if path.exists() else []
    first = done[0] if done else None
    leftovers = []
    if first:
        leftovers = [row[0] for row in pg_server.admin.execute(
            "select datname from pg_database where starts_with(datname, %s) "
            "union all select rolname from pg_roles where rolname = %s", [first["prefix"], first["login"]])]
    done.append({
        "pid": pg_server.pid, "run": str(pg_server.run.path), "how": pg_server.how_started,
        "dsn": pg_server.dsn, "prefix": pg_server.prefix, "login": pg_server.login.user,
        "passwords": [str(pg_server.reveal_password()), str(pg_server.login_password())],
        "leftovers": leftovers,
    })
    path.write_text(json.dumps(done))
"""


@pytest.mark.slow
@pytest.mark.usefixtures("machine_wide_servers")
def test_the_next_run_attaches_with_fresh_credentials_doctor_lists_it_and_clean_stops_it(
    project: pytest.Pytester, kept_alive_stopped: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project.makepyfile(test_run=RUN)
    results = [project.runpytest("--pg-keep-alive=1h", "-p", "no:randomly") for _ in range(2)]
    for result in results:
        result.assert_outcomes(passed=1)
    # the template stays on the server from run to run (named by its input hash)
    results[1].stdout.fnmatch_lines(
        ["pgsandbox: attached to the server kept alive in *", "*cache hit, already on the server*"]
    )
    first, second = json.loads((project.path / "runs.json").read_text())
    assert first["how"] in ("after initdb", "from the initdb cache", "from the cached cluster")
    assert second["how"] == "attached to the server an earlier run kept alive (pg_keep_alive)"
    assert (second["pid"], second["run"]) == (first["pid"], first["run"])
    # fresh credentials: the first run's databases and role are gone, its passwords no longer open anything
    assert second["leftovers"] == []
    assert second["prefix"] != first["prefix"] and second["login"] != first["login"]
    assert set(second["passwords"]).isdisjoint(first["passwords"])
    params = psycopg.conninfo.conninfo_to_dict(first["dsn"])
    for user, password in zip(["postgres", first["login"]], first["passwords"], strict=True):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(host=params["host"], port=params["port"], user=user, password=password, dbname="postgres")
    run = Path(first["run"])
    assert (run / "sock").stat().st_mode & 0o777 == 0o700 and run.stat().st_mode & 0o777 == 0o700

    assert cli_main(["doctor"]) == 0
    out = capsys.readouterr().out
    state = idle_watch.read_state(run)
    assert state is not None
    assert "Servers kept alive for the next run (pg_keep_alive): \n" in out
    assert f"  {run} (server pid {first['pid']}, key {state['key']}, idle, stops in 59 min " in out
    assert f"(`pgsandbox clean {run.name.removeprefix('run-')}` stops it)" in out

    watcher = watcher_of(run)
    assert cli_main(["clean", "--keep-cache"]) == 0
    assert f"stopped and removed the kept-alive {run} (server pid {first['pid']}" in capsys.readouterr().out
    assert gone(first["pid"]) and not run.exists()
    poll(lambda: gone(watcher), "the watcher's end")


@pytest.mark.slow
def test_idle_time_stops_the_server_a_killed_watcher_is_replaced_and_other_settings_start_another(
    start_local: StartLocal, kept_alive_stopped: Path
) -> None:
    kept = start_local(runtime_dir=kept_alive_stopped, keep_alive=2.0)
    pid, run = kept.pid, kept.run.path
    kept.stop()
    assert not gone(pid) and run.is_dir()  # kept alive for 2 s
    watcher = watcher_of(run)
    os.kill(watcher, signal.SIGKILL)  # the machine's processes were killed, say: the next run gives it another
    poll(lambda: gone(watcher), "the watcher's end")
    other = start_local(runtime_dir=kept_alive_stopped, keep_alive=2.0, server_settings=(("work_mem", "8MB"),))
    assert other.pid != pid and not other.attached_kept  # server settings differ: a server of its own
    other.stop()
    # nothing but a watcher stops an idle server: the one the other run's start gave it
    poll(lambda: gone(pid) and not run.exists(), "the idle server's stop")
    poll(lambda: gone(other.pid) and not other.run.path.exists(), "the other idle server's stop")


@pytest.mark.slow
def test_a_second_run_at_the_same_time_starts_its_own(start_local: StartLocal, kept_alive_stopped: Path) -> None:
    first = start_local(runtime_dir=kept_alive_stopped, keep_alive=60.0)
    second = start_local(
        runtime_dir=kept_alive_stopped, keep_alive=60.0
    )  # the first run holds its server: the second does not share it
    assert second.pid != first.pid and not second.attached_kept
    first.stop()
    third = start_local(runtime_dir=kept_alive_stopped, keep_alive=60.0)
    assert third.attached_kept and third.pid == first.pid
    # what the third run created goes after its end (the watcher drops it); its role may not log in from its end
    name = third.create_database("scratch")
    login, admin_dsn = third.login, third.admin_dsn
    assert login is None  # a bare server: pgsandbox.Sandbox gives it a login role (the first test checks that)
    third.stop()

    def left_behind() -> list[str]:
        with psycopg.connect(admin_dsn) as conn:  # the superuser's password is the third run's until a run attaches
            return [row[0] for row in conn.execute("select datname from pg_database where datname = %s", [name])]

    poll(lambda: not left_behind(), "the watcher's drop of the third run's database")
    fourth = start_local(runtime_dir=kept_alive_stopped, keep_alive=60.0)
    assert fourth.pid == first.pid
    assert fourth.admin.execute("select count(*) from pg_database where datname = %s", [name]).fetchone() == (0,)
    assert {server.run.path for server in keepalive.kept_alive([kept_alive_stopped])} == {
        first.run.path,
        second.run.path,
    }
    assert [server.in_use for server in keepalive.kept_alive([kept_alive_stopped])].count(True) == 2


KILLED = """
import sys
from pgsandbox import LocalServer, Settings
server = LocalServer.start(Settings.from_env())
print(server.pid, server.run.path, server.attached_kept, flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
def test_a_run_killed_while_attached_still_lets_the_server_expire(
    start_local: StartLocal, kept_alive_stopped: Path
) -> None:
    first = start_local(runtime_dir=kept_alive_stopped, keep_alive=60.0)
    pid, run = first.pid, first.run.path
    first.stop()
    env = {**os.environ, "PGSANDBOX_KEEP_ALIVE": "2s"}  # the idle time of the last run to attach counts
    owner = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert owner.stdout is not None
    assert owner.stdout.readline().split() == [str(pid), str(run), "True"]
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    poll(lambda: gone(pid) and not run.exists(), "the stop of the server the killed run was attached to")
    assert not list(runs.find_leftovers([kept_alive_stopped]))


def key_of(settings: Settings, bindir: str = "/opt/pg/18/bin", account: str = "me", cache: str = "/c") -> str:
    installation = Installation((18, 1), Path(bindir), "PATH", "postgres (PostgreSQL) 18.1")
    return keepalive.server_key(settings, installation, account, Path(cache), "jsonlog", ("--locale=C",), {"a": "1"})


def test_only_what_the_server_was_started_with_decides_whether_a_run_may_attach() -> None:
    base = key_of(Settings())
    # what the run does with the server (the idle time itself, isolation, migrations, role) does not matter
    same = Settings(keep_alive=5.0, isolation="database", migrations=("sql:m",), role="admin", version="18")
    assert key_of(same) == base
    different = [
        key_of(Settings(server_settings=(("work_mem", "8MB"),))),
        key_of(Settings(listen="none")),
        key_of(Settings(port=5433)),
        key_of(Settings(), bindir="/opt/pg/17/bin"),
        key_of(Settings(), account="postgres"),
        key_of(Settings(), cache="/other-cache"),
    ]
    assert base not in different and len(set(different)) == len(different)


def test_the_previous_superuser_password_is_read_back_from_the_passfile(tmp_path: Path) -> None:
    from pgsandbox.server.passfile import FILE_NAME, Passfile

    passfile = Passfile(tmp_path / FILE_NAME)
    passfile.add("pgsandbox_0123abcd_tests", "login-secret")
    passfile.add("postgres", "a:b\\c")
    assert keepalive.previous_superuser_password(runs.RunDir(tmp_path)) == "a:b\\c"
    assert keepalive.previous_superuser_password(runs.RunDir(tmp_path / "gone")) is None


def test_doctor_says_how_long_an_idle_server_has_left(tmp_path: Path) -> None:
    run = runs.RunDir(tmp_path)
    idle = keepalive.KeptAlive(run, "abc", 42, in_use=False, stops_in=3725.0)
    assert idle.describe() == f"{tmp_path} (server pid 42, key abc, idle, stops in 1 h 2 min)"
    busy = keepalive.KeptAlive(run, "abc", 42, in_use=True, stops_in=None)
    assert busy.describe() == f"{tmp_path} (server pid 42, key abc, in use by a run now)"
    assert (
        keepalive.KeptAlive(run, "abc", None, False, 59.2)
        .describe()
        .endswith("no server running, key abc, idle, stops in 59 s)")
    )
