"""Nothing is left running: a run killed with kill -9 is cleaned up by the next one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from conftest import StartLocal
from pgsandbox.cli import main as cli_main

pytestmark = pytest.mark.slow  # every test here starts a server or a process

ORPHAN = textwrap.dedent(
    """
    import sys
    from pgsandbox import LocalServer, Settings
    server = LocalServer.start(Settings.from_env())
    print(server.pid, server.run.path, flush=True)
    sys.stdin.read()
    """
)


def start_orphan() -> tuple[int, Path]:
    """A process that starts a server and is then killed with SIGKILL: its postmaster lives on."""
    owner = subprocess.Popen([sys.executable, "-c", ORPHAN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    pid_text, run_dir = owner.stdout.readline().split()
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    postmaster = int(pid_text)
    assert psutil.pid_exists(postmaster)
    return postmaster, Path(run_dir)


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_next_run_stops_a_killed_runs_server(start_local: StartLocal, private_runtime: Path) -> None:
    postmaster, run_dir = start_orphan()
    lines: list[str] = []
    start_local(lines.append, runtime_dir=private_runtime)
    assert gone(postmaster)
    assert not run_dir.exists()
    assert any(
        line.startswith("stopped a server left behind by a killed run:") and str(run_dir) in line for line in lines
    )


@pytest.mark.usefixtures("machine_wide_servers", "private_runtime")
def test_doctor_lists_and_clean_stops_leftovers(capsys: pytest.CaptureFixture[str]) -> None:
    postmaster, run_dir = start_orphan()
    assert cli_main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"{run_dir} (server pid {postmaster} still running), " in out
    assert f"(`pgsandbox clean {run_dir.name.removeprefix('run-')}` stops it)" in out
    assert cli_main(["clean", "--keep-cache"]) == 0
    assert f"stopped and removed {run_dir}" in capsys.readouterr().out
    assert gone(postmaster) and not run_dir.exists()
    assert Path(os.environ["PGSANDBOX_CACHE"]).exists()


def test_live_runs_and_foreign_processes_are_left_alone(start_local: StartLocal) -> None:
    live = start_local()
    # a leftover directory whose owner is gone and whose postmaster.pid names a process that is not its server
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_dir = live.run.path.parent / "run-foreign0"
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "owner.json").write_text(json.dumps({"pid": dead.pid, "started": 0.0}))
    (run_dir / "data" / "postmaster.pid").write_text(f"{os.getpid()}\n")
    start_local()
    assert live.process.poll() is None and live.run.path.exists()
    assert psutil.Process().is_running()
    assert not run_dir.exists()


def test_ctrl_c_in_the_terminal_does_not_reach_the_server_directly(start_local: StartLocal) -> None:
    server = start_local()
    assert os.getpgid(server.pid) != os.getpgid(0)  # pytest gets SIGINT and stops it itself


def test_session_teardown_stops_the_server_on_keyboard_interrupt(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import json, pathlib
        def test_interrupted(pg_server):
            pathlib.Path("server.json").write_text(json.dumps([pg_server.pid, str(pg_server.run.path)]))
            raise KeyboardInterrupt
        """
    )
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    pid, run_dir = json.loads((pytester.path / "server.json").read_text())
    assert gone(pid) and not Path(run_dir).exists()


def test_exception_in_a_script_still_stops_the_server(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        from pgsandbox import start_server
        with start_server() as server:
            print(server.pid, server.run.path, flush=True)
            raise RuntimeError("boom")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert "RuntimeError: boom" in out.stderr
    pid, run_dir = out.stdout.split()
    assert gone(int(pid)) and not Path(run_dir).exists()
