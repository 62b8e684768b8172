"""Scoped data (pg_module, pg_class, pg_session_data: rows made once, each test rolled back to them) and
pg_reset_sequences (ids that start at the same value in every test), in transaction isolation."""

from __future__ import annotations

import textwrap

import pytest

from pgsandbox.isolation.sequences import SequenceState, restore_sql, snapshot

# and enough tables that the planner reads pg_class whole when it looks for the sequences (a hash join)
THINGS = (
    "create table things (id int generated always as identity primary key, name text);\n"
    "do $$ begin for i in 1..60 loop execute format('create table pad%s (id serial primary key)', i); end loop; "
    "end $$;\n"
)


def write(project: pytest.Pytester, **modules: str) -> None:
    (project.path / "migrations/2.sql").write_text(THINGS)
    project.makepyfile(**{name: textwrap.dedent(source) for name, source in modules.items()})


# A small app of the kind that made module-scoped fixtures per-test: a users table, a login token issued
# through the database once per module, a class that adds its own rows.
APP_MODULE = """
    import hashlib

    import pytest

    def issue_token(conn, name):  # the app's code: it commits what it writes
        user_id = conn.execute("insert into users (name) values (%s) returning id", [name]).fetchone()[0]
        conn.commit()
        return hashlib.sha256(f"{user_id}:{name}".encode()).hexdigest()

    def count(pg):
        return pg.fetchval("select count(*) from users")

    @pytest.fixture(scope="module")
    def customers(pg_module):
        pg_module.execute("insert into users (name) values ('m1'), ('m2')")
        return count(pg_module)

    @pytest.fixture(scope="module")
    def token(pg_module):
        return issue_token(pg_module.connection, "login-user")

    def test_1_module_rows_are_there(pg, customers, token):
        assert customers == 4 and len(token) == 64
        assert count(pg) == 5
        pg.execute("insert into users (name) values ('t1')")
        pg.connection.commit()  # becomes a savepoint: still rolled back

    def test_2_rolled_back_to_the_module_data(pg, customers, pg_session):
        from sqlalchemy import text

        assert count(pg) == 5
        assert pg_session.execute(text("select count(*) from users where name = 'login-user'")).scalar() == 1
        pg.execute("delete from users")
        pg_session.commit()

    def test_3_even_after_a_delete(pg_conn):
        assert pg_conn.execute("select count(*) from users").fetchone()[0] == 5

    @pytest.fixture(scope="class")
    def admins(pg_class, customers):
        pg_class.insert("users", name="class-admin")

    class TestWithClassData:
        def test_4_class_rows_on_top(self, pg, admins):
            assert count(pg) == 6
            pg.execute("insert into users (name) values ('t4')")

        def test_5_class_rows_stay(self, pg, admins):
            assert count(pg) == 6

    def test_6_class_rows_gone_after_the_class(pg):
        assert count(pg) == 5
"""

NEXT_MODULE = """
    def test_next_module_sees_the_template(pg):
        assert [r["name"] for r in pg.fetch("select name from users order by id")] == ["ada", "bob"]
        assert pg.fetchval("select count(*) from things") == 0
"""

SEQUENCES_MODULE = """
    import pytest

    pytestmark = pytest.mark.pg(reset_sequences=True)
    seen = []

    @pytest.fixture(scope="module")
    def made(pg_module):
        thing = pg_module.fetchval("insert into things (name) values ('module') returning id")
        return pg_module.fetchval("insert into users (name) values ('module') returning id"), thing

    @pytest.mark.parametrize("run", [1, 2])
    def test_ids_start_after_the_module_data(pg, made, run):
        user, thing = made
        ids = (
            pg.fetchval("insert into users (name) values ('x') returning id"),
            pg.fetchval("insert into things (name) values ('x') returning id"),  # an identity column
        )
        assert ids == (user + 1, thing + 1)
        pg.fetchval("select nextval('users_id_seq')")

    @pytest.mark.parametrize("run", [1, 2])
    def test_a_sequence_the_test_creates(pg, run):
        pg.execute("create table notes (id serial primary key, body text)")
        assert pg.fetchval("insert into notes (body) values ('x') returning id") == 1
"""

