"""``sql:DIR``: splitting, natural order, transactions, and messages that point into the file."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgsandbox import LocalServer
from pgsandbox.common.urls import sqlalchemy_url
from pgsandbox.template.base import MigrationError, Target
from pgsandbox.template.sql import (
    COMMIT_AFTER,
    COPY_STDIN,
    NO_TRANSACTION,
    OUTSIDE_TEMPLATE,
    TRANSACTION_CONTROL,
    SqlDirMigrator,
    _MetaCommand,
    line_and_column,
    natural_key,
    split_statements,
)


def texts(source: str) -> list[str]:
    return [statement.text for statement in split_statements(source)]


def test_split_respects_quotes_comments_and_bodies() -> None:
    source = """
    -- a comment; with a semicolon
    create table a (x text default 'it''s; fine');
    /* block; /* nested; */ still comment */ select 1;
    create function f() returns int language plpgsql as $body$ begin return 1; end $body$;
    select E'back\\'slash;', "odd;name" from a;
    create function g() returns int language sql begin atomic select 1; select 2; end;
    ;;
    select $$a;b$$
    """
    assert texts(source) == [
        "-- a comment; with a semicolon\n    create table a (x text default 'it''s; fine')",
        "/* block; /* nested; */ still comment */ select 1",
        "create function f() returns int language plpgsql as $body$ begin return 1; end $body$",
        "select E'back\\'slash;', \"odd;name\" from a",
        "create function g() returns int language sql begin atomic select 1; select 2; end",
        "select $$a;b$$",
    ]


def test_offsets_point_into_the_source() -> None:
    source = "select 1;\n\n  select 2;"
    statements = list(split_statements(source))
    assert [source[s.offset : s.offset + 8] for s in statements] == ["select 1", "select 2"]


@pytest.mark.parametrize(
    ("source", "statements"),
    [
        pytest.param("select $1; select 2", ["select $1", "select 2"], id="a parameter is no dollar quote"),
        pytest.param(
            "create table t$1 (x int); select $a$;$a$; select 3",
            ["create table t$1 (x int)", "select $a$;$a$", "select 3"],
            id="a dollar inside a name is no dollar quote",
        ),
        pytest.param(
            "select $a$ $$;$$ $b$ ; $a$; select 2",
            ["select $a$ $$;$$ $b$ ; $a$", "select 2"],
            id="a tagged dollar quote ends at its own tag only",
        ),
        pytest.param(
            "do $do$ begin perform 1; end $do$;", ["do $do$ begin perform 1; end $do$"], id="a DO block is one"
        ),
        pytest.param("select 'a\\'; select 2", ["select 'a\\'", "select 2"], id="a backslash ends no plain string"),
        pytest.param(
            "select e'\\';'; select 2", ["select e'\\';'", "select 2"], id="a backslash escapes a quote in e''"
        ),
        pytest.param("select xe'a'; select 2", ["select xe'a'", "select 2"], id="a name ending in e is no E string"),
        pytest.param('select "a""b;c"; select 2', ['select "a""b;c"', "select 2"], id="a doubled quote in a name"),
        pytest.param("select 1 -- end; no newline", ["select 1 -- end; no newline"], id="a last comment"),
        pytest.param("-- only a comment;\n;\n/* and; this */;", [], id="comment-only pieces are dropped"),
        pytest.param(
            "create procedure p() language sql BEGIN ATOMIC select case when true then 1 end; select 2; END; select 3",
            [
                "create procedure p() language sql BEGIN ATOMIC select case when true then 1 end; select 2; END",
                "select 3",
            ],
            id="a CASE ... END inside BEGIN ATOMIC",
        ),
        pytest.param(
            "begin; create table a (x int); commit;",
            ["begin", "create table a (x int)", "commit"],
            id="transaction control is a statement of its own",
        ),
        pytest.param("select 1 \\\\ 2;", ["select 1 \\\\ 2"], id="a backslash inside a line is no psql command"),
        pytest.param("select 'unterminated; select 2", ["select 'unterminated; select 2"], id="an open string"),
        pytest.param("select 1;   \n\n  select 2  ;", ["select 1", "select 2"], id="surrounding blanks are trimmed"),
    ],
)
def test_split_statements(source: str, statements: list[str]) -> None:
    assert texts(source) == statements


@pytest.mark.parametrize(
    ("source", "offset"),
    [("select 1;\n\\i x.sql\nselect 2;", 10), ("copy a from stdin;\n1\n\\.\n", 21)],
    ids=["include", "copy data"],
)
def test_a_psql_command_at_a_line_start_stops_the_split_where_it_is(source: str, offset: int) -> None:
    with pytest.raises(_MetaCommand) as meta:
        texts(source)
    assert meta.value.offset == offset
    assert line_and_column(source, offset)[1] == 1


@pytest.mark.parametrize(
    ("pattern", "matches", "does_not_match"),
    [
        (
            NO_TRANSACTION,
            [
                "create index concurrently i on a (x)",
                "CREATE UNIQUE INDEX CONCURRENTLY i on a(x)",
                "drop index concurrently i",
                "reindex table concurrently a",
                "vacuum analyze a",
                "alter system set work_mem = '8MB'",
                "cluster",
                "create subscription s connection '' publication p",
            ],
            ["create index i on a (x)", "cluster a using i", "select 'vacuum'"],
        ),
        (
            OUTSIDE_TEMPLATE,
            ["create database x", "alter tablespace t rename to u", "create role r", "CREATE USER u"],
            ["create table database (x int)", "alter role r set x = 1", "create schema roles"],
        ),
        (
            TRANSACTION_CONTROL,
            ["begin", "BEGIN ISOLATION LEVEL SERIALIZABLE", "start transaction", "commit", "end", "rollback", "abort"],
            ["rollback to savepoint s", "begin atomic", "beginning", "committed"],
        ),
        (
            COMMIT_AFTER,
            ["alter type mood add value 'x'", "ALTER TYPE s.mood ADD VALUE IF NOT EXISTS 'y'"],
            ["alter type mood rename value 'a' to 'b'"],
        ),
        (COPY_STDIN, ["copy a from stdin", "COPY a (x) FROM STDIN WITH (FORMAT csv)"], ["copy a from '/tmp/x'"]),
    ],
    ids=["outside a transaction", "outside the template", "transaction control", "commit after", "copy from stdin"],
)
def test_what_each_statement_needs_is_read_from_its_first_words(
    pattern: re.Pattern[str], matches: list[str], does_not_match: list[str]
) -> None:
    assert [text for text in matches if not pattern.match(text)] == []
    assert [text for text in does_not_match if pattern.match(text)] == []


def test_natural_order() -> None:
    names = ["10_y.sql", "2_x.sql", "1_a.sql", "001_b.sql", "V3__c.sql"]
    assert sorted(names, key=lambda n: natural_key(Path(n))) == [
        "1_a.sql",
        "001_b.sql",
        "2_x.sql",
        "10_y.sql",
        "V3__c.sql",
    ]


@pytest.fixture
def target(shared: LocalServer) -> Iterator[Target]:
    name = shared.create_database()
    yield Target(name, shared.dsn_for(name), sqlalchemy_url({**shared.params, "dbname": name}))
    shared.drop_database(name)


def migrate(directory: Path, target: Target) -> None:
    SqlDirMigrator(directory, directory.parent).migrate(target)


def tables(target: Target) -> list[str]:
    with target.connect() as conn:
        rows = conn.execute("select tablename from pg_tables where schemaname = 'public' order by 1").fetchall()
    return [row[0] for row in rows]


@pytest.mark.slow
def test_files_in_natural_order_and_statements_that_need_no_transaction(tmp_path: Path, target: Target) -> None:
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "2_index.sql").write_text(
        "create index concurrently users_name on users (name);\nalter type mood add value 'meh';\n"
        "insert into users (name, mood) values ('x', 'meh');\n"
    )
    (migrations / "10_posts.sql").write_text("create table posts (id int references users);\nvacuum users;\n")
    (migrations / "1_users.sql").write_text(
        "create type mood as enum ('ok');\ncreate table users (id serial primary key, name text, mood mood);"
    )
    (migrations / "notes.txt").write_text("not sql")
    migrate(migrations, target)
    assert tables(target) == ["posts", "users"]
    with target.connect() as conn:
        assert conn.execute("select indexname from pg_indexes where indexname = 'users_name'").fetchone()


@pytest.mark.slow
def test_a_file_with_its_own_transactions_runs_as_written(tmp_path: Path, target: Target) -> None:
    migrations = tmp_path / "m"
    migrations.mkdir()
    (migrations / "1.sql").write_text(
        "BEGIN;\ncreate table a (x int);\nCOMMIT;\ncreate index concurrently ai on a (x);"
    )
    migrate(migrations, target)
    assert tables(target) == ["a"]


@pytest.mark.slow
def test_a_failing_statement_names_file_line_and_column(tmp_path: Path, target: Target) -> None:
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "1_ok.sql").write_text("create table fine (id int);\n")
    (migrations / "2_bad.sql").write_text(
        "create table users (id int);\n\ncreate table posts (\n    id int,\n    body txt\n);\n"
    )
    with pytest.raises(MigrationError) as caught:
        migrate(migrations, target)
    message = str(caught.value)
    assert "migration migrations/2_bad.sql failed at line 5, column 10:" in message
    assert "   5 |     body txt" in message
    assert "         |          ^" in message  # under the column
    assert 'PostgreSQL: type "txt" does not exist (SQLSTATE 42704)' in message
    assert "What to do: fix that statement and run again" in message
    # each file in its own transaction: 2_bad.sql left nothing, 1_ok.sql was committed
    assert tables(target) == ["fine"]


@pytest.mark.slow
def test_a_runtime_error_without_position_names_the_statement(tmp_path: Path, target: Target) -> None:
    migrations = tmp_path / "m"
    migrations.mkdir()
    (migrations / "1.sql").write_text(
        "create table u (id int primary key);\ninsert into u values (1);\n  insert into u values (1);\n"
    )
    with pytest.raises(MigrationError) as caught:
        migrate(migrations, target)
    message = str(caught.value)
    assert "migration m/1.sql failed at line 3, column 3:" in message
    assert "duplicate key value violates unique constraint" in message
    assert "detail: Key (id)=(1) already exists." in message


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("\\i other.sql\n", "line 1, column 1: \\i is a psql command, not SQL"),
        ("create table a (x int);\ncopy a from stdin;\n1\n\\.\n", "is COPY ... FROM STDIN"),
        ("create database other;\n", "creates or changes something outside the template database"),
        ("begin;\ncreate index concurrently i on a (x);\ncommit;", "cannot run inside a transaction block"),
        ("create table a (x int);\nbegin;\ninsert into a values (1);\n", "opened a transaction, line 2"),
    ],
)
@pytest.mark.slow
def test_what_cannot_run_is_reported_clearly(tmp_path: Path, target: Target, sql: str, expected: str) -> None:
    migrations = tmp_path / "m"
    migrations.mkdir()
    (migrations / "1.sql").write_text(sql)
    with pytest.raises(MigrationError, match=r"m/1\.sql") as caught:
        migrate(migrations, target)
    assert expected in str(caught.value)
    assert "What to do:" in str(caught.value)


@pytest.mark.slow
def test_missing_or_empty_directory(tmp_path: Path, target: Target) -> None:
    with pytest.raises(MigrationError, match="does not exist") as caught:
        migrate(tmp_path / "nope", target)
    assert "relative paths start at pytest's rootdir" in str(caught.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MigrationError, match=r"holds no \.sql files"):
        migrate(tmp_path / "empty", target)
