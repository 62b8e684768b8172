"""A clean database every test: transaction and database isolation, escapes, leaks, markers, keep-failed."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import textwrap
from pathlib import Path

import psycopg
import pytest

from conftest import StartLocal
from pgsandbox import LocalServer
from pgsandbox.binaries import working_psql
from pgsandbox.server import Server, runs


def run(project: pytest.Pytester, shared_dsn: str, source: str, *args: str) -> pytest.RunResult:
    project.makepyfile(test_it=textwrap.dedent(source))
    return project.runpytest(f"--pg-dsn={shared_dsn}", "-p", "no:randomly", *args)


@pytest.mark.slow
def test_transaction_isolation_rolls_back_and_keeps_commits_inside(project: pytest.Pytester, shared_dsn: str) -> None:
    result = run(
        project,
        shared_dsn,
        """
        import psycopg

        def count(conn):
            return conn.execute("select count(*) from users").fetchone()[0]

        def service_create(conn, name):
            # code under test that manages its transaction
            conn.execute("insert into users (name) values (%s)", [name])
            conn.commit()

        def test_1_commit_stays_inside(pg_conn):
            service_create(pg_conn, "cy")
            assert count(pg_conn) == 3

        def test_2_previous_write_is_gone(pg_conn, pg):
            assert count(pg_conn) == 2
            assert pg.connect() is pg_conn
            from pgsandbox.errors import PgSandboxError
            try:
                pg.connect(autocommit=True)
            except PgSandboxError as error:
                assert "returns the test's one connection and takes no options" in str(error)
            else:
                raise AssertionError("pg.connect(autocommit=True) was accepted in transaction isolation")

        def test_3_rollback_goes_back_to_the_last_commit(pg_conn):
            service_create(pg_conn, "cy")
            pg_conn.execute("insert into users (name) values ('dee')")
            pg_conn.rollback()
            assert count(pg_conn) == 3

        def test_4_failed_statement_then_rollback(pg_conn):
            service_create(pg_conn, "cy")
            try:
                pg_conn.execute("insert into users (name) values ('ada')")
            except psycopg.errors.UniqueViolation:
                pg_conn.rollback()
            assert count(pg_conn) == 3

        def test_5_nested_transaction_blocks(pg_conn):
            with pg_conn.transaction():
                pg_conn.execute("insert into users (name) values ('e')")
                try:
                    with pg_conn.transaction():
                        pg_conn.execute("insert into users (name) values ('f')")
                        raise ValueError
                except ValueError:
                    pass
            assert count(pg_conn) == 3

        def test_6_with_connection_block_commits_and_closes(pg_conn):
            with pg_conn:
                pg_conn.execute("insert into users (name) values ('g')")
            assert not pg_conn.closed
            assert count(pg_conn) == 3

        def test_7_autocommit_is_refused_with_a_hint(pg_conn):
            import pytest
            with pytest.raises(psycopg.ProgrammingError, match="isolation='database'"):
                pg_conn.autocommit = True
            assert pg_conn.autocommit is False

        def test_8_everything_was_rolled_back(pg):
            assert pg.fetch("select name from users order by name") == [{"name": "ada"}, {"name": "bob"}]
            assert pg.isolation == "transaction"
        """,
    )
    result.assert_outcomes(passed=8)


@pytest.mark.slow
def test_a_raw_commit_is_reported_and_the_next_test_starts_clean(project: pytest.Pytester, shared_dsn: str) -> None:
    result = run(
        project,
        shared_dsn,
        """
        def test_1_raw_commit(pg_conn):
            pg_conn.execute("insert into users (name) values ('leak')")
            pg_conn.execute("COMMIT")

        def test_2_clean(pg):
            assert pg.fetchval("select count(*) from users") == 2
        """,
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_1_raw_commit*",
            "*test_it.py::test_1_raw_commit committed outside its transaction, so its writes escaped the rollback:"
            " its transaction was ended by a COMMIT (or END) statement run on the test's connection.",
            "*Changed: public.users (+1 row, 1 row written).",
            "*pgsandbox cloned the session database again from the template: the next test starts clean.",
            "*What to do: call conn.commit() on the connection pgsandbox gave you*",
        ]
    )


@pytest.mark.slow
def test_a_second_connection_that_commits_is_reported(project: pytest.Pytester, shared_dsn: str) -> None:
    result = run(
        project,
        shared_dsn,
        """
        import psycopg

        def test_1_second_connection(pg):
            with psycopg.connect(pg.dsn) as other:
                other.execute("delete from users where name = 'bob'")
                other.execute("update users set name = 'ADA'")

        def test_2_clean(pg):
            assert pg.fetchval("select string_agg(name, ',' order by name) from users") == "ada,bob"

        def test_3_read_only_second_connection_is_fine(pg):
            with psycopg.connect(pg.dsn) as other:
                assert other.execute("select count(*) from users").fetchone() == (2,)
        """,
    )
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*test_1_second_connection committed outside its transaction*another connection to the session "
            "database committed.",
            "*Changed: public.users (-1 row, 1 row written).",
        ]
    )


# An app that installs its own database objects through a connection of its own (as job queues and reporting
# modules do): a function, a schema, a view, committed outside the test's transaction.
APP_OBJECTS = """
    import psycopg

    OBJECTS = {
        "function": "create function public.total_users() returns bigint language sql as 'select count(*) from users'",
        "schema": "create schema reporting",
        "view": "create view public.user_names as select name from users",
    }

    def install(dsn, kind):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(OBJECTS[kind])

    def assert_clean(pg):
        assert pg.fetchval("select count(*) from pg_proc where proname = 'total_users'") == 0
        assert pg.fetchval("select count(*) from pg_namespace where nspname = 'reporting'") == 0
        assert pg.fetchval("select count(*) from pg_class where relname = 'user_names'") == 0

    def test_1_installs_a_function(pg):
        install(pg.dsn, "function")

    def test_2_clean(pg):
        assert_clean(pg)

    def test_3_installs_a_schema(pg):
        install(pg.dsn, "schema")

    def test_4_clean(pg):
        assert_clean(pg)

    def test_5_installs_a_view(pg):
        install(pg.dsn, "view")

    def test_6_clean(pg):
        assert_clean(pg)