WITHOUT_RESET = """
    def test_without_the_option_ids_keep_growing(pg):
        first = pg.fetchval("insert into users (name) values ('z1') returning id")
        assert first > 4  # the tests before moved the sequence, and nothing set it back
"""

RESET_WITHOUT_SCOPE = """
    import pytest

    pytestmark = pytest.mark.pg(reset_sequences=True)
    first = []

    @pytest.mark.parametrize("run", [1, 2, 3])
    def test_same_ids_in_every_test(pg, run):
        ids = (
            pg.fetchval("insert into users (name) values ('e') returning id"),
            pg.fetchval("insert into things (name) values ('e') returning id"),
        )
        first.append(ids)
        assert ids == first[0]
"""

OTHER_LIBRARY = """
    import pytest

    @pytest.fixture(scope="module")
    def rows(pg_module):
        pg_module.execute("insert into users (name) values ('m')")

    def test_psycopg2_does_not_see_the_module_rows(pg, rows, pg_psycopg2):
        cursor = pg_psycopg2.cursor()
        cursor.execute("select count(*) from users")
        assert cursor.fetchone()[0] == 2 and pg.fetchval("select count(*) from users") == 3
"""


# a module-scoped login through SQLAlchemy, on rows an earlier module fixture made: SQLAlchemy rolls back after its
# first connect and when a Connection closes, which must not take the scope's rows with it
SQLALCHEMY_MODULE = """
    import pytest
    import sqlalchemy as sa

    import pgsandbox

    @pytest.fixture(scope="module")
    def users(pg_module):
        pg_module.execute("insert into users (name) values ('first')")

    @pytest.fixture(scope="module")
    def engine(pg_module, users):
        return pgsandbox.sqlalchemy_engine(pg_module)

    @pytest.fixture(scope="module")
    def login(engine):
        with engine.begin() as conn:
            conn.execute(sa.text("insert into users (name) values ('login')"))
        with engine.connect() as conn:  # closed without a commit: rolls back only its own work
            conn.execute(sa.text("insert into users (name) values ('dropped')"))
        return "token"

    def test_the_scope_rows_are_all_there(pg, login):
        assert pg.fetchval("select count(*) from users") == 4  # the migration's two, the module's two
        pg.execute("insert into users (name) values ('test')")

    def test_each_test_is_rolled_back_to_them(pg, engine, login):
        with engine.connect() as conn:
            names = conn.execute(sa.text("select name from users order by id")).scalars().all()
        assert names[2:] == ["first", "login"]
"""


@pytest.mark.slow
def test_module_and_class_data_with_per_test_rollback(project: pytest.Pytester, shared_dsn: str) -> None:
    write(
        project,
        test_a=APP_MODULE,
        test_b=NEXT_MODULE,
        test_c=SEQUENCES_MODULE,
        test_d=WITHOUT_RESET,
        test_e=RESET_WITHOUT_SCOPE,
        test_f=OTHER_LIBRARY,
        test_g=SQLALCHEMY_MODULE,
    )
    result = project.runpytest(f"--pg-dsn={shared_dsn}", "-p", "no:randomly")
    result.assert_outcomes(passed=18)
    result.stdout.fnmatch_lines(
        [
            "*PgSandboxWarning: pg_psycopg2 is a transaction of its own on the session "
            "database: it does not see the rows that test_f.py made once*"
        ]
    )


