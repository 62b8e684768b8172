"""Faults while the tests run (issue 14): the server goes away, a test drops the session database or the template,
a test changes the server's logging. Each gives one message saying what happened and what to do, the tests after
it a short line, and leaves nothing running."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import StartLocal
from pgsandbox import LocalServer
from pgsandbox.server import runs

pytestmark = pytest.mark.slow  # every test here starts a server or a process

FIRST = "the local PostgreSQL server (pid"
SHORT = "pgsandbox: the PostgreSQL server went away earlier in this run (see the first error, at "

LATER_TESTS = """

def test_3_needs_a_database(pg_conn):
    pg_conn.execute("select 1")


def test_4_needs_one_too(pg):
    pg.execute("select 1")


def test_5_needs_none():
    assert True
"""


def processes_under(directory: Path) -> list[int]:
    """Processes working in ``directory`` or below it (a postgres works in its data directory)."""
    prefix = str(directory.resolve())
    found = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            target = os.readlink(cwd)
        except OSError:
            continue
        if target == prefix or target.startswith(prefix + "/"):
            found.append(int(cwd.parent.name))
    return found


def report_of(output: str, name: str) -> str:
    """The part of pytest's output about the error (or failure) of test ``name``."""
    start = output.find(f"at teardown of {name}")
    if start < 0:
        start = output.find(f"at setup of {name}")
    assert start >= 0, output
    end = output.find("_____ ", start + 1)
    return output[start : end if end > 0 else len(output)]


