"""The pytest side: the pg_server fixture, progress lines, concurrent runs, secrets kept out of output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SERVER_TEST = """
import json, pathlib, os
def test_server(pg_server):
    assert pg_server.admin.execute("select 1").fetchone() == (1,)
    pathlib.Path(os.environ["OUT"]).write_text(json.dumps(
        {"pid": pg_server.pid, "run": str(pg_server.run.path), "password": pg_server.params["password"],
         "log": str(pg_server.log_path)}))
"""


def test_pg_server_fixture_and_progress_lines(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGSANDBOX_CACHE", str(tmp_path / "fresh-cache"))
    monkeypatch.setenv("OUT", str(tmp_path / "out.json"))
    pytester.makepyfile(SERVER_TEST)
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["pgsandbox: initdb for PostgreSQL * took * s; caching it in *"])
    quiet = pytester.runpytest("-q")
    quiet.assert_outcomes(passed=1)
    assert "pgsandbox:" not in quiet.stdout.str()


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.pg(isolation=..., keep_failed=...):*"])


def test_help_lists_options_with_env_and_ini(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        ["*--pg-dsn=PG_DSN*", "*env PGSANDBOX_DSN, ini pg_dsn*", "*--pg-server-settings=VALUE*"]
    )


def test_two_concurrent_runs_share_a_cold_cache(tmp_path: Path) -> None:
    (tmp_path / "test_one.py").write_text(SERVER_TEST)
    cache = tmp_path / "cache"
    runs = []
    for index in range(2):
        env = {**os.environ, "PGSANDBOX_CACHE": str(cache), "OUT": str(tmp_path / f"out{index}.json")}
        runs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(tmp_path)],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    assert sum("initdb for PostgreSQL" in output for output in outputs) == 1  # one built, the other waited
    import json

    first, second = (json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2))
    assert first["pid"] != second["pid"] and first["run"] != second["run"]
    assert not Path(first["run"]).exists() and not Path(second["run"]).exists()


def test_no_password_in_any_output(pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a suite that prints the server, fails with its DSN in the message, and logs; scan everything."""
    monkeypatch.setenv("OUT", str(tmp_path / "out.json"))
    pytester.makepyfile(
        SERVER_TEST
        + """
import logging, psycopg
def test_prints_and_fails(pg_server):
    print("server:", pg_server, pg_server.dsn_redacted)
    logging.getLogger("app").warning("connecting to %s", pg_server.dsn_redacted)
    try:
        psycopg.connect(pg_server.dsn + " password=wrong-one")
    except psycopg.OperationalError as error:
        print("error:", error)
    assert False, f"failing on purpose: {pg_server!r}"
"""
    )
    result = pytester.runpytest_subprocess("-v", "-rA", "--log-level=DEBUG", "-s")
    result.assert_outcomes(passed=1, failed=1)
    import json

    facts = json.loads((tmp_path / "out.json").read_text())
    password = facts["password"]
    output = result.stdout.str() + result.stderr.str()
    assert "password=***" in output  # the check below would be vacuous if nothing had been printed
    assert password not in output
    cache = Path(os.environ["PGSANDBOX_CACHE"])
    for path in cache.rglob("*"):
        if path.is_file() and path.name != "password":
            assert password.encode() not in path.read_bytes(), path
