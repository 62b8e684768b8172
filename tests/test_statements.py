"""What a test ran: the local server's statement log, a failed test's SQL, --pg-show-sql and pg_queries."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from pgsandbox import LocalServer
from pgsandbox.server import statement_log, statements
from pgsandbox.server.statement_log import Entry, Position, StatementLog, log_time
from pgsandbox.server.statements import Scope
from pgsandbox.server.tags import INTERNAL


def run(project: pytest.Pytester, source: str, *args: str) -> pytest.RunResult:
    project.makepyfile(test_sql=textwrap.dedent(source))
    return project.runpytest("-p", "no:randomly", *args)


def section(result: pytest.RunResult, title: str, test: str = "") -> str:
    """The text of the first report section called ``title`` after ``test``'s header."""
    text = result.stdout.str()
    start = text.index(test) if test else 0
    start = text.index(f" {title} ", start)
    start = text.index("\n", start) + 1
    end = min(i for i in (text.find("\n___", start), text.find("\n===", start), len(text)) if i >= 0)
    return text[start:end]


FAILING = """
    import psycopg
    import pytest

    @pytest.fixture
    def ada(pg):
        return pg.fetchval("select id from users where name = %s", ["ada"])

    def test_1_passes_quietly(pg):
        pg.execute("select 'not in any report'")

    def test_2_fails(pg, pg_conn, ada):
        pg_conn.execute("update users set name = %s where id = %s", ["ada2", ada])
        pg_conn.commit()
        pg.fetchval("select %s::text", [pg.reveal_password()])
        pg.execute("alter role current_user password '" + "hunter2" + "-secret'")
        pg.execute("insert into users (name) values (%s)", ["bob"])

    @pytest.mark.pg(isolation="database")
    def test_3_its_own_connections(pg):
        with psycopg.connect(pg.dsn) as app:
            app.execute("select count(*) from users")
        pg.fetch("select 1 / 0")
"""


@pytest.mark.slow
def test_a_failed_test_shows_the_sql_it_ran(project: pytest.Pytester) -> None:
    result = run(project, FAILING)
    result.assert_outcomes(passed=1, failed=2)
    ran = section(result, "pgsandbox: SQL of call", "test_2_fails")
    lines = [line.strip() for line in ran.splitlines()]
    assert lines[0].startswith("6 statements, ") and lines[0].endswith("ms in all, 1 failed"), ran
    assert lines[1].endswith("ms select id from users where name = $1"), ran  # the fixture's, at set-up
    assert lines[2] == "parameters: $1 = 'ada'"
    assert lines[3].endswith("ms update users set name = $1 where id = $2"), ran
    assert lines[4] == "parameters: $1 = 'ada2', $2 = '1'"
    assert lines[5].endswith("ms /* commit() */ RELEASE SAVEPOINT pgsandbox_test; SAVEPOINT pgsandbox_test")
    assert lines[6].endswith("ms select $1::text") and lines[7] == "parameters: $1 = '***'", ran
    assert lines[8].endswith("ms alter role current_user password '***'"), ran
    assert lines[9] == "failed insert into users (name) values ($1)"
    assert lines[10:13] == [
        "parameters: $1 = 'bob'",
        'ERROR 23505: duplicate key value violates unique constraint "users_name_key"',
        "DETAIL: Key (name)=(bob) already exists.",
    ]
    output = result.stdout.str()
    assert "hunter2-secret" not in output and "not in any report" not in output
    assert "pgsandbox */" not in output  # pgsandbox's own statements are not the test's

    own = section(result, "pgsandbox: SQL of call", "test_3_its_own_connections")
    assert "c1 = backend" in own and "(pgsandbox test_sql.py::test_3" in own
    assert "(no application_name: a connection the test or its app opened itself)" in own
    assert "ms select count(*) from users" in own
    assert "failed select 1 / 0" in own and "ERROR 22012: division by zero" in own


