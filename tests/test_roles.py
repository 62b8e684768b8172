"""Least-privilege roles: tests connect as a role of their session's own, which owns its databases and
nothing else, may not create roles or databases, and may not connect to another session's databases."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import psycopg
import pytest

from pgsandbox import LocalServer, Sandbox, Settings
from pgsandbox.server import roles
from pgsandbox.server.roles import OWNER

pytestmark = pytest.mark.slow  # every test here starts a server or a process

SCHEMA = "create table users (id serial primary key, name text not null);\ninsert into users (name) values ('ada');\n"

PRIVILEGES = """
    import psycopg
    import pytest

    def me(conn):
        return conn.execute(
            "select current_user, rolsuper, rolcreaterole, rolcreatedb from pg_roles where rolname = current_user"
        ).fetchone()

    def test_the_tests_role(pg_conn, pg):
        user, superuser, createrole, createdb = me(pg_conn)
        assert user == pg.info.user and user.startswith("pgsandbox_") and user.endswith("_tests")
        assert not (superuser or createrole or createdb)
        # it owns what the migrations made (through pgsandbox_owner): data and schema changes work
        pg_conn.execute("insert into users (name) values ('bob')")
        pg_conn.execute("alter table users add column email text")
        assert pg_conn.execute("select count(*) from users").fetchone() == (2,)

    def test_it_may_not_create_roles_or_databases(pg_conn):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            pg_conn.execute("create role intruder")
        pg_conn.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            pg_conn.execute("select pg_terminate_backend(pid) from pg_stat_activity where usename = 'postgres'")
        pg_conn.rollback()

    @pytest.mark.pg(isolation="database")
    def test_nor_databases(pg):
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("create database intruder")

    def test_pg_admin_is_the_admin(pg_admin, pg):
        user, superuser, _, _ = me(pg_admin)
        assert superuser and user != pg.info.user
        assert pg_admin.info.dbname == pg.name
"""


def test_tests_connect_as_a_least_privilege_role(pytester: pytest.Pytester, shared_dsn: str) -> None:
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n')
    (pytester.path / "migrations").mkdir()
    (pytester.path / "migrations/1.sql").write_text(SCHEMA)
    (pytester.path / "test_privileges.py").write_text(textwrap.dedent(PRIVILEGES))
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "-p", "no:randomly")
    result.assert_outcomes(passed=4)
    role = pytester.runpytest(f"--pg-dsn={shared_dsn}", "--pg-role=admin", "-p", "no:randomly", "-k", "tests_role")
    role.assert_outcomes(failed=1)  # with pg_role = admin the tests connect as the admin
    role.stdout.fnmatch_lines(["*pg_conn = <*SandboxConnection * user=postgres database=*"])


def sandbox(tmp_path: Path, shared_dsn: str, **options: object) -> Sandbox:
    (tmp_path / "migrations").mkdir(exist_ok=True)
    (tmp_path / "migrations/1.sql").write_text(SCHEMA)
    settings = Settings(dsn=shared_dsn, migrations=("sql:migrations",)).replace(**options)
    return Sandbox.start(settings, root=tmp_path)


def test_one_sessions_role_cannot_reach_anothers_databases(
    tmp_path: Path, shared: LocalServer, shared_dsn: str
) -> None:
    with sandbox(tmp_path, shared_dsn) as first, sandbox(tmp_path, shared_dsn) as second:
        assert first.server.login and second.server.login
        assert first.server.login.user != second.server.login.user
        with first.database() as mine, second.database() as theirs:
            assert mine.fetchval("select count(*) from users") == 1
            with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
                psycopg.connect(first.server.login_dsn_for(theirs.name)).close()
            with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
                psycopg.connect(second.server.login_dsn_for(mine.name)).close()
            # the template itself takes no connections at all
            with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
                psycopg.connect(first.server.login_dsn_for(first.template)).close()
        users = (first.server.login.user, second.server.login.user)
    # each session dropped its role; the shared owner role stays for the templates
    left = shared.admin.execute("select rolname from pg_roles where rolname = any(%s)", [list(users)]).fetchall()
    assert left == []
    assert shared.admin.execute("select 1 from pg_roles where rolname = %s", [OWNER]).fetchone() == (1,)


def test_createdb_when_asked(tmp_path: Path, shared_dsn: str) -> None:
    with sandbox(tmp_path, shared_dsn, role="createdb") as box, box.database() as db:
        assert db.fetchval("select rolcreatedb from pg_roles where rolname = current_user") is True


APP_SCHEMA = """
create extension if not exists citext;
create schema app;
create type app.status as enum ('new', 'done');
create domain app.positive as integer check (value > 0);
create sequence app.tickets;
create table app.accounts (id serial primary key, email citext unique, status app.status, credit app.positive);
create view app.open_accounts as select * from app.accounts where status = 'new';
create function app.add_account(address text) returns integer language sql
    as $$ insert into app.accounts (email, status, credit) values (address, 'new', 1) returning id $$;
