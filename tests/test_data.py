"""Data factories that read the schema: pg.insert and friends, declared factories, factory_boy's TableFactory."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from pgsandbox.data.values import bounds_from_checks

SCHEMA = """
create type mood as enum ('happy', 'sad', 'ok');
create domain positive_int as integer check (value > 0);
create domain short_code as varchar(8) check (char_length(value) >= 3);
create table country (code char(2) primary key, name text not null unique);
create table author (
  id serial primary key,
  country char(2) not null references country,
  name varchar(20) not null,
  email text not null unique,
  born date not null,
  mood mood not null,
  tags text[] not null,
  ranks integer[] not null,
  rank positive_int not null,
  code short_code not null,
  profile jsonb not null,
  settings json not null,
  uid uuid not null unique,
  active boolean not null,
  score numeric(5,2) not null check (score >= 10.5 and score <= 100),
  ratio real not null,
  big bigint not null unique,
  level smallint not null check (level between 3 and 5),
  kind text not null check (kind in ('a', 'b')),
  seen_at timestamptz not null,
  wall_time timestamp not null,
  at_time time not null,
  wait interval not null,
  ip inet not null,
  period int4range not null,
  blob bytea not null,
  nick text
);
create table book (
  id bigint generated always as identity primary key,
  author_id int not null references author,
  title text not null check (title <> ''),
  pages int not null check (pages > 0),
  slug text generated always as (lower(title)) stored
);
create table review (id serial primary key, book_id bigint not null references book, body text not null,
                     stars int not null check (stars >= 1 and stars <= 5));
create table a (id int primary key, b_id int not null);
create table b (id int primary key, a_id int not null references a);
alter table a add foreign key (b_id) references b;
create table node (id serial primary key, parent_id int references node, name text not null);
create table contact (id serial primary key, email text not null check (email like '%@%'));
create table place (id serial primary key, spot point not null);
create schema billing;
create domain required_note as text not null;
create table billing."Invoice" ("Year" int not null, "No" int not null, primary key ("Year", "No"),
                                "Note" required_note, "Weird % name" text not null);
create table billing.line (id serial primary key, inv_year int not null, inv_no int not null,
                           foreign key (inv_year, inv_no) references billing."Invoice");
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n')
    (pytester.path / "migrations").mkdir()
    (pytester.path / "migrations/1.sql").write_text(SCHEMA)
    return pytester


def run(project: pytest.Pytester, shared_dsn: str, source: str, *args: str) -> pytest.RunResult:
    project.makepyfile(test_rows=textwrap.dedent(source))
    return project.runpytest(f"--pg-dsn={shared_dsn}", "-p", "no:randomly", *args)