@pytest.mark.slow
def test_session_data_and_sequences_reset_to_the_scope(project: pytest.Pytester, shared_dsn: str) -> None:
    """pg_session_data for every module; pg_reset_sequences from the command line: ids start after the session's
    rows in every test, after a module's rows in that module's tests, and after the session's again in the next
    module (the module's own sequence moves are set back with its data)."""
    write(
        project,
        conftest="""
            import pytest

            @pytest.fixture(scope="session", autouse=True)
            def everyone(pg_session_data):
                pg_session_data.execute("insert into users (name) values ('session')")
                pg_session_data.execute("insert into things (name) values ('session')")
        """,
        test_a="""
            import pytest

            @pytest.mark.parametrize("run", [1, 2])
            def test_a(pg, run):
                assert pg.fetchval("select count(*) from users") == 3
                assert pg.fetchval("insert into users (name) values ('a') returning id") == 4
                assert pg.fetchval("insert into things (name) values ('a') returning id") == 2
        """,
        test_b="""
            import pytest

            @pytest.fixture(scope="module")
            def more(pg_module):
                pg_module.execute("insert into users (name) values ('b1'), ('b2')")

            @pytest.mark.parametrize("run", [1, 2])
            def test_b(pg, more, run):
                assert pg.fetchval("insert into users (name) values ('b') returning id") == 6

            @pytest.fixture(scope="module")
            def later(pg_module):  # set up between two tests: it moves the sequence after the last restore
                pg_module.execute("insert into users (name) values ('c1'), ('c2')")

            class TestLater:
                @pytest.mark.parametrize("run", [1, 2])
                def test_after_the_class_rows(self, pg, more, later, run):
                    assert pg.fetchval("insert into users (name) values ('b') returning id") == 8
        """,
        test_c="""
            def test_c(pg):
                assert pg.fetchval("select count(*) from users") == 3
                assert pg.fetchval("insert into users (name) values ('c') returning id") == 4
        """,
    )
    result = project.runpytest(f"--pg-dsn={shared_dsn}", "-p", "no:randomly", "--pg-reset-sequences")
    result.assert_outcomes(passed=7)


@pytest.mark.slow
def test_mistakes_are_explained(project: pytest.Pytester, shared_dsn: str) -> None:
    """A module fixture asking for pg, a database-isolation test inside scoped data, a raw COMMIT that ends the
    module's transaction, and a scoped fixture's own raw COMMIT: each says what happened and what to do, and
    the next module still starts from the template."""
    write(
        project,
        test_a="""
            import pytest

            @pytest.fixture(scope="module")
            def wrong(pg):
                return 1

            def test_scope_mismatch(wrong):
                pass
        """,
        test_b="""
            import pytest

            @pytest.fixture(scope="module")
            def rows(pg_module):
                pg_module.execute("insert into users (name) values ('m')")

            @pytest.mark.pg(isolation="database")
            def test_1_database_inside(rows, pg):
                pass

            def test_2_commits_for_real(pg, rows):
                pg.execute("insert into users (name) values ('escaped')")
                pg.execute("commit")

            def test_3_after_the_commit(pg, rows):
                pass
        """,
        test_c="""
            import pytest

            @pytest.fixture(scope="module")
            def committing(pg_module):
                pg_module.execute("insert into users (name) values ('fixture-commit')")
                pg_module.execute("commit")

            def test_uses_it(pg, committing):
                pass
        """,
        test_d=NEXT_MODULE,
        test_e="""
            import pytest

            @pytest.fixture(scope="module")
            def rows(pg_module):
                pg_module.execute("insert into users (name) values ('m')")

            def test_1_fails(pg, rows):
                pg.execute("insert into users (name) values ('evidence')")
                assert False

            def test_2_still_has_the_module_rows(pg, rows):
                assert pg.fetchval("select count(*) from users") == 3
        """,
    )
    result = project.runpytest(f"--pg-dsn={shared_dsn}", "-p", "no:randomly", "--pg-keep-failed")
    out = result.stdout.str()
    # a module-scoped fixture that asked for pg
    assert "ScopeMismatch" in out and "a module-scoped fixture asked for pg, which is one test's database" in out
    assert "write them through pg_module in that fixture" in out
    # a database-isolation test inside the module's data
    assert "test_1_database_inside asks for database isolation, but it runs inside the data that" in out
    assert "move it to a module (or class) that uses no pg_module" in out
    # a raw COMMIT in a test: reported as an escape, and the rest of the module is told its data is gone
    assert "test_2_commits_for_real committed outside its transaction" in out
    assert "test_3_after_the_commit cannot run inside the data of test_b.py: it is gone, because" in out
    assert "test_2_commits_for_real ended the transaction that held it" in out
    # a scoped fixture's raw COMMIT: found when the module's data is rolled back
    assert "test_c.py committed outside its transaction" in out
    # keep-failed inside the module's data: not kept, said in the failure's report, and the module goes on
    assert "test_e.py::test_1_fails failed, but its database was not kept (keep_failed): it ran inside the data" in out
    assert ", 0 kept" in out
    result.assert_outcomes(passed=4, failed=1, errors=5)


