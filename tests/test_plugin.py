"""The pytest side: the pg_server fixture, progress lines, concurrent runs, secrets kept out of output."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here starts a server or a process

SERVER_TEST = """
import json, pathlib, os
def test_server(pg_server):
    assert pg_server.admin.execute("select 1").fetchone() == (1,)
    pathlib.Path(os.environ["OUT"]).write_text(json.dumps(
        {"pid": pg_server.pid, "run": str(pg_server.run.path), "password": pg_server.reveal_password(),
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
    result.stdout.fnmatch_lines(["@pytest.mark.pg(isolation=..., keep_failed=..., async_driver=..., guard=...*):*"])


def test_listing_sessions_start_nothing_and_say_nothing(pytester: pytest.Pytester) -> None:
    """--fixtures, --fixtures-per-test and --collect-only collect a database test but run none: no server, no
    report; the line saying what the databases are made of comes only with a session that makes them."""
    pytester.makepyfile(test_db="def test_db(pg):\n    pass\n", test_plain="def test_plain():\n    pass\n")
    for args in (["--fixtures"], ["--fixtures-per-test"], ["--collect-only"]):
        result = pytester.runpytest(*args)
        assert result.ret == 0, args
        output = result.stdout.str()
        assert "= pgsandbox =" not in output and "pgsandbox: isolation" not in output, args
    plain = pytester.runpytest("test_plain.py")
    plain.assert_outcomes(passed=1)
    assert "pgsandbox: isolation" not in plain.stdout.str()
    both = pytester.runpytest()
    both.assert_outcomes(passed=2)
    both.stdout.fnmatch_lines(["pgsandbox: isolation transaction; migrations: none in pg_migrations", "*= pgsandbox *"])


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
    assert "passfile=" in output  # the check below would be vacuous if nothing had been printed
    assert password not in output
    cache = Path(os.environ["PGSANDBOX_CACHE"])
    for path in cache.rglob("*"):
        if path.is_file() and path.name != "password":
            assert password.encode() not in path.read_bytes(), path


REPORTED = """
    import psycopg
    import pytest

    def test_1(pg):
        pass

    def test_2_escapes(pg_conn):
        pg_conn.execute("insert into users (name) values ('x'); commit")

    @pytest.mark.pg(isolation="database")
    def test_3_leaks(pg):
        LEAKED.append(psycopg.connect(pg.dsn))

    def test_4_no_database():
        pass

    LEAKED = []
"""


def test_the_session_report(pytester: pytest.Pytester, shared_dsn: str) -> None:
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n')
    (pytester.path / "migrations").mkdir()
    (pytester.path / "migrations/1.sql").write_text("create table users (id serial primary key, name text);\n")
    pytester.makepyfile(test_reported=textwrap.dedent(REPORTED))
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "-p", "no:randomly", "--pg-report=json")
    result.assert_outcomes(passed=4, errors=2)  # tests 2 and 3 pass; their teardowns err (pg_guard = error)
    result.stdout.fnmatch_lines(
        [
            "*= pgsandbox =*",
            "server: PostgreSQL * on an existing server (127.0.0.1:*); attached in * s",
            "migrations template * (sql:migrations): cache *",
            "tests: 3 (database 1, transaction 2); pgsandbox's set-up * s and teardown * s in all",
            "databases: * created, * dropped, 0 kept",
            "findings: commits that escaped the rollback 1, connections left open 1",
            "report written to *pgsandbox-report.json",
        ]
    )
    lines = result.stdout.lines
    header = next(i for i, line in enumerate(lines) if "= pgsandbox =" in line)
    assert lines[header + 1].startswith("server: ")  # no blank line under the header
    report = json.loads((pytester.path / "pgsandbox-report.json").read_text())
    assert report["tests"] == {"transaction": 2, "database": 1}
    assert report["findings"] == {"commits that escaped the rollback": 1, "connections left open": 1}
    assert report["databases"]["created"] >= 3  # the session database, its replacement, a clone
    assert str(report["server"]["version"]).split(".")[0].isdigit()
    quiet = pytester.runpytest(f"--pg-dsn={shared_dsn}", "-q", "-k", "test_1")
    assert "= pgsandbox =" not in quiet.stdout.str()
    off = pytester.runpytest(f"--pg-dsn={shared_dsn}", "--pg-report=off", "-k", "test_1")
    assert "= pgsandbox =" not in off.stdout.str()
    bad = pytester.runpytest(f"--pg-dsn={shared_dsn}", "--pg-report=xml")
    bad.stderr.fnmatch_lines(["*--pg-report: bad value 'xml': expected term (the default), json, json:PATH or off*"])


GLUE = Path(__file__).parents[1] / "src/pgsandbox/pytest"


def test_the_driver_fixtures_name_their_types() -> None:
    """An IDE or mypy learns from the fixture what pg_psycopg2, pg_aconn and pg_asyncpg hand out."""
    tree = ast.parse((GLUE / "fixtures.py").read_text())
    returns = {
        node.name: ast.unparse(node.returns)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("pg") and node.returns
    }
    assert returns["pg_psycopg2"] == "Iterator[psycopg2.extensions.connection]"
    assert returns["pg_aconn"] == "AsyncIterator[psycopg.AsyncConnection[Any]]"
    assert returns["pg_asyncpg"] == "AsyncIterator[asyncpg.Connection]"
    untyped = [
        name for name, annotation in returns.items() if annotation in ("Any", "Iterator[Any]", "AsyncIterator[Any]")
    ]
    assert not untyped