@pytest.mark.slow
def test_show_sql_for_every_test_and_csvlog(project: pytest.Pytester) -> None:
    source = """
        def test_passes(pg):
            pg.execute("select 'shown' where 1 = %s", [1])
    """
    for log_format in ("jsonlog", "csvlog"):
        result = run(project, source, "--pg-show-sql", f"--pg-sql-log={log_format}")
        result.assert_outcomes(passed=1)
        ran = section(result, "pgsandbox: SQL of call", "PASSES")
        assert "ms select 'shown' where 1 = $1\n" in ran and "parameters: $1 = '1'" in ran, (log_format, ran)
    bad = project.runpytest("--pg-sql-log=xml")
    bad.stderr.fnmatch_lines(["*--pg-sql-log: bad value 'xml': expected one of auto, jsonlog, csvlog, off*"])


@pytest.mark.slow
def test_long_sql_is_cut_to_a_readable_length(project: pytest.Pytester) -> None:
    """Also: a test id longer than an application_name (63 bytes) still finds its statements."""
    result = run(
        project,
        """
        def test_many_statements_in_a_test_whose_name_is_far_longer_than_an_application_name(pg):
            for number in range(60):
                pg.execute(f"select {number}")
            pg.execute("select '" + "x" * 3000 + "'")
            assert False
        """,
    )
    result.assert_outcomes(failed=1)
    ran = section(result, "pgsandbox: SQL of call")
    assert ran.splitlines()[0].startswith("61 statements, ") and "the first 11 are not shown" in ran, ran
    assert "ms select 10\n" not in ran and "ms select 11\n" in ran and "ms select 59\n" in ran
    assert "… (2009 more characters)" in ran


@pytest.mark.slow
def test_sql_log_off_and_external_servers_have_none(project: pytest.Pytester, shared_dsn: str) -> None:
    source = """
        def test_fails(pg):
            pg.execute("select 1")
            assert False

        def test_counts(pg_queries):
            with pg_queries(0):
                pass
    """
    for args in (("--pg-sql-log=off",), (f"--pg-dsn={shared_dsn}",)):
        result = run(project, source, *args)
        result.assert_outcomes(failed=1, errors=1)
        assert "pgsandbox: SQL of" not in result.stdout.str()
        result.stdout.fnmatch_lines(
            [
                "*there is no statement log to read: *.",
                "*What to do: pgsandbox logs statements on the local server it starts (pg_sql_log = auto)*",
            ]
        )
    assert "pg_sql_log is off" in run(project, source, "--pg-sql-log=off").stdout.str()


