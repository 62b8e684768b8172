"""Database isolation recycles a used clone (isolation/recycle.py): the next test must see the template exactly,
whatever the previous one did. A randomized run, a project of the kind that gains (tests writing a few rows
through a pool of their own), and the rules on synthetic counters."""

from __future__ import annotations

import os
import random
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

SCHEMA = """\
create table parent (id serial primary key, name text not null);
create table child (id serial primary key, parent_id int references parent(id), note text);
create table seeded (id bigserial primary key, name text unique not null, value int, blob text);
insert into seeded (name, value, blob) select 'n' || g, g, repeat('x', 10) from generate_series(1, 40) g;
create table ident (id int generated always as identity primary key, v int);
create table audited (id serial primary key, v int);
create table audit_log (id serial primary key, what text);
create function log_audit() returns trigger language plpgsql as $$
begin insert into audit_log (what) values (tg_op || ' ' || new.v); return new; end $$;
create trigger audited_log after insert on audited for each row execute function log_audit();
create table guarded (id serial primary key, v int);
insert into guarded (v) values (1), (2);
create function refuse_delete() returns trigger language plpgsql as $$
begin raise exception 'no deletes here'; end $$;
create trigger guarded_no_delete before delete on guarded for each row execute function refuse_delete();
create table measures (at int not null, v int) partition by range (at);
create table measures_low partition of measures for values from (0) to (100);
create table measures_high partition of measures for values from (100) to (200);
insert into measures values (1, 1), (150, 2);
create sequence standalone;
create view parent_names as select name from parent;
"""

# What a test may see of its database: catalog objects, every table's rows, every sequence's state. Not what
# PostgreSQL keeps for itself (file numbers, planner statistics, log_cnt of a sequence).
CATALOG_QUERY = """\
SELECT md5(string_agg(line, E'\\n' ORDER BY line)) FROM (
  SELECT format('class %s.%s %s %s %s %s', n.nspname, c.relname, c.relkind, c.relpersistence, c.relacl,
                c.reloptions) AS line
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
  UNION ALL
  SELECT format('column %s.%s %s %s %s %s', c.oid::regclass, a.attname, a.atttypid::regtype, a.attnotnull,
                pg_get_expr(d.adbin, d.adrelid), a.attidentity)
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
  WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
    AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT format('constraint %s %s %s', conrelid::regclass, conname, pg_get_constraintdef(oid)) FROM pg_constraint
  WHERE connamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
  UNION ALL
  SELECT format('index %s', pg_get_indexdef(indexrelid)) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
  WHERE c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace, 'pg_toast'::regnamespace)
  UNION ALL
  SELECT format('function %s %s', oid::regprocedure, md5(prosrc)) FROM pg_proc
  WHERE pronamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
  UNION ALL
  SELECT format('trigger %s %s', tgname, pg_get_triggerdef(oid)) FROM pg_trigger WHERE NOT tgisinternal
  UNION ALL
  SELECT format('namespace %s %s', nspname, nspacl) FROM pg_namespace
  UNION ALL
  SELECT format('type %s %s', oid::regtype, typtype) FROM pg_type
  WHERE typnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace, 'pg_toast'::regnamespace)
  UNION ALL
  SELECT format('sequence %s %s %s %s %s', seqrelid::regclass, seqstart, seqincrement, seqmax, seqcycle)
  FROM pg_sequence
  UNION ALL
  SELECT format('comment %s %s %s', classoid, objoid, description) FROM pg_description WHERE objoid >= 16384
  UNION ALL
  SELECT format('large object %s', oid) FROM pg_largeobject_metadata
  UNION ALL
  SELECT format('rule %s %s', rulename, md5(pg_get_ruledef(oid))) FROM pg_rewrite WHERE ev_class >= 16384
  UNION ALL
  SELECT format('extension %s %s', extname, extversion) FROM pg_extension
  UNION ALL
  SELECT format('policy %s %s', polrelid::regclass, polname) FROM pg_policy
  UNION ALL
  SELECT format('default acl %s', defaclacl) FROM pg_default_acl
  UNION ALL
  SELECT format('database %s %s %s', d.datconnlimit, d.datacl,
                (SELECT array_agg(setconfig) FROM pg_db_role_setting WHERE setdatabase = d.oid))
  FROM pg_database d WHERE d.datname = current_database()
) lines"""