"""


@pytest.mark.slow
def test_objects_a_second_connection_commits_are_reported_and_removed(
    project: pytest.Pytester, shared_dsn: str
) -> None:
    result = run(project, shared_dsn, APP_OBJECTS)
    result.assert_outcomes(passed=6, errors=3)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_1_installs_a_function*",
            "*test_1_installs_a_function committed outside its transaction*another connection to the session "
            "database committed.",
            "*Changed: function public.total_users() (created).",
            "*pgsandbox cloned the session database again from the template: the next test starts clean.",
            "*ERROR at teardown of test_3_installs_a_schema*",
            "*Changed: schema reporting (created).",
            "*ERROR at teardown of test_5_installs_a_view*",
            "*Changed: view public.user_names (created).",
        ]
    )


# pg_admin commits whatever it runs; a table under forced row-level security whose policy needs a setting the
# app sets per request (a multi-tenant schema): counting its rows as the tests' role would fail.
ADMIN_WRITES = """
    import psycopg

    def test_1_admin_makes_a_table_and_a_user(pg_admin):
        pg_admin.execute("create table audit (id int)")  # owned by the admin: the tests' role may not read it
        pg_admin.execute("insert into audit values (1)")
        pg_admin.execute("insert into users (name) values ('by the admin')")

    def test_2_admin_turns_on_row_level_security(pg_admin):
        pg_admin.execute("alter table users enable row level security")

    def test_3_clean(pg):
        assert pg.fetchval("select count(*) from pg_class where relname = 'audit'") == 0
        assert pg.fetchval("select relrowsecurity from pg_class where relname = 'users'") is False
        assert pg.fetchval("select count(*) from users") == 2

    def test_4_admin_only_reads(pg_admin, pg):
        assert pg_admin.execute("select count(*) from users").fetchone() == (2,)

    def test_5_the_app_writes_beside_a_tenant_table(pg):
        with psycopg.connect(pg.dsn, autocommit=True) as app:
            app.execute("set app.tenant = 'acme'")
            app.execute("insert into notes (tenant, body) values ('acme', 'escaped')")