QUERIES = """
    import pytest

    @pytest.fixture
    def books(pg):
        pg.execute("insert into book values (1, 1), (2, 2), (3, 1)")

    def authors_one_by_one(conn):
        for (author,) in conn.execute("select author from book order by id").fetchall():
            conn.execute("select name from users where id = %s", [author])

    def authors_joined(conn):
        conn.execute("select u.name from book b join users u on u.id = b.author").fetchall()

    @pytest.mark.parametrize("isolation", ["transaction", "database"])
    def test_counts(request, isolation, pg_queries, pg_conn, pg_psycopg2, books):
        with pg_queries(2) as ran:
            authors_joined(pg_conn)
            pg_conn.commit()
            with pg_psycopg2.cursor() as cursor:  # its own connection, and in transaction isolation transaction
                cursor.execute("select count(*) from users")
            pg_psycopg2.commit()
        assert ran.count == len(ran) == 2
        assert ran.sql == ["select u.name from book b join users u on u.id = b.author", "select count(*) from users"]
        assert [s.transaction_control for s in ran.all].count(True) >= 1
        with pg_queries(at_most=4):
            authors_joined(pg_conn)

    @pytest.mark.asyncio
    async def test_async_code(pg_queries, pg_asyncpg):
        with pg_queries(2) as ran:
            async with pg_asyncpg.transaction():
                await pg_asyncpg.fetch("select count(*) from users where name = $1", "ada")
                await pg_asyncpg.execute("update users set name = name || '2'")
        assert ran.sql == ["select count(*) from users where name = $1", "update users set name = name || '2'"]

    @pytest.mark.parametrize("isolation", ["transaction", "database"])
    def test_an_engines_first_connect_is_not_counted(isolation, pg, pg_queries):
        import sqlalchemy

        engine = sqlalchemy.create_engine(pg.url())  # the app's own, connecting inside the block
        with pg_queries(1) as ran:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("select count(*) from users")).scalar()
        engine.dispose()
        assert ran.sql == ["select count(*) from users"]
        probes = [s.sql for s in ran.all if s.driver_setup]
        assert probes[:2] == ["select pg_catalog.version()", "select current_schema()"]
        assert "driver set-up statements (a client library's questions to a new connection)" in str(ran)

    def test_pg_insert_shows_its_placeholders(pg, pg_queries):
        with pg_queries(1) as ran:
            pg.insert("users")
        assert ran.sql[0].startswith('INSERT INTO "public"."users" ("name") VALUES ($1)'), ran.sql

    def test_n_plus_one_fails(pg_queries, pg_conn, books):
        with pg_queries(at_most=2):
            authors_one_by_one(pg_conn)

    def test_exact_count_fails(pg_queries, pg_conn, books):
        with pg_queries(1):
            authors_one_by_one(pg_conn)
"""


@pytest.mark.slow
def test_pg_queries(project: pytest.Pytester) -> None:
    book = "create table book (id int primary key, author int references users);"
    (project.path / "migrations/2.sql").write_text(book)
    project.makeconftest(
        textwrap.dedent(
            """
            import pytest

            def pytest_collection_modifyitems(items):
                for item in items:
                    if "isolation" in getattr(item, "callspec", None).params if hasattr(item, "callspec") else ():
                        item.add_marker(pytest.mark.pg(isolation=item.callspec.params["isolation"]))
            """
        )
    )
    result = run(project, QUERIES)
    result.assert_outcomes(passed=6, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: expected at most 2 statements, the block ran 4 (transaction control not counted):",
            "E * 4 statements, * ms in all",
            "E * ms select author from book order by id",
            "E * ms select name from users where id = $1",
            "E * parameters: $1 = '1'",
            "*AssertionError: expected exactly 1 statement, the block ran 4*",
        ]
    )
    output = result.stdout.str()
    assert "queries.py" not in output and "contextlib" not in output  # the traceback ends at the test's `with`
    # each failed block lists its statements once; the section has only the rest (the fixture's insert)
    failures = output.split("short test summary info")[0]  # in CI (CI set), the summary repeats whole messages
    assert failures.count("ms select author from book order by id") == 2
    result.stdout.fnmatch_lines(
        ["*- pgsandbox: SQL of call, besides the pg_queries block's (listed above) -*", "*ms insert into book values*"]
    )


@pytest.mark.slow
def test_a_deadlock_is_told_with_both_statements_from_the_log(project: pytest.Pytester) -> None:
    result = run(
        project,
        """
        import threading

        import psycopg
        import pytest

        @pytest.mark.pg(isolation="database")
        def test_deadlock(pg):
            first = psycopg.connect(pg.dsn, application_name="first-worker")
            second = psycopg.connect(pg.dsn, application_name="second-worker")
            first.execute("update users set name = 'a1' where id = 1")
            second.execute("update users set name = 'b1' where id = 2")
            errors = []

            def cross(conn, row):
                try:
                    conn.execute(f"update users set name = name || '!' where id = {row}")
                except psycopg.Error as error:
                    errors.append(error)
                    conn.close()  # gone before the report: the log still has its statement

            threads = [threading.Thread(target=cross, args=args) for args in ((first, 2), (second, 1))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            first.close()
            second.close()
            raise errors[0]
        """,
    )
    result.assert_outcomes(failed=1)
    told = section(result, "pgsandbox: deadlock")
    assert "update users set name = name || '!' where id = 2" in told, told
    assert "update users set name = name || '!' where id = 1" in told, told
    ran = section(result, "pgsandbox: SQL of call")
    assert "ERROR 40P01: deadlock detected" in ran and "c2 = backend" in ran