EVERY_TYPE = """
    import datetime, decimal, ipaddress, uuid

    import pytest

    @pytest.mark.parametrize("isolation", ["transaction", "database"])
    def test_every_type_and_the_parents(pg_sandbox, isolation, request):
        with pg_sandbox.database(isolation, request.node.nodeid) as pg:
            review = pg.insert("review")
            book = pg.fetchone("select * from book where id = %s", [review["book_id"]])
            author = pg.fetchone("select * from author where id = %s", [book["author_id"]])
            country = pg.fetchone("select * from country where code = %s", [author["country"]])
            assert review["stars"] == 1 and review["body"].startswith("body-")
            assert book["pages"] == 1 and book["slug"] == book["title"].lower()
            assert len(author["name"]) <= 20 and author["email"].startswith("email-")
            assert isinstance(author["born"], datetime.date) and author["mood"] == "happy"
            assert author["tags"][0].startswith("tags-") and isinstance(author["ranks"][0], int)
            assert author["rank"] > 0 and 3 <= len(author["code"]) <= 8
            assert isinstance(author["profile"], dict) and isinstance(author["settings"], dict)
            assert isinstance(author["uid"], uuid.UUID) and isinstance(author["active"], bool)
            assert author["score"] == decimal.Decimal("10.50") and 3 <= author["level"] <= 5
            assert author["kind"] in ("a", "b") and author["ratio"] > 0
            assert author["seen_at"].tzinfo is not None and author["wall_time"].tzinfo is None
            assert isinstance(author["at_time"], datetime.time) and author["wait"] > datetime.timedelta(0)
            assert isinstance(author["ip"], ipaddress.IPv4Address) and author["period"].isempty
            assert isinstance(author["blob"], bytes) and author["nick"] is None  # nullable: left NULL
            assert len(country["code"]) == 2

    def test_many_rows_unique_and_given(pg):
        authors = pg.insert_many("author", 30, nick=lambda i: f"nick{i}", kind=["a", "b"] * 15, level=4)
        for column in ("email", "uid", "big", "country"):
            assert len({a[column] for a in authors}) == 30, column
        assert [a["nick"] for a in authors[:3]] == ["nick0", "nick1", "nick2"]
        assert [a["kind"] for a in authors[:3]] == ["a", "b", "a"] and {a["level"] for a in authors} == {4}
        node = pg.insert("node")
        assert node["parent_id"] is None  # a nullable self-reference: no parent made
        child = pg.insert("node", parent_id=node["id"], name="child")
        assert child["name"] == "child"
        book = pg.insert("book", title="Given", author_id=authors[0]["id"])
        assert book["author_id"] == authors[0]["id"] and book["slug"] == "given"
        assert pg.insert("book", id=99999)["id"] == 99999  # an identity column, given: OVERRIDING SYSTEM VALUE
        assert pg.insert("author", profile={"given": [1, 2]})["profile"] == {"given": [1, 2]}

    def test_composite_keys_other_schemas_and_odd_names(pg, pg_session):
        line = pg.insert("billing.line")
        invoice = pg.fetchone('select * from billing."Invoice"')
        assert (line["inv_year"], line["inv_no"]) == (invoice["Year"], invoice["No"])
        assert invoice["Note"].startswith("Note-")  # a NOT NULL domain makes the column required
        assert invoice["Weird % name"].startswith("Weird % name-")
        row = pg.insert("billing.Invoice", using=pg_session)  # % in a name, through SQLAlchemy's placeholders
        assert row["Weird % name"].startswith("Weird % name-") and row["No"] != invoice["No"]

    def test_a_table_the_test_created(pg):
        pg.execute("create table scratch (id serial primary key, label text not null, n int not null)")
        row = pg.insert("scratch")
        assert row["label"].startswith("label-") and row["n"] == 1

    def test_a_column_the_test_added(pg):
        pg.insert("contact", email="first@example.com")  # the template's catalog is read
        pg.execute("alter table contact add column phone text not null default 'none'")
        pg.execute("alter table contact alter column phone drop default")  # now required
        assert pg.insert("contact", email="second@example.com", phone="555")["phone"] == "555"
        assert pg.insert("contact", email="third@example.com")["phone"].startswith("phone-")  # filled from then on

    def test_the_next_test_has_the_template_table_again(pg):
        assert "phone" not in pg.insert("contact", email="first@example.com")  # the change stayed in its test
"""


@pytest.mark.slow
def test_every_type_parents_unique_columns_and_both_isolations(
    project: pytest.Pytester, shared_dsn: str, cache_dir: Path
) -> None:
    result = run(project, shared_dsn, EVERY_TYPE)
    result.assert_outcomes(passed=7)
    (template,) = set(re.findall(r"migrations template (\w+)", result.stdout.str()))
    cached = [path for path in (cache_dir / "catalogs").glob("pgsandbox_tpl_*.json") if template in path.name]
    assert len(cached) == 1 and '"author"' in cached[0].read_text()  # kept with the template


DETERMINISM = """
    import json, os

    def test_values(pg):
        rows = [pg.insert("author") for _ in range(3)] + [pg.insert("review")]
        for row in rows:
            row.pop("id", None)
            row.pop("book_id", None)
        with open(os.environ["ROWS_FILE"], "a") as out:
            out.write(json.dumps(rows, default=str) + "\\n")
"""


