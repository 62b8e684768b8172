"""pytest-xdist: the controller starts one server and builds the templates once; every worker creates its own
databases on it, in both isolation modes and with every distribution mode."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here starts a server or a process

pytest.importorskip("xdist")

SCHEMA = "create table items (id serial primary key, name text not null, worker text);\n"

# Each test records what it saw; test i writes a row and checks that it is the only one: whatever ran
# before it on the same worker, in the same database, was rolled back or dropped.
TESTS = """
    import json
    import os

    import pytest

    def record(pg, path):
        row = pg.fetchone(
            "select pg_postmaster_start_time()::text as started, current_database() as db, current_user as user"
        )
        with open(path, "a") as out:
            out.write(json.dumps({{"worker": os.environ.get("PYTEST_XDIST_WORKER"), **row}}) + "\\n")

    @pytest.mark.parametrize("i", range({count}))
    def test_write(pg, i):
        pg.execute("insert into items (name, worker) values (%s, %s)", [str(i), os.environ.get("PYTEST_XDIST_WORKER")])
        assert pg.fetchval("select count(*) from items") == 1
        record(pg, {log!r})
"""


def project(pytester: pytest.Pytester, count: int = 12, ini: str = "") -> Path:
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n' + ini)
    (pytester.path / "migrations").mkdir()
    (pytester.path / "migrations/1.sql").write_text(SCHEMA)
    log = pytester.path / "seen.jsonl"
    source = textwrap.dedent(TESTS).format(count=count, log=str(log))
    (pytester.path / "test_a.py").write_text(source)
    (pytester.path / "test_b.py").write_text(source)
    return log


def seen(log: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


# each isolation once, under two of xdist's ways of spreading tests (loadfile spreads like loadscope here): every
# run starts a server and three or four pytest processes, among the suite's dearest tests (issue 15)
@pytest.mark.parametrize(
    ("workers", "dist", "isolation"),
    [
        ("2", "load", "database"),
        ("3", "loadscope", "transaction"),
    ],
)
def test_one_server_one_template_and_isolated_workers(
    pytester: pytest.Pytester, workers: str, dist: str, isolation: str
) -> None:
    log = project(pytester)
    result = pytester.runpytest("-n", workers, f"--dist={dist}", f"--pg-isolation={isolation}", "-p", "no:randomly")
    result.assert_outcomes(passed=24)
    output = result.stdout.str()
    assert len(re.findall(r"pgsandbox: migrations template \w+ \(sql:migrations\): cache (hit|miss)", output)) == 1
    assert f"tests: 24 ({isolation} 24)" in output  # the session report adds up the workers
    rows = seen(log)
    assert len({row["started"] for row in rows}) == 1  # one server for every worker
    assert len({row["worker"] for row in rows}) >= 2
    by_worker: dict[str, set[str]] = {}
    for row in rows:
        by_worker.setdefault(row["worker"], set()).add(row["db"])
    databases = [db for dbs in by_worker.values() for db in dbs]
    assert len(databases) == len(set(databases))  # no database is shared between workers
    users = {row["worker"]: row["user"] for row in rows}
    assert all(row["user"] == users[row["worker"]] for row in rows)
    assert len(set(users.values())) == len(users)  # a role of its own for each worker


@pytest.mark.usefixtures("machine_wide_servers")
def test_keep_failed_under_xdist(pytester: pytest.Pytester) -> None:
    from pgsandbox.cli import main as cli
    from pgsandbox.server import runs

    project(pytester, count=2)
    (pytester.path / "test_fail.py").write_text(
        "def test_fails(pg):\n    pg.execute(\"insert into items (name) values ('evidence')\")\n    assert False\n"
    )
    before = {leftover.run.path for leftover in runs.find_leftovers(runs.search_bases(None), include_kept=True)}
    # in a process of its own: a server kept for failed tests outlives its run, which must have ended
    result = pytester.runpytest_subprocess("-n", "2", "--pg-keep-failed", "-p", "no:randomly")
    result.assert_outcomes(passed=4, failed=1)
    # the controller lists the worker's kept database and keeps its local server running for it; the failed
    # test's SQL came from the controller's server log, read by the worker
    result.stdout.fnmatch_lines(
        [
            "*- pgsandbox: SQL of call -*",
            "1 statement, * ms in all",
            "*ms insert into items (name) values ('evidence')",
            "*pgsandbox: kept databases of failed tests*",
            "*PGPASSFILE=* '*dbname=pgsandbox_*_failed1'",
            "The local server keeps running for them; `pgsandbox clean *` stops it.",
        ]
    )
    # (a killed run of another test, running at the same time, may leave a leftover here too: only kept ones count)
    kept = [
        leftover
        for leftover in runs.find_leftovers(runs.search_bases(None), include_kept=True)
        if leftover.run.path not in before and runs.is_kept(leftover.run)
    ]
    assert len(kept) == 1 and kept[0].postmaster
    assert cli(["clean", "--keep-cache"]) == 0
    assert not kept[0].run.path.exists()


def test_a_broken_migration_under_xdist_is_reported_by_the_workers(pytester: pytest.Pytester) -> None:
    project(pytester, count=2)
    (pytester.path / "migrations/2.sql").write_text("insert into nosuch values (1);\n")
    result = pytester.runpytest("-n", "2", "-p", "no:randomly")
    outcomes = result.parseoutcomes()
    assert outcomes.get("errors", 0) >= 1 and not outcomes.get("passed")
    result.stdout.fnmatch_lines(
        ["*pgsandbox: migration migrations/2.sql failed at line 1, column 13:*", '*relation "nosuch" does not exist*']
    )


# Two tests on two workers, each making a role and using it (pg_role = admin: the same user for both), in an order
# the tests force with polls: b makes its role while a waits; a makes its own and waits until b's teardown has
# dropped b's role; b ends meanwhile. Each role is the test's that made it: b's teardown must not name or drop a's.
ROLES = """
    import os
    import time

    import psycopg

    def until(check, what):
        deadline = time.monotonic() + 60
        while not check():
            assert time.monotonic() < deadline, f"waited 60 s for {what}"
            time.sleep(0.01)

    def role_exists(pg, name):
        return pg.fetchval("select count(*) from pg_roles where rolname = %s", [name]) == 1

    def use_role(pg, name):
        # a query on pg_roles first: SET ROLE alone may not yet see a role another connection just committed
        assert role_exists(pg, name)
        pg.execute(f"set role {name}")

    def test_a_long_user_of_its_role(pg, pg_admin):
        until(lambda: role_exists(pg, "reader_b"), "the other worker's test to make its role")
        pg_admin.execute("create role reader_a")
        use_role(pg, "reader_a")
        until(lambda: not role_exists(pg, "reader_b"), "the other worker's test to end")
        assert role_exists(pg, "reader_a"), "the other worker's teardown dropped this test's role"
        assert pg.fetchval("select current_user") == "reader_a"

    def test_b_short_user_of_its_role(pg):
        with psycopg.connect(pg.dsn, autocommit=True) as app:  # the app's own connection
            app.execute("create role reader_b")
        use_role(pg, "reader_b")
        until(lambda: role_exists(pg, "reader_a"), "the other worker's test to make its role")
        assert pg.fetchval("select current_user") == "reader_b"
"""


def test_roles_made_on_two_workers_are_each_their_tests(pytester: pytest.Pytester) -> None:
    project(pytester, count=0)
    (pytester.path / "test_a.py").unlink()
    (pytester.path / "test_b.py").unlink()
    (pytester.path / "test_roles.py").write_text(textwrap.dedent(ROLES))
    result = pytester.runpytest("-n", "2", "--pg-role=admin", "-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines_random(
        [
            "*test_roles.py::test_a_long_user_of_its_role created role 'reader_a' on the server, outside its "
            "database*pgsandbox dropped them.*",
            "*test_roles.py::test_b_short_user_of_its_role created role 'reader_b' on the server, outside its "
            "database*pgsandbox dropped them.*",
        ]
    )