@pytest.mark.slow
def test_the_log_alone(start_local: object, tmp_path: Path) -> None:
    """The statement log from a plain script: parse, bind and execute make one statement; what another test
    ran, pgsandbox's own statements and old rotated files are left out."""
    import psycopg

    assert callable(start_local)
    server: LocalServer = start_local(sql_log="csvlog")
    log = server.statement_log
    assert log is not None and log.format == "csvlog"
    start = log.position()
    with psycopg.connect(server.dsn, application_name="pgsandbox mine") as mine:
        mine.execute("select %s::text as multi", ["line one\nline two"])
        mine.execute(INTERNAL + "select 'ours'")
    with psycopg.connect(server.dsn, application_name="pgsandbox theirs") as theirs:
        theirs.execute("select 'theirs'")
    entries, end, complete = log.collect(start, server.admin)
    found = statements.statements(entries, Scope(frozenset(["pgsandbox mine"])))
    assert complete and end.file == start.file and end.offset > start.offset
    assert [(s.sql, s.parameters) for s in found if not s.transaction_control] == [
        ("select $1::text as multi", "$1 = 'line one\nline two'")
    ]
    assert all(s.duration_ms is not None and s.duration_ms > 0 for s in found)
    old = [f"{statement_log.FILE_PREFIX}20000101-00000{n}.csv" for n in range(statement_log.FILES_KEPT + 1)]
    for name in old:  # rotated files, older than the one the server writes
        (log.directory / name).write_text("")
    assert log.position().file == start.file  # the current file is small: only a stat, nothing removed
    assert len(list(log.directory.glob("*.csv"))) == len(old) + 1
    StatementLog(log.directory, "csvlog").position()  # a new reader lists the directory, as after a rotation
    left = sorted(p.name for p in log.directory.iterdir() if p.suffix == ".csv")
    assert left == [*old[2:], start.file]  # the newest FILES_KEPT stay
    _, _, complete = log.collect(Position(old[0], 0), server.admin)
    assert not complete  # the file a test started in is gone: its report says so
    assert "rotated away" in statements.report([], complete=False)
    log_files = StatementLog(log.directory, "jsonlog")._files()
    assert log_files == []  # one format per log
    assert Position("", 0) == StatementLog(tmp_path, "jsonlog").position()


@pytest.mark.slow
def test_a_lock_timeout_names_the_blocker_even_once_it_is_gone(project: pytest.Pytester) -> None:
    result = run(
        project,
        """
        import psycopg
        import pytest

        @pytest.mark.pg(isolation="database")
        def test_waits(pg):
            blocker = psycopg.connect(pg.dsn, application_name="the-blocker")
            blocker.execute("update users set name = 'held' where name = 'ada'")
            try:
                pg.execute("update users set name = 'waiting' where name = 'ada'")
            finally:
                blocker.close()  # before the report: only the log still knows it
        """,
        "--pg-lock-timeout=300ms",
    )
    result.assert_outcomes(failed=1)
    told = section(result, "pgsandbox: a statement waited too long for a lock")
    assert re.search(
        r"backend \d+ waited for ShareLock on transaction \d+ \(still waiting after \d+ ms\) running \"update users "
        r"set name = 'waiting' where name = 'ada'\"; the lock was held by backend \d+ \(the-blocker\), whose last "
        r"statement before then was \"update users set name = 'held' where name = 'ada'\"",
        told,
    ), told
    assert "none left" in told  # pg_stat_activity no longer has it


