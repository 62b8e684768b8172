"""The session's start: the server starts in a thread from the first collected test that needs it, while pytest
collects the rest (pytest/state.py, BackgroundStart); what it prints, its errors and its end read as before."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from test_leftovers import gone

# a test module collected after the database test: it waits (at import, so during the collection) for the server
# the first module's test needs, and notes its postmaster's pid
WAIT_FOR_THE_SERVER = """\
import json, os, pathlib, time

def _postmaster():
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:  # the server's start removes directories (a killed run's) while this walks them
            for pid_file in pathlib.Path(os.environ["PGSANDBOX_RUNTIME_DIR"]).rglob("postmaster.pid"):
                lines = pid_file.read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return int(lines[0]), str(pid_file.parent.parent)
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    return None

FOUND = _postmaster()
pathlib.Path("during_collection.json").write_text(json.dumps(FOUND))
"""


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.slow
def test_the_server_starts_while_pytest_collects_and_its_lines_come_after_collection(
    pytester: pytest.Pytester, private_runtime: Path
) -> None:
    # a directory a killed run left half-written: the server's start removes it and says so (a progress line)
    abandoned = private_runtime / f"pgsandbox-{os.geteuid()}" / f"initdb-{dead_pid()}.1-x"
    abandoned.mkdir(parents=True)
    pytester.makepyfile(
        test_a="def test_db(pg):\n    assert pg.fetchval('select 1') == 1\n",
        test_b=WAIT_FOR_THE_SERVER + "\ndef test_plain():\n    assert FOUND is not None\n",
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=2)
    pid, run_dir = json.loads((pytester.path / "during_collection.json").read_text())
    assert gone(pid) and not Path(run_dir).exists()
    # the start's lines where they were when the sandbox started after the collection: before the first test
    result.stdout.fnmatch_lines(
        ["collected 2 items", f"pgsandbox: removed {abandoned} (0.0 MB, half-written by a killed run)", "test_a.py *"]
    )
    assert not abandoned.exists()


@pytest.mark.slow
def test_a_server_that_fails_to_start_in_the_background_says_so_at_the_first_test(
    pytester: pytest.Pytester, private_runtime: Path
) -> None:
    pytester.makepyfile(
        test_a="def test_one(pg):\n    pass\n\ndef test_two(pg):\n    pass\n",
        test_b="def test_plain():\n    pass\n",
    )
    result = pytester.runpytest("--pg-server-settings=no_such_setting=1", "-p", "no:randomly")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*pgsandbox: the local PostgreSQL server exited while starting (exit 1). Its log (*) ends with:",
            '*unrecognized configuration parameter "no_such_setting"*',
            "*fix the setting the log names (pg_server_settings?), or run `pgsandbox doctor`.*",
            "*Interrupted: pgsandbox could not set up the database*",
        ]
    )
    assert list(private_runtime.rglob("postmaster.pid")) == []
    assert not any(private_runtime.glob("pgsandbox-*/run-*"))


@pytest.mark.slow
@pytest.mark.parametrize("end", ["exit", "deselected"])
def test_a_server_started_during_collection_that_no_test_takes_is_stopped(
    pytester: pytest.Pytester, private_runtime: Path, end: str
) -> None:
    """pytest.exit() during the collection (as Ctrl-C), or a plugin that deselects the database tests after it:
    nothing is left running."""
    stop = 'import pytest\npytest.exit("stopped")\n' if end == "exit" else ""
    pytester.makepyfile(
        test_a="def test_db(pg):\n    pass\n",
        test_b=WAIT_FOR_THE_SERVER + stop + "\ndef test_plain():\n    pass\n",
    )
    pytester.makeconftest(
        "def pytest_collection_modifyitems(config, items):\n"
        "    items[:] = [item for item in items if 'pg' not in item.fixturenames]\n"
    )
    result = pytester.runpytest_inprocess("-p", "no:randomly", no_reraise_ctrlc=True)
    if end == "exit":
        assert result.ret == pytest.ExitCode.INTERRUPTED
    else:
        result.assert_outcomes(passed=1)
    found = json.loads((pytester.path / "during_collection.json").read_text())
    assert found is not None  # it did start
    pid, run_dir = found
    assert gone(pid) and not Path(run_dir).exists()
    assert "= pgsandbox =" not in result.stdout.str()  # no report of a sandbox no test used


def ready_postmaster(base: Path) -> tuple[int, Path] | None:
    """The pid and run directory of a postmaster ready under ``base``, polled for (bounded)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid_file in base.rglob("postmaster.pid"):
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return int(lines[0]), pid_file.parent.parent
        time.sleep(0.005)
    return None