@pytest.mark.slow
def test_the_same_test_makes_the_same_rows_on_every_run(
    project: pytest.Pytester, shared_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows_file = project.path / "rows.jsonl"
    monkeypatch.setenv("ROWS_FILE", str(rows_file))
    for args in ((), (), ("--pg-data-seed=other",)):
        run(project, shared_dsn, DETERMINISM, *args).assert_outcomes(passed=1)
    first, second, other = (json.loads(line) for line in rows_file.read_text().splitlines())
    assert first == second
    assert first != other
    assert first[0]["email"] != first[1]["email"]  # and distinct within the test


ERRORS = """
    import pytest

    def test_cycle(pg):
        pg.insert("a")

    def test_unknown_table(pg):
        pg.insert("nosuch")

    def test_unknown_column(pg):
        pg.insert("book", nosuch=1)

    def test_generated_column(pg):
        pg.insert("book", slug="x")

    def test_unsupported_type(pg):
        pg.insert("place")

    def test_a_check_it_cannot_read(pg):
        pg.insert("contact")

    def test_the_check_satisfied_by_hand(pg):
        assert pg.insert("contact", email="ada@example.com")["email"] == "ada@example.com"

    def test_the_cycle_broken_by_hand(pg):
        pg.execute("alter table a alter constraint a_b_id_fkey deferrable initially deferred")
        a = pg.insert("a", id=1, b_id=1)  # b 1 comes next, before the check at commit
        assert pg.insert("b", id=1, a_id=a["id"])["a_id"] == 1

    def test_a_required_column_the_test_added(pg):
        pg.insert("contact", email="first@example.com")
        pg.execute("alter table contact add column phone text not null default 'none'")
        pg.execute("alter table contact alter column phone drop default")
        pg.insert("contact", email="second@example.com")
"""


@pytest.mark.slow
def test_errors_say_what_could_not_be_filled_and_how_to_pass_it(project: pytest.Pytester, shared_dsn: str) -> None:
    result = run(project, shared_dsn, ERRORS)
    result.assert_outcomes(passed=2, failed=7)
    result.stdout.fnmatch_lines(
        [
            "*CannotFill: pg.insert: public.b.a_id needs a row of public.a, which needs one of public.b in turn "
            "(public.a -> public.b -> public.a): a cycle of required foreign keys pgsandbox cannot break.",
            "*What to do: pass a value for one of them, such as pg.insert('b', a_id=...) with the key of a row you "
            "inserted first.",
            "*UnknownTable: pg.insert: there is no table 'nosuch' in the test's database (searched: public; "
            "tables: a, author, b, billing.Invoice, billing.line, book, contact, country, node, place, review).",
            "*PgSandboxError: pg.insert: table public.book has no column 'nosuch'.",
            "*What to do: use one of id, author_id, title, pages, slug.",
            "*pg.insert: public.book.slug is a generated column: the database computes it.",
            "*CannotFill: pg.insert: public.place.spot is of type point, which pgsandbox cannot make a value of.",
            "*What to do: pass the value yourself: pg.insert('place', spot=...).",
            "*InsertError: pg.insert('contact'): a CHECK constraint refused the row: contact_email_check "
            "CHECK ((email ~~ '%@%'::text)). Values pgsandbox made: email='email-*'; given: none. The server "
            'said: new row for relation "contact" violates check constraint "contact_email_check"',
            "*What to do: pass the values this constraint needs: pg.insert('contact', column=...).",
            "*InsertError: pg.insert('contact'): public.contact.phone is NOT NULL but not in the schema pgsandbox "
            "read from the template: was it added by the test (or its fixtures)? The server said: null value in "
            'column "phone" of relation "contact" violates not-null constraint',
            "*What to do: pass it once: pg.insert('contact', phone=...); pgsandbox then reads public.contact again "
            "and fills it from then on.",
        ]
    )
    result.stdout.fnmatch_lines(
        ["*- pgsandbox: data -*", "pg.insert made * row* of this test from the seed 'test_rows.py::test_*'*"]
    )


ASYNC_AND_OTHERS = """
    import pytest
    from sqlalchemy import text

    @pytest.mark.asyncio
    async def test_asyncpg(pg, pg_asyncpg):
        row = await pg.ainsert("review", stars=4)
        assert row["stars"] == 4
        rows = await pg.ainsert_many("author", 2)
        assert await pg_asyncpg.fetchval("select count(*) from author") == 2 + 1  # one parent of the review

    @pytest.mark.asyncio
    async def test_async_psycopg_and_session(pg, pg_aconn, pg_async_session):
        row = await pg.ainsert("country", code="zz")
        assert row["name"].startswith("name-")
        other = await pg.ainsert("country", using=pg_async_session)
        assert (await pg_async_session.execute(text("select count(*) from country"))).scalar() >= 1
        assert other["code"] != "zz"

    @pytest.mark.asyncio
    async def test_no_async_connection(pg):
        await pg.ainsert("country")

    def test_psycopg2_and_a_session(pg, pg_psycopg2, pg_session):
        row = pg.insert("country", using=pg_psycopg2)
        assert row["code"]
        book = pg.insert("book", using=pg_session)
        assert pg_session.execute(text("select count(*) from book")).scalar() == 1
        assert book["title"].startswith("title-")
"""


@pytest.mark.slow
def test_async_and_other_connections(project: pytest.Pytester, shared_dsn: str) -> None:
    result = run(project, shared_dsn, ASYNC_AND_OTHERS)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*await pg.ainsert() needs the test's async connection, and this test has none open.",
            "*What to do: use pg_asyncpg, pg_aconn or pg_async_session in the test, or pass using=*",
        ]
    )