@pytest.mark.slow
def test_a_failure_and_a_teardown_error_show_the_sql_once(project: pytest.Pytester) -> None:
    result = run(
        project,
        """
        import psycopg

        LEFT = []

        def test_fails_and_leaves_a_connection(pg):
            LEFT.append(psycopg.connect(pg.dsn))
            pg.execute("select 'shown once'")
            assert False
        """,
    )
    result.assert_outcomes(failed=1, errors=1)
    output = result.stdout.str()
    assert output.count("pgsandbox: SQL of") == 1 and "ms select 'shown once'" in output
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_fails_and_leaves_a_connection*"])


# The app's own connections in transaction isolation: a payment recorded on a connection of its own (committed,
# so the guard reports it), a worker that names its connection; neither name is one pgsandbox gave.
APP_CONNECTIONS = """
    import psycopg

    def record_payment(dsn, amount):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("insert into users (name) values (%s)", [f"payment {amount}"])

    def test_1_the_app_commits_on_its_own(pg):
        record_payment(pg.dsn, 42)

    def test_2_the_app_names_its_connection(pg):
        with psycopg.connect(pg.dsn, application_name="billing-worker") as conn:
            conn.execute("select count(*) from users where name like 'payment%'")
        assert False

    def test_3_sees_none_of_the_others(pg):
        pg.execute("select 'mine'")
        assert False
"""


@pytest.mark.slow
def test_the_sql_of_the_apps_own_connections_in_transaction_isolation(project: pytest.Pytester) -> None:
    result = run(project, APP_CONNECTIONS)
    result.assert_outcomes(passed=1, failed=2, errors=1)
    escaped = section(result, "pgsandbox: SQL of teardown", "test_1_the_app_commits_on_its_own")
    assert "no statements were logged" not in escaped, escaped
    assert re.search(r"c1 = backend \d+ \(no application_name: a connection the test or its app opened", escaped)
    assert "ms insert into users (name) values ($1)" in escaped and "$1 = 'payment 42'" in escaped, escaped
    named = section(result, "pgsandbox: SQL of call", "test_2_the_app_names_its_connection")
    assert "(billing-worker: a connection the test or its app opened itself)" in named, named
    assert "ms select count(*) from users where name like 'payment%'" in named and "insert" not in named, named
    mine = section(result, "pgsandbox: SQL of call", "test_3_sees_none_of_the_others")
    assert mine.splitlines()[1].endswith("ms select 'mine'") and "users" not in mine, mine


def test_the_session_database_is_the_tests_only_while_it_runs() -> None:
    """Transaction isolation: on the session database, the statements of connections pgsandbox did not name are
    the test's from its start on (a line the logging collector wrote late, of the test before, is not)."""

    scope = Scope(frozenset(["pgsandbox t2"]), shared="session", since=log_time(1_700_000_000.25))
    assert scope.since == "2023-11-14 22:13:20.250 UTC"

    def entry(app: str, timestamp: str, dbname: str = "session") -> Entry:
        return Entry(pid=1, severity="LOG", message="", application_name=app, dbname=dbname, timestamp=timestamp)

    assert entry("pgsandbox t2", "2023-11-14 22:13:20.100 UTC", "postgres") in scope  # named: anywhere, any time
    assert entry("", "2023-11-14 22:13:20.250 UTC") in scope
    assert entry("billing-worker", "2023-11-14 22:13:21.000 UTC") in scope
    assert entry("", "2023-11-14 22:13:20.249 UTC") not in scope  # before the test began
    assert entry("pgsandbox t1", "2023-11-14 22:13:21.000 UTC") not in scope  # another test's connection
    assert entry("pgsandbox", "2023-11-14 22:13:21.000 UTC") not in scope  # pgsandbox's own
    assert entry("", "2023-11-14 22:13:21.000 UTC", "postgres") not in scope  # another database
    assert entry("", "2023-11-14 23:13:20.000 CET") in scope  # log_timezone changed by the user: the log's order