do $$ begin create role pgsandbox_test_app_reader; exception when duplicate_object then null; end $$;
grant usage on schema app to pgsandbox_test_app_reader;
grant select on app.accounts to pgsandbox_test_app_reader;
"""

APP_TESTS = """
    def test_the_tests_role_owns_the_apps_objects(pg_conn):
        assert pg_conn.execute("select app.add_account('ADA@example.com')").fetchone()[0] == 1
        assert pg_conn.execute("select email from app.open_accounts").fetchone() == ("ADA@example.com",)
        assert pg_conn.execute("select count(*) from app.accounts where email = 'ada@example.com'").fetchone() == (1,)
        assert pg_conn.execute("select nextval('app.tickets')").fetchone() == (1,)
        pg_conn.execute("alter table app.accounts add column note text")  # owner's rights: DDL too
        owners = pg_conn.execute(
            "select distinct pg_get_userbyid(relowner) from pg_class where relnamespace = 'app'::regnamespace"
        ).fetchall()
        assert owners == pg_conn.execute("select current_user").fetchall()  # handed over, then taken over
        # the migration's own grant to an app role is still there
        reader = "select has_table_privilege('pgsandbox_test_app_reader', 'app.accounts', 'select')"
        assert pg_conn.execute(reader).fetchone() == (True,)
"""


def test_migrations_run_as_the_admin_and_the_tests_role_owns_what_they_made(
    pytester: pytest.Pytester, shared_dsn: str
) -> None:
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n')
    (pytester.path / "migrations").mkdir()
    (pytester.path / "migrations/1.sql").write_text(APP_SCHEMA)
    (pytester.path / "test_app.py").write_text(textwrap.dedent(APP_TESTS))
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "-p", "no:randomly")
    result.assert_outcomes(passed=1)


def test_an_admin_with_createrole_but_not_superuser(tmp_path: Path, shared: LocalServer, shared_dsn: str) -> None:
    """A CI server's admin is often CREATEDB CREATEROLE, not a superuser: roles work the same when it is a member
    of pgsandbox_owner (it is when it created it); when it cannot be, tests connect as it, and a line says why."""
    from psycopg.conninfo import make_conninfo

    from pgsandbox.server.scram import scram_verifier
    from pgsandbox.template.builds import drop_template

    password = "ci-" + os.urandom(8).hex()
    with roles.changing_roles(shared.admin):
        roles.ensure_owner(shared.admin)  # another admin's, whatever ran before on this server
    shared.admin.execute(f"create role ci_admin login createdb createrole password '{scram_verifier(password)}'")
    dsn = make_conninfo(shared_dsn, user="ci_admin", password=password)
    try:
        lines: list[str] = []
        settings = Settings(dsn=dsn, migrations=("sql:migrations",))
        project = tmp_path / "project"
        project.mkdir()
        (project / "migrations").mkdir()
        (project / "migrations/1.sql").write_text(SCHEMA)
        with Sandbox.start(settings, root=project, progress=lines.append) as box, box.database() as db:
            assert box.server.login is None
            assert db.fetchval("select current_user") == "ci_admin"
        assert any("tests connect as ci_admin: it may not create roles" in line for line in lines), lines

        shared.admin.execute(f"grant {OWNER} to ci_admin with admin option")  # as if it had created it
        with Sandbox.start(settings, root=project) as box, box.database() as db:
            assert box.server.login is not None
            assert db.fetchval("select current_user") == box.server.login.user
            db.execute("insert into users (name) values ('bob')")
            db.execute("alter table users add column email text")
            assert db.fetchval("select count(*) from users") == 2
            db.execute("create sequence user_numbers owned by users.id")  # one owner: the tests' role
    finally:
        owned = shared.admin.execute(
            "select datname from pg_database where datdba = (select oid from pg_roles where rolname = 'ci_admin')"
        ).fetchall()
        for (name,) in owned:
            drop_template(shared, name)
        shared.admin.execute("drop role ci_admin")


# A project whose migrations own its tables and functions, and whose tests add objects of their own that
# PostgreSQL requires to have the same owner as the migrated ones (or that run with their owner's rights).
OWNERSHIP_SCHEMA = """
create schema app;
create table app.accounts (id bigint primary key, email text not null, updated_at timestamptz);
create table app.jobs (id serial primary key, account_id bigint references app.accounts (id), status text);
create function app.touch() returns trigger language plpgsql as $$
    begin new.updated_at = now(); return new; end $$;