@pytest.mark.slow
def test_database_isolation_clones_each_test_from_the_scope_database(project: pytest.Pytester, shared_dsn: str) -> None:
    """The same app under database isolation: the module's rows go into a database of its own, each test gets a
    clone of it (of the class's, inside the class); a transaction-isolation test inside it is told why not."""
    write(
        project,
        test_a=APP_MODULE,
        test_b=NEXT_MODULE,
        test_c="""
            import pytest

            @pytest.fixture(scope="module")
            def rows(pg_module):
                pg_module.execute("insert into users (name) values ('m')")

            @pytest.mark.pg(isolation="transaction")
            def test_transaction_inside(rows, pg):
                pass
        """,
    )
    result = project.runpytest(f"--pg-dsn={shared_dsn}", "-p", "no:randomly", "--pg-isolation=database")
    result.assert_outcomes(passed=7, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*test_c.py::test_transaction_inside asks for transaction isolation, but it runs inside the data that "
            "test_c.py made once in database isolation (a database of its own, which the session database does not "
            "have).",
            "*What to do: give it database isolation like its scope*",
        ]
    )
    assert ", 0 kept" in result.stdout.str()


@pytest.mark.slow
@pytest.mark.parametrize("dist", ["loadfile", "load"])
def test_xdist_builds_module_data_on_each_worker_that_runs_the_module(pytester: pytest.Pytester, dist: str) -> None:
    """loadfile (and loadscope): a module's tests share one worker, which builds its data once. load: a module's
    tests spread over the workers; each builds the data for the tests it runs (every test still sees it)."""
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n')
    (pytester.path / "migrations").mkdir()
    (pytester.path / "migrations/1.sql").write_text("create table items (id serial primary key, name text);\n")
    builds = pytester.path / "builds"
    builds.mkdir()
    module = f"""
        import os, pathlib, pytest

        @pytest.fixture(scope="module")
        def rows(pg_module, request):
            pg_module.execute("insert into items (name) select 'row' from generate_series(1, 10)")
            pathlib.Path({str(builds)!r}, request.module.__name__ + "-" + os.environ["PYTEST_XDIST_WORKER"] + "-"
                         + str(os.urandom(4).hex())).touch()

        @pytest.mark.parametrize("i", range(6))
        def test_rows(pg, rows, i):
            assert pg.fetchval("select count(*) from items") == 10
            pg.execute("insert into items (name) values ('test')")
    """
    pytester.makepyfile(test_one=textwrap.dedent(module), test_two=textwrap.dedent(module))
    result = pytester.runpytest("-n", "2", f"--dist={dist}", "-p", "no:randomly")
    result.assert_outcomes(passed=12)
    made = sorted(path.name.rsplit("-", 1)[0] for path in builds.iterdir())
    if dist == "loadfile":
        assert len(made) == 2 and {name.split("-")[0] for name in made} == {"test_one", "test_two"}
    else:
        assert len(made) >= 2


# -- pg_reset_sequences' SQL, without a server ------------------------------------------------------------------
def test_restore_sql_sets_back_only_what_moved() -> None:
    states = snapshot([(16390, 7, 1), (16395, None, 100)])
    assert states == (SequenceState(16390, 7, 1), SequenceState(16395, None, 100))
    query = restore_sql(states)
    assert query is not None
    assert "unnest('{16390,16395}'::oid[], '{7,NULL}'::int8[], '{1,100}'::int8[])" in query
    assert "setval(s.seq, coalesce(s.last, s.start), s.last IS NOT NULL)" in query
    assert "WHERE pg_sequence_last_value(s.seq) IS DISTINCT FROM s.last" in query
    assert restore_sql(()) is None