def fingerprint(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """The database as a test sees it: one entry for the catalogs, one per table's rows (in no order), one per
    sequence, one for the large objects. Two round trips: the relations, then everything."""
    relations = conn.execute(
        "SELECT c.oid::regclass::text, c.relkind FROM pg_class c WHERE c.relkind IN ('r', 'S') "
        "AND c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace, "
        "'pg_toast'::regnamespace) AND c.relpersistence <> 't'"
    ).fetchall()
    parts = [
        sql.SQL("SELECT 'catalog', ({})").format(sql.SQL(CATALOG_QUERY)),
        sql.SQL("SELECT 'large objects', string_agg(md5(lo_get(oid)), ',' ORDER BY oid) FROM pg_largeobject_metadata"),
    ]
    for name, kind in relations:
        key = sql.Literal(f"{'table' if kind == 'r' else 'sequence'} {name}")
        if kind == "r":
            query = "SELECT {}, count(*) || md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM ONLY {} t"
        else:
            query = "SELECT {}, last_value || ' ' || is_called FROM {}"
        parts.append(sql.SQL(query).format(key, sql.SQL(name)))
    found = {str(key): str(value) for key, value in conn.execute(sql.SQL(" UNION ALL ").join(parts))}
    conn.rollback()
    return found


def differences(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [
        f"{key}: {before.get(key)} -> {after.get(key)}"
        for key in sorted({*before, *after})
        if before.get(key) != after.get(key)
    ]


# -- what a random test does: each through a connection of its own (an app's pool) --------------------------

Action = Callable[[psycopg.Connection[Any], random.Random], None]


def insert_parents_and_children(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    for _ in range(rng.randint(1, 3)):
        (pid,) = conn.execute("insert into parent (name) values ('p') returning id").fetchone()  # type: ignore[misc]
        conn.execute("insert into child (parent_id, note) values (%s, 'c')", [pid])
    conn.commit()


def insert_seeded(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    big = "y" * rng.choice([10, 5000])  # 5000 compressible bytes stay inline; random ones go to TOAST
    if rng.random() < 0.5:
        big = "".join(rng.choice("abcdefghij") for _ in range(3000))
    conn.execute("insert into seeded (name, value, blob) values (%s, 1, %s)", [f"new{rng.random()}", big])
    conn.commit()


def update_seeded(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    conn.execute("update seeded set value = value + 1 where id = %s", [rng.randint(1, 40)])
    conn.commit()


def delete_seeded(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    conn.execute("delete from seeded where id = %s", [rng.randint(1, 40)])
    conn.commit()


def update_parent_inserted(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    conn.execute("insert into parent (name) values ('u')")
    conn.execute("update parent set name = 'v'")
    conn.execute("delete from parent where name = 'nothing'")
    conn.commit()


def statements(name: str, *queries: str, autocommit: bool = False) -> Action:
    """An action that runs ``queries`` and commits."""

    def action(conn: psycopg.Connection[Any], rng: random.Random) -> None:
        conn.autocommit = autocommit
        for query in queries:
            conn.execute(query)
        if not autocommit:
            conn.commit()

    action.__name__ = name
    return action


# what leaves the rows alone but changes the catalogs, the database, or files: each needs a fresh clone
OBJECTS = [
    statements("truncate_seeded", "truncate seeded"),
    statements("truncate_children", "truncate parent, child"),
    statements("alter_table", "alter table seeded add column extra int default 7"),
    statements("create_table", "create table scratch (x int)", "insert into scratch values (1)"),
    statements("create_sequence", "create sequence scratch_seq", "select nextval('scratch_seq')"),
    statements("create_function", "create function answer() returns int language sql as 'select 42'"),
    statements("create_index", "create index seeded_value on seeded (value)"),
    statements("comment", "comment on table parent is 'touched'"),
    statements("large_object", "select lo_from_bytea(0, 'blob')"),
    statements("temp_table", "create temp table scratch_tmp (x int)", "insert into scratch_tmp values (1)"),
    statements("drop_view", "drop view parent_names"),
    statements("grant", "grant select on seeded to public"),
    statements("vacuum_full", "vacuum full seeded", autocommit=True),
]


def advance_sequences(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    conn.autocommit = True
    conn.execute("select nextval('standalone')")
    if rng.random() < 0.5:
        conn.execute("select setval('seeded_id_seq', 1000, false)")
    if rng.random() < 0.5:
        conn.execute("insert into ident (v) values (1)")
        conn.execute("delete from ident")


def rolled_back(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    conn.execute("insert into parent (name) values ('gone')")
    conn.execute("insert into seeded (name, value) values ('gone', 1)")
    conn.rollback()


def triggered(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    conn.execute("insert into audited (v) values (%s)", [rng.randint(1, 9)])
    if rng.random() < 0.5:
        conn.execute("insert into guarded (v) values (3)")
    conn.commit()


def partitions(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    conn.execute("insert into measures values (%s, 3)", [rng.choice([5, 120])])
    conn.commit()


def database_setting(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    conn.autocommit = True
    conn.execute(sql.SQL("alter database {} set work_mem = '7MB'").format(sql.Identifier(conn.info.dbname)))


def maintenance(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    conn.autocommit = True
    conn.execute(rng.choice(["vacuum seeded", "analyze parent", "vacuum (freeze) seeded"]))


def insert_then_freeze(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    """A frozen row's xmin reads as the oldest of all: it must not pass for a template row."""
    conn.execute("insert into seeded (name, value) values ('frozen', 1)")
    conn.commit()
    conn.autocommit = True
    conn.execute("vacuum (freeze) seeded")


def read_only(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    conn.execute("select count(*) from seeded").fetchone()
    conn.rollback()


ACTIONS: list[Action] = [
    insert_parents_and_children,
    insert_seeded,
    update_seeded,
    delete_seeded,
    update_parent_inserted,
    *OBJECTS,
    advance_sequences,
    rolled_back,
    triggered,
    partitions,
    database_setting,
    maintenance,
    insert_then_freeze,
    read_only,
]
# the kinds recycling undoes come up more often: most tests of a real suite only write rows
WEIGHTS = [6, 6, 1, 1, 2, *[1] * len(OBJECTS), 4, 3, 3, 2, 1, 1, 1, 4]


@pytest.mark.slow
def test_the_next_test_sees_the_template_exactly_whatever_the_previous_did(tmp_path: Path, shared_dsn: str) -> None:
    from pgsandbox import Sandbox, Settings

    seed = int(os.environ.get("PGSANDBOX_RECYCLE_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    (tmp_path / "m").mkdir()
    (tmp_path / "m/1.sql").write_text(f"-- {tmp_path.name}\n{SCHEMA}")
    history: list[str] = []
    solo = rng.sample(ACTIONS, len(ACTIONS))
    with Sandbox.start(Settings(dsn=shared_dsn, migrations=("sql:m",)), root=tmp_path) as sandbox:
        template: dict[str, str] | None = None
        for n in range(len(ACTIONS) + 8):
            db = sandbox.open("database", f"t.py::test_{n}")
            with psycopg.connect(db.dsn) as conn:  # the app's own connection
                seen = fingerprint(conn)
                template = template or seen
                assert not differences(template, seen), (
                    f"seed {seed}: test {n} did not get the template after {history[-3:]}:\n"
                    + "\n".join(differences(template, seen))
                )
                # every action alone once (in a random order), then random mixes
                chosen = [solo[n]] if n < len(solo) else rng.choices(ACTIONS, WEIGHTS, k=rng.choice([0, 1, 2, 3]))
                chosen = list(dict.fromkeys(chosen))  # twice in one test, `create sequence` fails on its own object
                history.append(f"test {n} in {db.name[-4:]}: {[action.__name__ for action in chosen]}")
                for action in chosen:
                    conn.autocommit = False
                    try:
                        action(conn, rng)
                    except psycopg.errors.RaiseException:  # guarded's trigger: the test itself failed
                        conn.rollback()
            if rng.random() < 0.1:  # an app pool left open, in the middle of a transaction: terminated
                leftover = psycopg.connect(db.dsn)
                leftover.execute("insert into parent (name) values ('left')")
                leftover.commit()
                leftover.execute("insert into parent (name) values ('open')")
                history[-1] += " + a connection left open"
            sandbox.close(db)
        clones = sandbox._clones
        assert clones is not None
        recycled, created, replaced = clones.recycled, clones.created, list(clones.pool.replaced)
    print(f"seed {seed}: {recycled} recycled, {created} created", *history, *replaced, sep="\n")
    # both ways were taken: recycled clones and fresh ones after what recycling does not undo
    assert recycled >= 10, f"seed {seed}: {recycled} recycled, {created} created\n" + "\n".join(history)
    assert created >= 5, f"seed {seed}: {recycled} recycled, {created} created\n" + "\n".join(history)


@pytest.mark.slow
def test_an_app_writing_through_its_own_pool_gets_recycled_clones(pytester: pytest.Pytester, shared_dsn: str) -> None:
    """The shape that gains: each test makes an SQLAlchemy engine (a pool) from its database's URL and writes a
    few rows; the next test sees none of them, ids start again at 1, and the clones come round again."""
    pytester.makefile(
        ".toml", pyproject='[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\npg_isolation = "database"\n'
    )
    (pytester.path / "migrations").mkdir()
    (pytester.path / "migrations/1.sql").write_text(
        "create table users (id serial primary key, name text unique not null);\n"
        "create table posts (id serial primary key, user_id int not null references users(id), title text);\n"
        "create table plans (id serial primary key, name text unique not null);\n"
        "insert into plans (name) values ('free'), ('pro');\n"
    )
    pytester.makepyfile(
        test_app=textwrap.dedent(
            """
            import pytest
            import sqlalchemy as sa

            NAMES = []

            @pytest.mark.parametrize("n", range(8))
            def test_signup(pg, n):
                NAMES.append(pg.name)
                engine = sa.create_engine(pg.url("psycopg"), pool_size=2)
                with engine.begin() as conn:
                    assert conn.execute(sa.text("select count(*) from users")).scalar() == 0
                    assert conn.execute(sa.text("select count(*) from plans")).scalar() == 2
                    uid = conn.execute(sa.text("insert into users (name) values ('ada') returning id")).scalar()
                    assert uid == 1
                    conn.execute(sa.text("insert into posts (user_id, title) values (:u, 'hi')"), {"u": uid})
                    conn.execute(sa.text("insert into plans (name) values (:p)"), {"p": f"custom{n}"})
                engine.dispose()

            def test_clones_came_round_again():
                assert len(set(NAMES)) < len(NAMES), NAMES
            """
        )
    )
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "-p", "no:randomly", "-W", "ignore::pytest.PytestWarning")
    result.assert_outcomes(passed=9)


@pytest.mark.slow
def test_recycling_can_be_switched_off(tmp_path: Path, shared_dsn: str) -> None:
    from pgsandbox import Sandbox, Settings

    (tmp_path / "m").mkdir()
    (tmp_path / "m/1.sql").write_text(f"create table t (x int) -- {tmp_path.name}")
    with Sandbox.start(Settings(dsn=shared_dsn, migrations=("sql:m",), recycle_clones="off"), root=tmp_path) as sandbox:
        names = set()
        for n in range(4):
            with sandbox.database("database", f"test_{n}") as db:
                db.execute("insert into t values (1)")
                db.connection.commit()
                names.add(db.name)
        assert sandbox._clones is not None
        assert (sandbox._clones.recycled, len(names)) == (0, 4)


# -- the rules, on synthetic counters ------------------------------------------------------------------------


def _pristine() -> Any:
    from pgsandbox.isolation.recycle import Pristine, Table

    tables = {
        10: Table("public.parent", empty=True, truncatable=True, deletable=True, toast=0),
        11: Table("public.child", empty=True, truncatable=True, deletable=True, toast=0),
        12: Table("public.seeded", empty=False, truncatable=True, deletable=True, toast=13),
        14: Table("public.guarded", empty=False, truncatable=True, deletable=False, toast=0),
        15: Table("public.lookup", empty=False, truncatable=True, deletable=True, toast=0),
        16: Table("public.kinds", empty=True, truncatable=True, deletable=True, toast=0),
    }
    # child references parent, lookup (with rows) references kinds (empty)
    return Pristine(tables, {10: {11}, 16: {15}}, {20: ("public.s", 1, False)}, {13: 12})


def _state(relations: dict[int, tuple[bool, str, int, int, int]], **facts: Any) -> Any:
    from pgsandbox.isolation.recycle import State

    writes = facts.get("writes", sum(sum(r[2:5]) for r in relations.values()))
    return State(writes, facts.get("stats_reset", ""), facts.get("row_xmin", "5"), "", "label", "100", relations)


def test_rows_written_are_undone_by_truncate_or_delete_and_sequences_by_setval() -> None:
    from pgsandbox.isolation.recycle import plan_restore

    pristine = _pristine()
    before = _state({12: (False, "r", 1, 0, 0)})
    after = _state({12: (False, "r", 3, 0, 0), 13: (False, "t", 2, 0, 0), 10: (False, "r", 1, 1, 1)})
    plan = plan_restore(pristine, before, after, {20: (5, True)})
    assert plan.truncate == [10, 11]  # child references parent: emptied with it
    assert plan.delete_new == [12]
    assert plan.setval == [20]
    nothing = plan_restore(pristine, before, before, {20: (1, False)})
    assert nothing.empty


@pytest.mark.parametrize(
    ("after", "why"),
    [
        ({12: (False, "r", 1, 0, 0), 1259: (True, "r", 0, 1, 0)}, "a catalog changed"),
        ({12: (False, "r", 1, 1, 0)}, "some were updated or deleted"),
        ({14: (False, "r", 1, 0, 0)}, "has a DELETE trigger"),
        ({16: (False, "r", 1, 0, 0)}, "references a table to empty"),
        ({99: (False, "r", 1, 0, 0)}, "is not a table of the template"),
        ({}, "are gone"),
        ({12: (False, "r", 0, 0, 0)}, "went back"),
    ],
)
def test_what_recycling_does_not_undo_means_a_fresh_clone(after: dict[int, Any], why: str) -> None:
    from pgsandbox.isolation.recycle import NotRecyclable, plan_restore

    pristine = _pristine()
    before = _state({12: (False, "r", 1, 0, 0)} if why in ("went back", "are gone") else {})
    with pytest.raises(NotRecyclable, match=why):
        plan_restore(pristine, before, _state(after), {20: (1, False)})


def test_the_database_itself_changed_means_a_fresh_clone() -> None:
    from pgsandbox.isolation.recycle import NotRecyclable, plan_restore

    pristine = _pristine()
    for facts in ({"stats_reset": "2026-11-30"}, {"row_xmin": "6"}):
        with pytest.raises(NotRecyclable, match="the database's own row"):
            plan_restore(pristine, _state({}), _state({}, **facts), {20: (1, False)})
    with pytest.raises(NotRecyclable, match="do not add up"):
        plan_restore(pristine, _state({}), _state({}, writes=3), {20: (1, False)})


def test_deletes_run_from_the_referencing_table_to_the_referenced() -> None:
    from pgsandbox.isolation.recycle import Pristine, Table, _referencing_first

    table = Table("t", empty=False, truncatable=True, deletable=True, toast=0)
    pristine = Pristine({1: table, 2: table, 3: table}, {1: {2}, 2: {3}}, {})  # 3 -> 2 -> 1
    assert _referencing_first(pristine, [1, 2, 3]) == [3, 2, 1]
    assert _referencing_first(pristine, [1, 3]) == [1, 3]