create function app.is_visible(account bigint) returns boolean language sql stable as $$ select true $$;
"""

OWNERSHIP_TESTS = """
    import psycopg
    import pytest

    pytestmark = pytest.mark.pg(isolation=ISOLATION)

    def test_a_sequence_owned_by_a_migrated_column(pg_conn):
        pg_conn.execute("create sequence app.account_ids owned by app.accounts.id")
        pg_conn.execute("alter table app.accounts alter column id set default nextval('app.account_ids')")
        pg_conn.execute("insert into app.accounts (email) values ('ada@example.com')")
        assert pg_conn.execute("select id from app.accounts").fetchone() == (1,)

    def test_a_migrated_sequence_owned_by_a_new_column(pg_conn):
        pg_conn.execute("alter table app.jobs add column ticket integer")
        pg_conn.execute("alter sequence app.jobs_id_seq owned by app.jobs.ticket")

    def test_a_trigger_on_a_migrated_table_writing_to_a_new_table(pg_conn):
        pg_conn.execute("create table app.audit (account_id bigint, at timestamptz default now())")
        pg_conn.execute(
            "create function app.audit_account() returns trigger language plpgsql security definer as $$ "
            "begin insert into app.audit (account_id) values (new.id); return new; end $$"
        )
        each_row = "on app.accounts for each row execute function"
        pg_conn.execute(f"create trigger audited after insert {each_row} app.audit_account()")
        pg_conn.execute(f"create trigger touched before update {each_row} app.touch()")
        pg_conn.execute("insert into app.accounts (id, email) values (1, 'ada@example.com')")
        pg_conn.execute("update app.accounts set email = 'ada@example.org'")
        assert pg_conn.execute("select count(*) from app.audit").fetchone() == (1,)
        assert pg_conn.execute("select updated_at is not null from app.accounts").fetchone() == (True,)

    def test_a_migrated_table_referencing_a_new_one(pg_conn):
        pg_conn.execute("create table app.statuses (name text primary key)")
        pg_conn.execute("insert into app.statuses values ('new')")
        pg_conn.execute("alter table app.jobs add constraint known_status foreign key (status) references app.statuses")
        pg_conn.execute("insert into app.accounts (id, email) values (1, 'ada@example.com')")
        pg_conn.execute("insert into app.jobs (account_id, status) values (1, 'new')")
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            pg_conn.execute("insert into app.jobs (account_id, status) values (1, 'lost')")
        pg_conn.rollback()

    def test_a_new_table_referencing_a_migrated_one(pg_conn):
        pg_conn.execute("create table app.notes (account_id bigint references app.accounts on delete cascade)")
        pg_conn.execute("insert into app.accounts (id, email) values (1, 'ada@example.com')")
        pg_conn.execute("insert into app.notes values (1)")
        pg_conn.execute("delete from app.accounts")
        assert pg_conn.execute("select count(*) from app.notes").fetchone() == (0,)

    def test_a_policy_on_a_migrated_table_using_a_new_table(pg_conn):
        pg_conn.execute("create table app.grants (account_id bigint)")
        pg_conn.execute("alter table app.accounts enable row level security, force row level security")
        pg_conn.execute(
            "create policy granted on app.accounts for select using "
            "(app.is_visible(id) and id in (select account_id from app.grants))"
        )
        pg_conn.execute("create policy writes on app.accounts for insert with check (true)")
        pg_conn.execute("insert into app.grants values (1)")
        pg_conn.execute("insert into app.accounts (id, email) values (1, 'a@example.com'), (2, 'b@example.com')")
        superuser = pg_conn.execute("select rolsuper from pg_roles where rolname = current_user").fetchone()[0]
        visible = pg_conn.execute("select id from app.accounts order by id").fetchall()
        assert visible == ([(1,), (2,)] if superuser else [(1,)])  # a superuser bypasses row security

    def test_a_view_over_both_and_a_partition(pg_conn):
        pg_conn.execute("create table app.archive (like app.accounts including all)")
        pg_conn.execute("create view app.everyone as select id from app.accounts union all select id from app.archive")
        pg_conn.execute("create materialized view app.counted as select count(*) from app.everyone")
        pg_conn.execute("refresh materialized view app.counted")
        pg_conn.execute("create table app.events (at date not null) partition by range (at)")
        pg_conn.execute("create table app.events_2026 (at date not null)")
        pg_conn.execute(
            "alter table app.events attach partition app.events_2026 for values from ('2026-01-01') to ('2027-01-01')"
        )

    def test_what_the_test_made_has_the_migrated_objects_owner(pg_conn):
        pg_conn.execute("create table app.mine (id int)")
        owners = pg_conn.execute(
            "select distinct pg_get_userbyid(relowner) from pg_class where relnamespace = 'app'::regnamespace"
        ).fetchall()
        assert owners == pg_conn.execute("select current_user").fetchall()