"""
TENANT_NOTES = """
create table notes (tenant text not null, body text);
alter table notes enable row level security;
alter table notes force row level security;
create policy by_tenant on notes using (tenant = current_setting('app.tenant'));
"""


@pytest.mark.slow
def test_what_pg_admin_commits_in_transaction_isolation_is_reported(project: pytest.Pytester, shared_dsn: str) -> None:
    (project.path / "migrations/2.sql").write_text(TENANT_NOTES)
    result = run(project, shared_dsn, ADMIN_WRITES)
    result.assert_outcomes(passed=5, errors=3)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_1_admin_makes_a_table_and_a_user*",
            "*test_1_admin_makes_a_table_and_a_user committed outside its transaction, so its writes escaped the "
            "rollback: its pg_admin connection, outside the test's transaction, committed.",
            "*Changed: public.audit (created, 1 row), public.users (+1 row, 1 row written).",
            "*ERROR at teardown of test_2_admin_turns_on_row_level_security*",
            "*Changed: table public.users (altered).",
            "*ERROR at teardown of test_5_the_app_writes_beside_a_tenant_table*",
            "*Changed: public.notes (+1 row, 1 row written).",
        ]
    )


@pytest.mark.slow
def test_a_connection_left_open_in_transaction_mode_is_terminated_and_warned(
    project: pytest.Pytester, shared_dsn: str
) -> None:
    result = run(
        project,
        shared_dsn,
        """
        import psycopg
        LEAKED = []

        def test_1_leak(pg):
            LEAKED.append(psycopg.connect(pg.dsn, application_name="leaky-pool"))

        def test_2_it_was_terminated(pg):
            assert LEAKED[0].closed or LEAKED[0].broken or _dead(LEAKED[0])

        def _dead(conn):
            try:
                conn.execute("select 1")
            except psycopg.OperationalError:
                return True
            return False
        """,
        "-W",
        "always::pgsandbox.errors.PgSandboxWarning",
        "--pg-guard=warn",
    )
    result.assert_outcomes(passed=2, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "*test_1_leak left 1 connection(s) open to the session database (pid *, application_name 'leaky-pool', "
            "idle, its last statement: ''); pgsandbox terminated them. In transaction mode only the connections*"
        ]
    )


@pytest.mark.slow
def test_database_isolation_any_client_and_commits(project: pytest.Pytester, shared_dsn: str) -> None:
    psql = working_psql()  # Debian's /usr/bin/psql wrapper fails without a postgresql-client package
    result = run(
        project,
        shared_dsn,
        f"""
        import subprocess
        import psycopg
        import pytest

        pytestmark = pytest.mark.pg(isolation="database")
        PSQL = {psql!r}

        def test_1_writes_from_everywhere(pg, pg_conn):
            pg_conn.execute("insert into users (name) values ('a1')")
            pg_conn.commit()
            with psycopg.connect(pg.dsn) as c1, psycopg.connect(pg.dsn) as c2:
                c1.execute("insert into users (name) values ('c1')")
                c1.commit()
                assert c2.execute("select count(*) from users").fetchone() == (4,)
            if PSQL:
                out = subprocess.run([PSQL, "-qAtc", "insert into users (name) values ('psql') returning name"],
                                     env=pg.env, capture_output=True, text=True, check=True)
                assert out.stdout.strip() == "psql"
            conn = pg.connect(autocommit=True)
            conn.execute("create table extra (x int)")
            assert pg.isolation == "database" and pg.info.dbname == pg.name

        def test_2_clean(pg):
            assert pg.fetchval("select count(*) from users") == 2
            assert pg.fetchval("select to_regclass('extra')") is None

        class TestClass:
            def test_3_class_too(self, pg):
                assert pg.isolation == "database"

        @pytest.mark.pg(isolation="transaction")
        def test_4_closest_marker_wins(pg):
            assert pg.isolation == "transaction"
        """,
    )
    result.assert_outcomes(passed=4)


@pytest.mark.slow
def test_database_isolation_terminates_and_reports_leaked_connections(
    project: pytest.Pytester, shared_dsn: str
) -> None:
    result = run(
        project,
        shared_dsn,
        """
        import psycopg
        import pytest
        LEAKED = []

        @pytest.mark.pg(isolation="database")
        def test_leak(pg):
            LEAKED.append(psycopg.connect(pg.dsn, application_name="worker-pool"))
            LEAKED[0].execute("select 1 as begun_but_never_ended")
        """,
        "-W",
        "always::pgsandbox.errors.PgSandboxWarning",
        "--pg-guard=warn",
    )
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "*test_leak left 1 session(s) idle in transaction on its database (pid *, application_name 'worker-pool', "
            "idle in transaction for *s, its last statement: 'select 1 as begun_but_never_ended'): a transaction "
            "was begun and never committed or rolled back*pgsandbox terminated them."
        ]
    )


@pytest.mark.slow
def test_bad_marker_and_isolation_values(project: pytest.Pytester, shared_dsn: str) -> None:
    result = run(
        project,
        shared_dsn,
        """
        import pytest

        @pytest.mark.pg(isolaton="database")
        def test_typo(pg):
            pass

        @pytest.mark.pg(isolation="tables")
        def test_bad_value(pg):
            pass
        """,
    )
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "*@pytest.mark.pg got unknown option(s) isolaton; it takes isolation, keep_failed, async_driver, guard*",
            "*@pytest.mark.pg(isolation='tables') is not one of transaction, database, schema.*",
        ]
    )
    project.makepyfile(test_it="def test_x(pg): pass")
    usage = project.runpytest("--pg-isolation=rows")
    usage.stderr.fnmatch_lines(["*--pg-isolation: bad value 'rows': expected one of transaction, database*"])


@pytest.mark.slow
def test_pg_fixture_connection_details(project: pytest.Pytester, shared_dsn: str) -> None:
    pytest.importorskip("sqlalchemy")
    result = run(
        project,
        shared_dsn,
        """
        import sqlalchemy
        import psycopg
        import pytest

        @pytest.mark.pg(isolation="database")
        def test_details(pg):
            engine = sqlalchemy.create_engine(pg.url())
            with engine.connect() as conn:
                assert conn.execute(sqlalchemy.text("select count(*) from users")).scalar() == 2
            engine.dispose()
            assert pg.url("asyncpg").startswith("postgresql+asyncpg://")
            assert set(pg.env) >= {"PGHOST", "PGPORT", "PGUSER", "PGPASSFILE", "PGDATABASE"}
            assert pg.env["PGDATABASE"] == pg.name == pg.info.dbname
            assert pg.info.host == "127.0.0.1" and pg.info.user.endswith("_tests")  # the tests' own role
            assert "password" not in repr(pg).lower() and pg.reveal_password() not in repr(pg)
            assert pg.execute("insert into users (name) values ('x'), ('y')") == 2
            assert pg.fetchone("select name from users where name = %s", ["x"]) == {"name": "x"}
        """,
    )
    result.assert_outcomes(passed=1)


FAILING = """
import psycopg
import pytest