DECLARED = """
    import factory
    import pytest

    from pgsandbox.data import Factory, lazy, sequence, sub
    from pgsandbox.drivers.factoryboy import TableFactory

    class Countries(Factory):
        table = "country"
        name = sequence(lambda n: f"Country {n}")

    class Authors(Factory):
        table = "author"
        country = sub(Countries)
        name = sequence(lambda n: f"author{n}")
        email = lazy(lambda row: f"{row['name']}@example.com")
        level = 3
        traits = {"senior": {"level": 5, "kind": "b"}}

    class Books(Factory):
        table = "book"
        author_id = sub(Authors, senior=True)

    def test_declared(pg):
        first, second = Authors.create_batch(pg, 2)
        assert (first["name"], first["email"], first["level"]) == ("author1", "author1@example.com", 3)
        assert second["name"] == "author2" and first["country"] != second["country"]
        senior = Authors.create(pg, senior=True, name="given")
        assert (senior["level"], senior["kind"], senior["email"]) == (5, "b", "given@example.com")
        book = Books.create(pg, pages=12)
        author = pg.fetchone("select * from author where id = %s", [book["author_id"]])
        # "given" took no number from the sequence
        assert book["pages"] == 12 and author["level"] == 5 and author["name"] == "author3"

    @pytest.mark.asyncio
    async def test_declared_async(pg, pg_asyncpg):
        book = await Books.acreate(pg)
        assert await pg_asyncpg.fetchval("select level from author where id = $1", book["author_id"]) == 5

    class AuthorRows(TableFactory):
        class Meta:
            model = "author"
        name = factory.Sequence(lambda n: f"fb{n}")

    class BookRows(TableFactory):
        class Meta:
            model = "book"
        class Params:
            author = factory.SubFactory(AuthorRows)
        author_id = factory.SelfAttribute("author.id")
        pages = 7

    def test_factory_boy(pg):
        book = BookRows()
        assert book.pages == 7 and book["title"].startswith("title-")
        assert pg.fetchval("select name from author where id = %s", [book.author_id]).startswith("fb")
        assert len(BookRows.create_batch(3)) == 3
"""


@pytest.mark.slow
def test_declared_factories_and_factory_boy(project: pytest.Pytester, shared_dsn: str) -> None:
    result = run(project, shared_dsn, DECLARED)
    result.assert_outcomes(passed=3)


def test_simple_checks_are_read() -> None:
    """What the catalog gives (pg_get_constraintdef's text) and what pgsandbox understands of it."""
    between = bounds_from_checks(["CHECK (((level >= 3) AND (level <= 5)))"], "level")
    assert (between.low, between.high, between.understood) == (Decimal(3), Decimal(5), True)
    exclusive = bounds_from_checks(["CHECK ((price > (0)::numeric))"], "price")
    assert (exclusive.low, exclusive.low_inclusive) == (Decimal(0), False)
    listed = bounds_from_checks(["CHECK ((kind = ANY (ARRAY['a'::text, 'b''s'::text])))"], "kind")
    assert listed.choices == ["a", "b's"]
    varchar = bounds_from_checks(
        ["CHECK (((status)::text = ANY ((ARRAY['new'::character varying, 'old'::character varying])::text[])))"],
        "status",
    )
    assert varchar.choices == ["new", "old"]
    length = bounds_from_checks(["CHECK ((char_length((VALUE)::text) >= 3))"], "VALUE")
    assert length.min_length == 3
    blank = bounds_from_checks(["CHECK ((title <> ''::text))", "CHECK ((length(title) < 10))"], "title")
    assert (blank.min_length, blank.max_length) == (1, 9)
    unread = bounds_from_checks(["CHECK ((email ~~ '%@%'::text))"], "email")
    assert not unread.understood
    other_column = bounds_from_checks(["CHECK ((a < b))"], "c")
    assert other_column.understood and other_column.low is None


def test_table_factory_without_factory_boy_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from pgsandbox.drivers import factoryboy
    from pgsandbox.errors import MissingExtra

    monkeypatch.setitem(sys.modules, "factory", None)
    monkeypatch.delitem(sys.modules, "pgsandbox.drivers.table_factory", raising=False)
    with pytest.raises(MissingExtra) as caught:
        factoryboy.TableFactory  # noqa: B018
    assert "pgsandbox.drivers.factoryboy.TableFactory needs factory_boy, which is not installed." in str(caught.value)
    assert "pip install 'pytest-pgsandbox[factoryboy]'" in str(caught.value)


@pytest.mark.slow
def test_reading_the_catalog_is_not_taken_for_an_escape(
    project: pytest.Pytester, shared_dsn: str, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold catalog is read through a connection of pgsandbox's own to the session database: the guards
    count it as ours, so no escape check (a fresh clone) runs."""
    from pgsandbox.data import catalog

    monkeypatch.setattr(catalog, "_memory", {})
    for cached in (cache_dir / "catalogs").glob("*.json"):
        cached.unlink()
    result = run(project, shared_dsn, "def test_one(pg):\n    pg.insert('country')\n")
    result.assert_outcomes(passed=1)
    # the session's owned copy of the template and the session database; an escape check would add a third
    result.stdout.fnmatch_lines(["databases: 2 created, 0 dropped, 0 kept", "findings: none"])