"""


@pytest.mark.parametrize(
    ("role", "server"), [("own", "local"), ("own", "external"), ("createdb", "external"), ("admin", "local")]
)
def test_what_tests_create_has_the_owner_of_what_migrations_created(
    pytester: pytest.Pytester, shared_dsn: str, role: str, server: str
) -> None:
    """Migrated objects and the test's own have one owner, the role the tests connect as, in every pg_role mode,
    on pgsandbox's own server and on an existing one, in both isolation modes, under pytest-xdist."""
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n')
    (pytester.path / "migrations").mkdir()
    (pytester.path / "migrations/1.sql").write_text(OWNERSHIP_SCHEMA)
    for isolation in ("transaction", "database"):
        tests = textwrap.dedent(OWNERSHIP_TESTS).replace("ISOLATION", repr(isolation))
        (pytester.path / f"test_{isolation}.py").write_text(tests)
    where = [f"--pg-dsn={shared_dsn}"] if server == "external" else []
    result = pytester.runpytest(*where, f"--pg-role={role}", "-n", "2", "-p", "no:randomly")
    result.assert_outcomes(passed=16)


@pytest.mark.parametrize("isolation", ["transaction", "database"])
@pytest.mark.usefixtures("machine_wide_servers")  # its kept run: `pgsandbox clean` elsewhere would take it
def test_a_kept_database_is_given_to_the_admin_and_the_tests_role_is_dropped(
    tmp_path: Path, shared: LocalServer, shared_dsn: str, isolation: str
) -> None:
    """Everything in a test database belongs to the session's role (the template's objects and the test's own):
    a database kept for a failed test is given to the admin, so that the role can be dropped at the end."""
    with sandbox(tmp_path, shared_dsn, isolation=isolation) as box:
        assert box.server.login is not None
        user = box.server.login.user
        db = box.open()
        db.execute("create table notes (user_id integer references users (id))")
        box.close(db, keep=True)
        (kept,) = box.kept
    try:
        assert shared.admin.execute("select 1 from pg_roles where rolname = %s", [user]).fetchone() is None
        with shared.connect(kept) as conn:
            owners = conn.execute(
                "select distinct pg_get_userbyid(relowner) from pg_class where relname in ('users', 'notes')"
            ).fetchall()
            assert owners == [("postgres",)]
            dba = conn.execute("select pg_get_userbyid(datdba) from pg_database where datname = current_database()")
            assert dba.fetchone() == ("postgres",)
    finally:
        shared.admin.execute(f'drop database if exists "{kept}"')