def test_1_fails_in_a_transaction(pg_conn):
    pg_conn.execute("insert into users (name) values ('evidence')")
    pg_conn.commit()
    pg_conn.execute("insert into users (name) values ('after-commit')")
    assert False

@pytest.mark.pg(isolation="database")
def test_2_fails_in_its_own_database(pg_conn):
    pg_conn.execute("insert into users (name) values ('evidence2')")
    pg_conn.commit()
    assert False

def test_3_next_test_is_clean(pg):
    assert pg.fetchval("select count(*) from users") == 2
"""


def psql_commands(output: str) -> list[str]:
    return re.findall(r"^\s+(PGPASSFILE=\S+ \S*psql '[^']*')$", output, re.MULTILINE)


def run_psql(command: str, sql: str) -> str:
    env_part, rest = command.split(" ", 1)
    argv = shlex.split(rest)
    out = subprocess.run(
        [*argv, "-qAtc", sql],
        env={**os.environ, env_part.split("=", 1)[0]: env_part.split("=", 1)[1]},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.slow
@pytest.mark.usefixtures("machine_wide_servers")  # its kept run: `pgsandbox clean` elsewhere would take it
def test_keep_failed_on_an_external_server(project: pytest.Pytester, shared: LocalServer, shared_dsn: str) -> None:
    result = run(project, shared_dsn, FAILING, "--pg-keep-failed")
    commands = psql_commands(result.stdout.str())
    kept = {match.group(1) for command in commands if (match := re.search(r"dbname=(\S+)'", command))}
    try:
        result.assert_outcomes(passed=1, failed=2)
        assert str(shared.reveal_password()) not in result.stdout.str()
        result.stdout.fnmatch_lines(
            ["*- pgsandbox: kept database -*", "*the database of this test is kept as *failed1*"]
        )
        assert len(commands) == 4 and len(kept) == 2  # two in the failure sections, the same two in the summary
        if working_psql() is None:
            pytest.skip("no psql here to open the kept database with")
        first, second = commands[0], commands[1]
        assert (
            run_psql(first, "select string_agg(name, ',' order by name) from users") == "ada,after-commit,bob,evidence"
        )
        assert run_psql(second, "select string_agg(name, ',' order by name) from users") == "ada,bob,evidence2"
    finally:
        for name in kept:  # the user's job after a kept run: pgsandbox leaves them on the server
            shared.admin.execute(f'drop database if exists "{name}" with (force)')


@pytest.mark.usefixtures("machine_wide_servers")
@pytest.mark.slow
def test_keep_failed_leaves_the_local_server_running_until_clean(project: pytest.Pytester) -> None:
    project.makepyfile(test_it=FAILING)
    # in a subprocess: the run must end for its server to be a kept leftover
    result = project.runpytest_subprocess("--pg-keep-failed", "-k", "test_2")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*The local server keeps running for them; `pgsandbox clean *` stops it."])
    (command,) = set(psql_commands(result.stdout.str()))
    kept = [
        leftover
        for leftover in runs.find_leftovers(runs.search_bases(), include_kept=True)
        if runs.is_kept(leftover.run)
    ]
    assert kept and all(leftover.postmaster for leftover in kept)
    assert not [leftover for leftover in runs.find_leftovers(runs.search_bases()) if runs.is_kept(leftover.run)]
    if working_psql() is not None:
        assert run_psql(command, "select count(*) from users where name = 'evidence2'") == "1"
    from pgsandbox.cli import main

    assert main(["clean", "--keep-cache"]) == 0
    assert not runs.find_leftovers(runs.search_bases(), include_kept=True)


@pytest.mark.slow
def test_a_template_dropped_during_the_run_is_reported(tmp_path: Path, shared: LocalServer, shared_dsn: str) -> None:
    from pgsandbox import Sandbox, Settings
    from pgsandbox.errors import PgSandboxError
    from pgsandbox.template.builds import drop_template

    (tmp_path / "m").mkdir()
    (tmp_path / "m/1.sql").write_text(f"create table t (x int) -- {tmp_path.name}")
    with Sandbox.start(Settings(dsn=shared_dsn, migrations=("sql:m",)), root=tmp_path) as sandbox:
        drop_template(shared, sandbox.template)
        with pytest.raises(PgSandboxError) as caught:
            sandbox.open("database", "test_x")
    message = str(caught.value)
    assert f"pgsandbox could not clone the template {sandbox.template}:" in message
    assert "does not exist" in message
    assert "What to do: check the server's log" in message


@pytest.mark.slow
def test_clone_strategy_is_measured_on_a_server_pgsandbox_does_not_run(tmp_path: Path, shared_dsn: str) -> None:
    from pgsandbox import Sandbox, Settings

    (tmp_path / "m").mkdir()
    (tmp_path / "m/1.sql").write_text(f"create table t (x int) -- {tmp_path.name}")
    with Sandbox.start(Settings(dsn=shared_dsn, migrations=("sql:m",)), root=tmp_path) as sandbox:
        for n in range(6):
            with sandbox.database("database", f"test_{n}") as db:
                db.execute("create table u (x int)")  # DDL: a used clone is replaced, not recycled
                db.connection.commit()
        timings = sandbox.clone_timings
    assert set(timings) == {"FILE_COPY", "WAL_LOG"}
    assert all(len(samples) >= 2 for samples in timings.values())
    assert sum(len(samples) for samples in timings.values()) >= 6


def test_the_fastest_strategy_wins_after_two_tries_each() -> None:
    from pgsandbox.isolation.database import pick_strategy

    assert pick_strategy({}) is None
    assert pick_strategy({"FILE_COPY": [], "WAL_LOG": []}) == "FILE_COPY"
    assert pick_strategy({"FILE_COPY": [0.02], "WAL_LOG": []}) == "WAL_LOG"
    assert pick_strategy({"FILE_COPY": [0.02, 0.03], "WAL_LOG": [0.06]}) == "WAL_LOG"
    assert pick_strategy({"FILE_COPY": [0.02, 0.03], "WAL_LOG": [0.06, 0.07]}) == "FILE_COPY"
    assert pick_strategy({"FILE_COPY": [0.2, 0.3, 0.25], "WAL_LOG": [0.06, 0.07]}) == "WAL_LOG"


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "where"), [("transaction", "the session database"), ("database", "its database")])
def test_both_isolations_end_a_connection_left_open_alike(
    tmp_path: Path, shared_dsn: str, mode: str, where: str
) -> None:
    """One interface, one wording: each mode terminates what the test left open and says so in the same words
    (and the transaction mode what it means there)."""
    from pgsandbox import Sandbox, Settings

    (tmp_path / "m").mkdir()
    (tmp_path / "m/1.sql").write_text(f"create table t (x int) -- {tmp_path.name}")
    with Sandbox.start(Settings(dsn=shared_dsn, migrations=("sql:m",)), root=tmp_path) as sandbox:
        db = sandbox.open(mode, "t.py::test_leak")
        leaked = psycopg.connect(db.dsn, application_name="leaky")
        findings = sandbox.close(db)
        with sandbox.database(mode, "t.py::test_next") as db:
            assert db.fetchval("select count(*) from pg_stat_activity where application_name = 'leaky'") == 0
        report = sandbox.report()
    leaked.close()
    (finding,) = findings
    assert finding.startswith(f"t.py::test_leak left 1 connection(s) open to {where} (pid ")
    assert ("In transaction mode only the connections pgsandbox gives" in finding) == (mode == "transaction")
    assert report["findings"] == {"connections left open": 1}


def test_a_local_server_clones_with_file_copy_and_an_existing_one_measures_both() -> None:
    from pgsandbox.isolation.database import clone_strategies

    assert clone_strategies((16, 4), "auto", local=True) == ["FILE_COPY"]
    assert clone_strategies((16, 4), "auto", local=False) == ["FILE_COPY", "WAL_LOG"]
    assert clone_strategies((16, 4), "wal_log", local=True) == ["WAL_LOG"]
    assert clone_strategies((14, 9), "auto", local=False) == []  # no STRATEGY before PostgreSQL 15


@pytest.mark.slow
def test_clone_strategy_option(tmp_path: Path, shared_dsn: str) -> None:
    from pgsandbox import Sandbox, Settings

    (tmp_path / "m").mkdir()
    (tmp_path / "m/1.sql").write_text(f"create table t (x int) -- {tmp_path.name}")
    settings = Settings(dsn=shared_dsn, migrations=("sql:m",), clone_strategy="wal_log")
    with Sandbox.start(settings, root=tmp_path) as sandbox:
        with sandbox.database("database") as db:
            assert db.fetchval("select count(*) from t") == 0
        assert set(sandbox.clone_timings) == {"WAL_LOG"}


@pytest.mark.slow
def test_each_test_gets_its_own_transaction_whatever_runs_between(project: pytest.Pytester, shared_dsn: str) -> None:
    """The next test's transaction is opened during the previous teardown when pytest says which test is
    next; tests in between (other isolation, skipped, no database) must not confuse it."""
    result = run(
        project,
        shared_dsn,
        """
        import pytest

        def name(pg):
            return pg.fetchval("show application_name")

        def test_1(pg):
            assert name(pg) == "pgsandbox test_it.py::test_1"
            pg.execute("insert into users (name) values ('t1')")

        def test_2(pg):
            assert name(pg) == "pgsandbox test_it.py::test_2"
            assert pg.fetchval("select count(*) from users") == 2
            pg.execute("insert into users (name) values ('t2')")

        @pytest.mark.pg(isolation="database")
        def test_3_database(pg):
            assert pg.fetchval("select count(*) from users") == 2

        @pytest.mark.skip("skipped")
        def test_4_skipped(pg):
            pass

        def test_5_no_database():
            pass

        def test_6(pg_conn, pg):
            assert pg_conn is pg.connection
            assert name(pg) == "pgsandbox test_it.py::test_6"
            assert pg.fetchval("select count(*) from users") == 2
            assert pg.fetchval("select now() >= statement_timestamp() - interval '5 seconds'")
        """,
    )
    result.assert_outcomes(passed=5, skipped=1)


HELD = """
    import psycopg
    import pytest

    def test_1_takes_an_advisory_lock(pg_conn):
        pg_conn.execute("select pg_advisory_lock(4242)")

    def test_2_the_lock_is_gone(pg):
        held = "select count(*) from pg_locks where locktype = 'advisory' and objid = 4242"
        assert pg.fetchval(held) == 0

    @pytest.mark.pg(isolation="database")
    def test_3_prepares_a_transaction(pg):
        conn = psycopg.connect(pg.dsn, autocommit=True)
        conn.execute("begin; insert into users (name) values ('prepared'); prepare transaction 'left_behind'")
        conn.close()

    def test_4_nothing_prepared_is_left(pg_admin):
        assert pg_admin.execute("select count(*) from pg_prepared_xacts").fetchone() == (0,)