@pytest.fixture
def runtime() -> Iterator[Path]:
    """A runtime directory of the run's own (its server's account, root's or not, can traverse it)."""
    path = Path(tempfile.mkdtemp(prefix="pgsandbox-faults-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_killed_postmaster_is_said_once_and_later_tests_get_one_line(project: pytest.Pytester, runtime: Path) -> None:
    project.makepyfile(
        test_kill="""
import os, signal, time


def test_1_works(pg_conn):
    pg_conn.execute("insert into users (name) values ('cy')")


def test_2_kills_the_server(pg_conn, pg_server):
    backend = pg_conn.info.backend_pid
    os.kill(pg_server.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # its backends notice the postmaster's death and exit
        try:
            os.kill(backend, 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)
"""
        + LATER_TESTS
    )
    result = project.runpytest_subprocess("-p", "no:randomly", f"--pg-runtime-dir={runtime}")
    output = result.stdout.str().split("short test summary info")[0]
    result.assert_outcomes(passed=3, errors=3)
    first = report_of(output, "test_2_kills_the_server")
    assert FIRST in first and "exited during the run (killed by signal 9)" in first
    assert "test_kill.py::test_2_kills_the_server met it" in first
    assert "The server's log ends with:" in first  # the postmaster's last words, when it had any
    assert "What to do: a local server stops only when something kills it" in first
    assert "Every later test that needs a database errors at once, pointing here." in first
    assert output.count(FIRST) == 1
    for name in ("test_3_needs_a_database", "test_4_needs_one_too"):
        later = report_of(output, name)
        assert SHORT + "test_kill.py::test_2_kills_the_server)." in later
        assert "Traceback" not in later and "psycopg" not in later
    assert "Traceback" not in output and "OperationalError" not in output
    assert not processes_under(runtime)
    assert not list(runtime.glob("pgsandbox-*/run-*"))


def test_an_external_server_stopped_mid_run_is_said_once(project: pytest.Pytester, start_local: StartLocal) -> None:
    server: LocalServer = start_local(listen="127.0.0.1")
    assert server.tcp is not None
    dsn = f"postgresql://postgres:{server.reveal_password()}@127.0.0.1:{server.tcp[1]}/postgres"
    project.makepyfile(
        test_stop=f"""
import os, signal, time
from pathlib import Path


def test_1_works(pg_conn):
    pg_conn.execute("insert into users (name) values ('cy')")


def test_2_stops_the_server(pg_conn):
    os.kill({server.pid}, signal.SIGINT)  # pg_ctl stop -m fast
    deadline = time.monotonic() + 15
    while Path({str(server.run.data / "postmaster.pid")!r}).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
"""
        + LATER_TESTS
    )
    result = project.runpytest_subprocess("-p", "no:randomly", f"--pg-dsn={dsn}")
    output = result.stdout.str().split("short test summary info")[0]
    result.assert_outcomes(passed=3, errors=3)
    first = report_of(output, "test_2_stops_the_server")
    assert f"the PostgreSQL server at 127.0.0.1:{server.tcp[1]} stopped answering during the run (connection" in first
    assert "What to do: check that the server is running and reachable" in first
    assert output.count("stopped answering during the run") == 1
    for name in ("test_3_needs_a_database", "test_4_needs_one_too"):
        assert SHORT + "test_stop.py::test_2_stops_the_server)." in report_of(output, name)
    assert "Traceback" not in output and "OperationalError" not in output
    assert str(server.reveal_password()) not in output
    assert not processes_under(server.run.data)


def test_a_dropped_session_database_is_cloned_again_and_said(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_drop="""
from psycopg import sql


def test_1_writes(pg_conn):
    pg_conn.execute("insert into users (name) values ('cy')")


def test_2_drops_the_session_database(pg, pg_server):
    # what a framework's own test teardown does, through a maintenance connection
    with pg_server.connect(autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(pg.name)))


def test_3_starts_clean(pg_conn):
    assert pg_conn.execute("select count(*) from users").fetchone() == (2,)


def test_4_too(pg):
    assert pg.fetchval("select count(*) from users") == 2
"""
    )
    result = project.runpytest("-p", "no:randomly")
    output = result.stdout.str().split("short test summary info")[0]
    result.assert_outcomes(passed=4, errors=1)
    error = report_of(output, "test_2_drops_the_session_database")
    assert "the session database pgsandbox_" in error
    assert "was dropped during test_drop.py::test_2_drops_the_session_database" in error
    assert "pgsandbox cloned a new one from the template" in error
    assert "What to do: leave the session database to pgsandbox" in error
    assert "isolation='database'" in error
    assert "Traceback" not in output and "OperationalError" not in output


def test_a_dropped_template_gets_the_clone_message_in_transaction_isolation(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_template="""
from psycopg import sql


def test_1_works(pg_conn):
    pg_conn.execute("select 1")


def test_2_drops_the_templates_and_commits(pg_server, pg_admin):
    # a clean-up that drops pgsandbox's template databases (the template, the session's own copy of it)
    with pg_server.connect(autocommit=True) as conn:
        names = [row[0] for row in conn.execute(
            "select datname from pg_database where datname like 'pgsandbox%%' "
            "and (datistemplate or datname like '%%owned')"
        )]
        for name in names:
            conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    pg_admin.execute("insert into users (name) values ('x')")  # an escape: the session database is cloned again
"""
    )
    result = project.runpytest("-p", "no:randomly")
    output = result.stdout.str().split("short test summary info")[0]
    result.assert_outcomes(passed=2, errors=1)
    error = report_of(output, "test_2_drops_the_templates_and_commits")
    assert "could not clone the template pgsandbox_" in error and "does not exist" in error
    assert "What to do: check the server's log; if the template was dropped by hand, run again" in error
    assert "Traceback" not in output


def test_a_test_that_changes_the_servers_logging_does_not_cost_later_failures_their_sql(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(
        test_logging="""
def test_1_sends_the_log_elsewhere(pg_admin):
    pg_admin.execute("ALTER SYSTEM SET log_destination = 'stderr'")
    pg_admin.execute("SELECT pg_reload_conf()")


def test_2_fails(pg_conn):
    pg_conn.execute("select 42 as the_answer")
    assert False
"""
    )
    result = project.runpytest("-p", "no:randomly")
    output = result.stdout.str()
    result.assert_outcomes(passed=1, failed=1, errors=1)
    error = report_of(output, "test_1_sends_the_log_elsewhere")
    assert "changed the server's logging with ALTER SYSTEM (log_destination)" in error
    assert "pgsandbox reset it (ALTER SYSTEM RESET, pg_reload_conf())" in error
    assert "use pg_server_settings" in error
    assert "select 42 as the_answer" in output.split("pgsandbox: SQL of call")[1]  # the later failure's SQL


def test_a_statement_log_changed_behind_pgsandboxs_back_says_why_the_sql_is_missing(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(
        test_logging="""
def test_1_sends_the_log_elsewhere(pg_sandbox):
    conf = pg_sandbox.server.run.data / "pgsandbox.conf"  # not ALTER SYSTEM: nothing to reset
    conf.write_text(conf.read_text() + "log_destination = 'stderr'\\n")
    with pg_sandbox.server.connect(autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")


def test_2_fails(pg_conn):
    assert False
"""
    )
    result = project.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*pgsandbox: SQL*",
            "pgsandbox: the server no longer logs statements where pgsandbox reads them (log_destination = stderr)*",
            "  What to do: leave the server's logging settings alone in tests*",
        ]
    )


def test_a_live_run_is_not_reaped_when_the_clock_moves(
    start_local: StartLocal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """psutil's create_time() adds the boot time, which the kernel derives from the clock on each read: after a
    clock step every process's start time moves by a second or more. Another run's leftover reaper then took a
    live run for a dead one and stopped its server (xdist workers: "Connection refused")."""
    server = start_local()
    read = psutil.Process.create_time
    # what psutil says of every process once the clock stepped by 1.5 s
    monkeypatch.setattr(psutil.Process, "create_time", lambda process: read(process) + 1.5)
    assert server.run.path not in [leftover.run.path for leftover in runs.find_leftovers(runs.search_bases())]
    start_local()  # another run starting now reaps leftovers
    assert server.exited is None
    with server.connect() as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_an_xdist_worker_says_the_controllers_server_stopped_rather_than_check_your_dsn(tmp_path: Path) -> None:
    from pgsandbox import Sandbox, Settings
    from pgsandbox.errors import PgSandboxError
    from pgsandbox.pytest import xdist

    with Sandbox.start(Settings(server="local"), root=tmp_path) as sandbox:
        server = sandbox.server
        assert isinstance(server, LocalServer)
        (tmp_path / "sandbox.json").write_text(json.dumps(sandbox.handoff()))
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        with pytest.raises(PgSandboxError) as caught:
            xdist.attach({"path": str(tmp_path / "sandbox.json")}, Settings())
    message = str(caught.value)
    assert message.startswith("the xdist controller's local PostgreSQL server is no longer running, so this worker")
    assert "The server's log ends with:" in message
    assert "What to do: a local server stops only when something kills it" in message
    assert "check that the server is running and that the host and port" not in message  # not a DSN to fix
    assert not processes_under(server.run.path.parent / server.run.path.name)


def test_a_server_killed_under_xdist_is_said_once_per_worker(project: pytest.Pytester, runtime: Path) -> None:
    project.makepyfile(
        test_kill="""
import os, signal, time
import pytest


def test_0_kills_the_server(pg_conn, pg_sandbox):
    data = pg_sandbox.server.statement_log.directory.parent / "data"  # the controller's run directory
    os.kill(int((data / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
    backend = pg_conn.info.backend_pid
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(backend, 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)


@pytest.mark.parametrize("i", range(8))
def test_later(pg_conn, i):
    pg_conn.execute("select 1")
"""
    )
    result = project.runpytest_subprocess("-p", "no:randomly", "-n", "2", f"--pg-runtime-dir={runtime}")
    output = result.stdout.str().split("short test summary info")[0]
    errors = output.split("= ERRORS =")[1].split("= FAILURES =")[0]  # a test body that met it fails as it may
    # once per worker that met it: in a test, or, for a worker that attached after the kill, at its start (the
    # other worker may have finished its tests first)
    full = errors.count("stopped answering during the run") + errors.count("so this worker cannot use it")
    assert 1 <= full <= 2, output
    assert "The server's log ends with:" in errors and "unexpected postmaster exit" in errors  # the controller's
    assert errors.count(SHORT) + full == result.parseoutcomes()["errors"]  # each error: in full, or one line
    assert "Traceback" not in errors and "OperationalError" not in errors
    assert not processes_under(runtime)