@pytest.mark.slow
def test_postgres_starts_before_the_main_thread_has_imported_psycopg_and_is_connected_to_only_after(
    cache_dir: Path, tmp_path: Path
) -> None:
    # the main thread imports psycopg and the server's modules while the thread copies the cluster and spawns
    # postgres (server/launch.py imports neither); the thread connects (the password rotation) only once told
    from pgsandbox.pytest.state import BackgroundStart
    from pgsandbox.server import LocalServer
    from pgsandbox.server.passfile import FILE_NAME
    from pgsandbox.settings import Settings

    # a runtime directory of its own (no other test's server in it), on tmpfs as the default one is
    runtime = Path(tempfile.mkdtemp(prefix="pgsb-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else tmp_path))
    runtime.chmod(0o755)  # as root, the server's own account goes through it
    options = Settings(cache=cache_dir, runtime_dir=runtime)
    # the snapshot keys come later (the main thread imports the migrators meanwhile): it prepares, then waits
    cancelled = BackgroundStart(options, None)
    cancelled.cancel()  # the keys failed: it ends, having started nothing
    assert not list(runtime.rglob("postmaster.pid")) and cancelled._server is None and cancelled._error is None
    background = BackgroundStart(options, None)
    background.keyed([])
    try:
        found = ready_postmaster(runtime)
        assert found is not None, "postgres did not start before the main thread's imports were done"
        assert not (found[1] / FILE_NAME).exists()  # not connected to yet: still the cached cluster's password
    finally:
        background.imported()
    server = background.server([], None)
    try:
        assert isinstance(server, LocalServer)
        assert (server.pid, server.run_dir) == found
        assert server.admin.execute("select 1").fetchone() == (1,)
        assert (server.run_dir / FILE_NAME).exists()
    finally:
        server.stop()
        shutil.rmtree(runtime, ignore_errors=True)
    imported = subprocess.run(
        [sys.executable, "-c", "import sys, pgsandbox.server.launch; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "'psycopg'" not in imported and "'pgsandbox.server.launch'" in imported


@pytest.mark.slow
def test_a_traced_run_records_its_start_and_end_in_order(
    pytester: pytest.Pytester, private_runtime: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bench/timeline.py splits a run's time with these moments (PGSANDBOX_TRACE)
    trace_file = pytester.path / "trace.jsonl"
    monkeypatch.setenv("PGSANDBOX_TRACE", str(trace_file))
    pytester.makepyfile(test_a="def test_db(pg_conn):\n    assert pg_conn.execute('select 1').fetchone() == (1,)\n")
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    moments = [json.loads(line)["moment"] for line in trace_file.read_text().splitlines()]
    expected = [
        "sandbox: a collected test needs it",
        "imported: the server's launch",
        "server: prepared",
        "server: cluster copied",
        "server: postgres ready",
        "server: connected",
        "sandbox: started",
        "session database: created",
        "session database: connected",
        "sandbox: stopping",
        "server: stopping",
        "sandbox: stopped",
    ]
    assert [moment for moment in moments if moment in expected] == expected


@pytest.mark.slow
def test_the_objects_imported_for_the_sandbox_are_frozen_once_per_process(pytester: pytest.Pytester) -> None:
    # frozen, the garbage collector's full passes (pytest's at its end, the interpreter's) skip them; a process
    # running pytest again (pytester) does not freeze what its earlier runs left
    pytester.makepyfile(test_a="def test_db(pg_conn):\n    assert pg_conn.execute('select 1').fetchone() == (1,)\n")
    pytester.runpytest().assert_outcomes(passed=1)
    frozen = gc.get_freeze_count()
    assert frozen > 0
    pytester.runpytest().assert_outcomes(passed=1)
    assert gc.get_freeze_count() <= frozen  # (frozen objects freed by their reference counts leave it)


@pytest.mark.slow
def test_pg_gc_freeze_off_keeps_python_s_default(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_a="import gc\n\ndef test_db(pg):\n    assert pg.fetchval('select 1') == 1\n"
        "    assert gc.get_freeze_count() == 0\n"
    )
    pytester.runpytest_subprocess("-o", "pg_gc_freeze=off").assert_outcomes(passed=1)
    result = pytester.runpytest_subprocess()  # auto: the objects are frozen before the first test
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*assert * == 0*"])