"""


@pytest.mark.slow
def test_advisory_locks_and_prepared_transactions_are_released_and_reported(pytester: pytest.Pytester) -> None:
    pytester.makefile(
        ".toml",
        pyproject='[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n'
        'pg_server_settings = ["max_prepared_transactions=4"]\n',
    )
    (pytester.path / "migrations").mkdir()
    (pytester.path / "migrations/1.sql").write_text(
        "create table users (id serial primary key, name text unique not null);"
    )
    pytester.makepyfile(test_it=textwrap.dedent(HELD))
    # a local server: prepared transactions enabled
    result = pytester.runpytest("-p", "no:randomly", "--pg-guard=warn")
    result.assert_outcomes(passed=4, warnings=2)
    result.stdout.fnmatch_lines(
        [
            "*test_1_takes_an_advisory_lock left 1 advisory lock(s) held on its connection*pgsandbox released them.",
            "*test_3_prepares_a_transaction left 1 prepared transaction(s) (left_behind) in its database; "
            "pgsandbox rolled them back.",
            "findings: advisory locks left held 1, prepared transactions left 1",
        ]
    )


GUARDED = """
    import pytest

    def test_1_leaves_a_lock(pg_conn):
        pg_conn.execute("select pg_advisory_lock(7)")

    @pytest.mark.pg(guard="warn")
    def test_2_leaves_a_lock_but_only_warns(pg_conn):
        pg_conn.execute("select pg_advisory_lock(7)")

    @pytest.mark.pg(guard="off")
    def test_3_leaves_a_lock_unsaid(pg_conn):
        pg_conn.execute("select pg_advisory_lock(7)")

    def test_4_starts_clean(pg):
        held = "select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()"
        assert pg.fetchval(held) == 0

    @pytest.mark.pg(guard="loud")
    def test_5_bad_value(pg):
        pass
"""


@pytest.mark.slow
def test_guard_policy_error_by_default_warn_or_off_by_marker(project: pytest.Pytester, shared_dsn: str) -> None:
    result = run(project, shared_dsn, GUARDED, "-W", "always::pgsandbox.errors.PgSandboxWarning")
    result.assert_outcomes(passed=4, errors=2, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_1_leaves_a_lock*",
            "pgsandbox: test_it.py::test_1_leaves_a_lock left 1 advisory lock(s) held on its connection*",
            "*ERROR at setup of test_5_bad_value*",
            "*@pytest.mark.pg(guard='loud') is not one of error, warn, off.*",
            "*PgSandboxWarning: test_it.py::test_2_leaves_a_lock_but_only_warns left 1 advisory lock(s)*",
        ]
    )
    assert "test_3_leaves_a_lock_unsaid left" not in result.stdout.str()
    usage = project.runpytest(f"--pg-dsn={shared_dsn}", "--pg-guard=loud")
    usage.stderr.fnmatch_lines(["*--pg-guard: bad value 'loud': expected one of error, warn, off*"])


TIMEOUTS = """
    import psycopg
    import pytest

    @pytest.fixture
    def blocker(pg):
        conn = psycopg.connect(pg.dsn, application_name="the-blocker")
        yield conn
        conn.close()

    def test_1_defaults(pg_conn):
        settings = pg_conn.execute(
            "select current_setting('lock_timeout'), current_setting('statement_timeout'), "
            "current_setting('idle_in_transaction_session_timeout')"
        ).fetchone()
        assert settings == ("200ms", "5min", "1h")

    @pytest.mark.pg(isolation="database")
    def test_2_waits_for_a_lock(pg_conn, blocker):
        blocker.execute("update users set name = 'held' where name = 'ada'")
        pg_conn.execute("update users set name = 'waiting' where name = 'ada'")

    def test_3_runs_too_long(pg_conn):
        pg_conn.execute("set statement_timeout = '50ms'")
        pg_conn.execute("select pg_sleep(2)")
"""


@pytest.mark.slow
def test_timeouts_and_who_held_the_lock(project: pytest.Pytester, shared_dsn: str) -> None:
    result = run(project, shared_dsn, TIMEOUTS, "--pg-lock-timeout=200ms")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*test_2_waits_for_a_lock*",
            "*psycopg.errors.LockNotAvailable: canceling statement due to lock timeout*",
            "*- pgsandbox: a statement waited too long for a lock -*",
            "*pid * (the-blocker), idle in transaction, in a transaction for * s, holding *RowExclusiveLock on "
            "users*; its last statement: \"update users set name = 'held' where name = 'ada'\"",
            "*test_3_runs_too_long*",
            "*QueryCanceled: canceling statement due to statement timeout*",
            "*- pgsandbox: a statement was stopped (a timeout) -*",
        ]
    )
    bad = project.runpytest(f"--pg-dsn={shared_dsn}", "--pg-lock-timeout=soon")
    bad.stderr.fnmatch_lines(["*--pg-lock-timeout: bad value 'soon': expected a duration such as 500ms, 30s*"])


DEADLOCK = """
    import threading

    import psycopg
    import pytest

    @pytest.fixture
    def workers(pg):
        first = psycopg.connect(pg.dsn, application_name="first-worker")
        second = psycopg.connect(pg.dsn, application_name="second-worker")
        yield first, second
        first.close()
        second.close()

    @pytest.mark.pg(isolation="database")
    def test_two_connections_deadlock(workers):
        first, second = workers
        first.execute("update users set name = 'a1' where id = 1")
        second.execute("update users set name = 'b1' where id = 2")
        errors = []

        def cross(conn, row):
            try:
                conn.execute("update users set name = name || '!' where id = %s", [row])
            except psycopg.Error as error:
                errors.append(error)

        threads = [threading.Thread(target=cross, args=args) for args in ((first, 2), (second, 1))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        raise errors[0]
"""


@pytest.mark.slow
def test_a_deadlock_is_reported_with_both_statements(project: pytest.Pytester, shared_dsn: str) -> None:
    result = run(project, shared_dsn, DEADLOCK)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*- pgsandbox: deadlock -*",
            "Process * waits for ShareLock on transaction *; blocked by process *.",
            "Process * waits for ShareLock on transaction *; blocked by process *.",
            "process * (*-worker), its last statement: \"update users set name = name || '!' where id = $1\"",
            "process * (*-worker), its last statement: \"update users set name = name || '!' where id = $1\"",
        ]
    )


SERVER_OBJECTS = """
    import os
    from pathlib import Path

    import psycopg
    import pytest

    @pytest.fixture
    def admin_of_postgres(pg_sandbox):
        with pg_sandbox.server.connect(autocommit=True) as conn:
            yield conn

    def test_1_creates_a_database(pg):
        with psycopg.connect(pg.dsn, autocommit=True) as conn:  # CREATE DATABASE runs outside a transaction
            conn.execute("create database scratch_of_a_test")

    def test_2_creates_a_role_through_pg_admin(pg_admin):
        pg_admin.execute("create role app_reader_of_a_test")

    def test_3_creates_a_tablespace_through_pg_admin(pg_admin):
        data = Path(pg_admin.execute("show data_directory").fetchone()[0])
        location = data.parent / "tablespace_of_a_test"
        location.mkdir()
        os.chown(location, data.stat().st_uid, data.stat().st_gid)  # the server's account must own it
        pg_admin.execute(f"create tablespace space_of_a_test location '{location}'")

    def test_4_server_is_clean_again(pg, admin_of_postgres):
        found = admin_of_postgres.execute(
            "select count(*) from pg_database where datname = 'scratch_of_a_test' "
            "union all select count(*) from pg_roles where rolname = 'app_reader_of_a_test' "
            "union all select count(*) from pg_tablespace where spcname = 'space_of_a_test'"
        ).fetchall()
        assert found == [(0,), (0,), (0,)]
"""


@pytest.mark.slow
def test_objects_created_on_the_server_are_found_and_dropped(project: pytest.Pytester) -> None:
    project.makepyfile(test_it=textwrap.dedent(SERVER_OBJECTS))
    result = project.runpytest("-p", "no:randomly", "--pg-role=createdb", "--pg-isolation=database")
    result.assert_outcomes(passed=4, errors=3)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_1_creates_a_database*",
            "pgsandbox: test_it.py::test_1_creates_a_database created database 'scratch_of_a_test' on the server, "
            "outside its database, where neither a rollback nor a dropped clone undoes it; pgsandbox dropped them. "
            "Create such objects in a migration (template), or drop them in the test's own teardown.",
            "*ERROR at teardown of test_2_creates_a_role_through_pg_admin*",
            "pgsandbox: test_it.py::test_2_creates_a_role_through_pg_admin created role 'app_reader_of_a_test'*"
            "pgsandbox dropped them.*",
            "*ERROR at teardown of test_3_creates_a_tablespace_through_pg_admin*",
            "pgsandbox: test_it.py::test_3_creates_a_tablespace_through_pg_admin created tablespace "
            "'space_of_a_test'*pgsandbox dropped them.*",
            "findings: objects created outside the test's database 3",
        ]
    )


def test_what_a_statement_makes_on_the_server() -> None:
    """How a test's statements name the server objects they make (under xdist, the test's are those)."""
    from pgsandbox.isolation.server_objects import made_by

    assert made_by("create role app_reader") == {("role", "app_reader")}
    assert made_by('CREATE USER "Mixed""Case" WITH LOGIN') == {("role", 'Mixed"Case')}
    assert made_by("CREATE DATABASE Scratch; create tablespace ts location '/x'") == {
        ("database", "scratch"),
        ("tablespace", "ts"),
    }
    assert made_by("alter group old rename to new_group") == {("role", "new_group")}
    assert made_by("do $$ begin create role inside_do; end $$") == {("role", "inside_do")}
    assert made_by("select 'nothing made'") == set()


@pytest.mark.slow
def test_objects_created_on_a_shared_server_are_left_to_the_user(
    project: pytest.Pytester, shared_dsn: str, shared: LocalServer
) -> None:
    try:
        result = run(project, shared_dsn, SERVER_OBJECTS, "-k", "test_2", "--pg-guard=warn")
        result.assert_outcomes(passed=1, warnings=1)
        result.stdout.fnmatch_lines(
            ["*created role 'app_reader_of_a_test' on the server*pgsandbox left them on this shared server: drop them*"]
        )
    finally:
        shared.admin.execute("drop role if exists app_reader_of_a_test")


@pytest.mark.slow
def test_timeouts_hold_when_tests_connect_as_the_admin(project: pytest.Pytester, shared_dsn: str) -> None:
    source = """
        import pytest

        @pytest.mark.parametrize("isolation", ["transaction", "database"])
        def test_timeouts(pg_sandbox, isolation, request):
            with pg_sandbox.database(isolation, request.node.nodeid) as db:
                assert db.info.user == "postgres"
                assert db.fetchone(
                    "select current_setting('lock_timeout') as lock, current_setting('statement_timeout') as run, "
                    "current_setting('idle_in_transaction_session_timeout') as idle"
                ) == {"lock": "200ms", "run": "5min", "idle": "1h"}
    """
    result = run(project, shared_dsn, source, "--pg-role=admin", "--pg-lock-timeout=200ms")
    result.assert_outcomes(passed=2)


@pytest.mark.slow
def test_the_session_database_is_dropped_at_the_end_on_a_server_that_outlives_the_run(
    tmp_path: Path, shared: LocalServer, shared_dsn: str, start_local: StartLocal
) -> None:
    from pgsandbox import Sandbox, Settings

    def names(server: Server) -> set[str]:
        return {row[0] for row in server.admin.execute("select datname from pg_database")}

    before = names(shared)
    with Sandbox.start(Settings(dsn=shared_dsn), root=tmp_path) as sandbox, sandbox.database("transaction") as db:
        assert db.name in names(shared)
    assert names(shared) == before  # someone else's server: nothing of the run is left on it
    assert sandbox.server.counts["dropped"] == 1
    # its own server: the database goes with the server's directory; dropping it first only waited for the
    # backend of its connection to exit (DROP DATABASE polls every 100 ms)
    local = start_local()
    with (
        Sandbox.start(Settings(), root=tmp_path, server_start=lambda snapshots: local) as sandbox,
        sandbox.database("transaction") as db,
    ):
        assert db.name in names(local)
    assert local.counts["created"] == 1 and local.counts["dropped"] == 0
    assert not local.run_dir.exists()
