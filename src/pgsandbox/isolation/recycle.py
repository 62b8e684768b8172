"""Recycling a used clone instead of dropping it: what the test changed is read from the server's statistics
counters, undone when it is rows and sequences only, and the clone is given to the next test.

Creating a clone costs about 17 ms of server work and dropping it 8 ms; a test of the common kind writes a few
rows. After the test's connections are gone (a backend flushes its counters as it exits, before it leaves
``pg_stat_activity``), the counters of the clone say which relations were written to since it was handed out:

- a relation of ``pg_catalog`` written to (DDL, TRUNCATE's new file, large objects, a temporary table, ANALYZE),
  the database's own row or settings changed, its statistics reset, or any figure that does not add up: the
  clone is dropped (a fresh one replaces it);
- a table empty in the template: ``TRUNCATE`` (with the empty tables that reference it), back to an empty file
  as in a fresh clone;
- a table with rows in the template, only inserted into: the rows whose ``xmin`` is newer than the hand-over
  are deleted; updates or deletes there: dropped;
- sequences are read (``nextval`` moves no counter) and set back with ``setval``.

The check and the restore run on the connection the next test is given (the tests' role owns every object of
a clone; one connect instead of two), in autocommit, under ``lock_timeout``; a table with a user trigger that
a TRUNCATE or DELETE would fire, a DELETE rule or forced row-level security is not restored but replaced. Any
error, and anything this module does not know, means a fresh clone. Recycling needs PostgreSQL 15+ (counters
in shared memory, flushed when a backend exits, ``pg_stat_force_next_flush``), ``track_counts`` on, and a
superuser admin to read what a fresh clone holds once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pgsandbox.server.tags import INTERNAL

LOCK_TIMEOUT = "200ms"  # an autovacuum in TRUNCATE's way: a fresh clone rather than a wait

NEXT_XID = "pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
# The database's own facts, read from anywhere: its counters, its row, settings and comment, the next xid.
DATABASE_FACTS = """\
  pg_stat_get_db_tuples_inserted(d.oid) + pg_stat_get_db_tuples_updated(d.oid)
    + pg_stat_get_db_tuples_deleted(d.oid),
  coalesce(pg_stat_get_db_stat_reset_time(d.oid)::text, ''),
  d.xmin::text,
  coalesce((SELECT string_agg(s.setrole::text || ':' || array_to_string(s.setconfig, ','), ';' ORDER BY s.setrole)
            FROM pg_db_role_setting s WHERE s.setdatabase = d.oid), ''),
  coalesce(shobj_description(d.oid, 'pg_database'), ''),
  mod(pg_snapshot_xmax(pg_current_snapshot())::text::bigint, 4294967296)::text"""
FRESH_QUERY = f"SELECT {DATABASE_FACTS} FROM pg_database d WHERE d.datname = %s"
# ... and, on a connection to it, the counters of the relations written to: tables, TOAST tables,
# materialized views, of every schema (a fresh clone has none).
RELATIONS_QUERY = (
    INTERNAL
    + """\
SELECT coalesce(json_agg(json_build_array(
    c.oid, c.relnamespace = 'pg_catalog'::regnamespace, c.relkind,
    pg_stat_get_tuples_inserted(c.oid), pg_stat_get_tuples_updated(c.oid), pg_stat_get_tuples_deleted(c.oid)))
  FILTER (WHERE pg_stat_get_tuples_inserted(c.oid) + pg_stat_get_tuples_updated(c.oid)
                + pg_stat_get_tuples_deleted(c.oid) > 0), '[]')
FROM pg_class c WHERE c.relkind IN ('r', 't', 'm') AND NOT c.relisshared"""
)

# What a fresh clone holds, read once: the user tables (empty or not), who references whom, the sequences.
PRISTINE_TABLES = """\
SELECT c.oid, format('%I.%I', n.nspname, c.relname), pg_relation_size(c.oid) = 0,
  NOT EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal AND t.tgenabled <> 'D'
              AND t.tgtype & 32 <> 0),
  NOT c.relforcerowsecurity
  AND NOT EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal AND t.tgenabled <> 'D'
                  AND t.tgtype & 8 <> 0)
  AND NOT EXISTS (SELECT FROM pg_rewrite r WHERE r.ev_class = c.oid AND r.ev_type = '4'),
  c.reltoastrelid
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND n.nspname <> 'pg_catalog' AND n.nspname <> 'information_schema'
  AND c.relpersistence <> 't'"""
PRISTINE_REFERENCES = "SELECT DISTINCT conrelid, confrelid FROM pg_constraint WHERE contype = 'f'"
PRISTINE_SEQUENCES = """\
SELECT c.oid, format('%I.%I', n.nspname, c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'S' AND c.relpersistence <> 't' ORDER BY c.oid"""


@dataclass(frozen=True)
class Table:
    name: str  # schema-qualified, quoted
    empty: bool  # no data file in the template: TRUNCATE gives it back exactly
    truncatable: bool  # no user trigger ON TRUNCATE
    deletable: bool  # no user trigger ON DELETE, no DELETE rule, no forced row-level security
    toast: int  # its TOAST table's oid (0: none)


@dataclass(frozen=True)
class Pristine:
    """What every clone of the template holds (a clone keeps the template's oids)."""

    tables: dict[int, Table]
    referenced_by: dict[int, set[int]]  # table -> the tables with a foreign key to it
    sequences: dict[int, tuple[str, int, bool]]  # oid -> (name, last_value, is_called)
    toast_owner: dict[int, int] = field(default_factory=dict)

    def sequence_query(self) -> sql.Composed | None:
        """One query reading every sequence's state (``nextval`` moves no counter, so they are read)."""
        if not self.sequences:
            return None
        parts = [
            sql.SQL("SELECT {}::oid, last_value, is_called FROM {}").format(sql.Literal(oid), sql.SQL(name))
            for oid, (name, _, _) in self.sequences.items()
        ]
        return sql.SQL(" UNION ALL ").join(parts)


@dataclass(frozen=True)
class State:
    """A clone's counters and database-level facts at one moment."""

    writes: int  # the database's inserted + updated + deleted rows, over all its relations
    stats_reset: str
    row_xmin: str  # its pg_database row
    settings: str  # its pg_db_role_setting rows
    comment: str
    next_xid: str  # rows with an xmin from here on were written after this moment
    relations: dict[int, tuple[bool, str, int, int, int]]  # the written-to: (catalog, kind, ins, upd, del)

    def database_changes(self, other: State) -> list[str]:
        """What differs in the database's own facts (its statistics' reset, row, settings, comment)."""
        fields = ("stats_reset", "row_xmin", "settings", "comment")
        return [
            f"{name} {getattr(other, name)!r} -> {getattr(self, name)!r}"
            for name in fields
            if getattr(self, name) != getattr(other, name)
        ]


@dataclass
class Plan:
    truncate: list[int] = field(default_factory=list)
    delete_new: list[int] = field(default_factory=list)  # tables with template rows that got inserts only
    setval: list[int] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.truncate or self.delete_new or self.setval)


class NotRecyclable(Exception):
    """The clone holds something this module does not undo: drop it. The message says what (for tests)."""


def read_pristine(conn: psycopg.Connection[Any]) -> Pristine:
    """What a clone nobody used holds (``conn``: the admin, on such a clone)."""
    tables: dict[int, Table] = {}
    toast_owner: dict[int, int] = {}
    for oid, name, empty, truncatable, deletable, toast in conn.execute(PRISTINE_TABLES):
        tables[int(oid)] = Table(str(name), bool(empty), bool(truncatable), bool(deletable), int(toast))
        if toast:
            toast_owner[int(toast)] = int(oid)
    referenced_by: dict[int, set[int]] = {}
    for referencing, referenced in conn.execute(PRISTINE_REFERENCES):
        referenced_by.setdefault(int(referenced), set()).add(int(referencing))
    names = {int(oid): str(name) for oid, name in conn.execute(PRISTINE_SEQUENCES)}
    pristine = Pristine(tables, referenced_by, {oid: (name, 0, False) for oid, name in names.items()}, toast_owner)
    values = read_sequences(conn, pristine)
    sequences = {oid: (names[oid], value, called) for oid, (value, called) in values.items()}
    return Pristine(tables, referenced_by, sequences, toast_owner)


def read_state(
    conn: psycopg.Connection[Any], admin: psycopg.Connection[Any], pristine: Pristine | None = None
) -> tuple[State, dict[int, tuple[int, bool]]]:
    """The clone's state and, with ``pristine``, its sequences' values (``conn``: on the clone, one round trip);
    the database's own facts come from ``admin`` (a warm connection elsewhere: a new backend reading them pays
    for loading the shared catalogs' caches)."""
    facts = admin.execute(FRESH_QUERY, [conn.info.dbname]).fetchone()
    if facts is None:
        raise NotRecyclable("the database's row is gone")
    query: sql.SQL | sql.Composed = sql.SQL(RELATIONS_QUERY)  # INTERNAL: the statement log's reader skips it
    sequences = pristine.sequence_query() if pristine is not None else None
    if sequences is not None:
        query = sql.SQL("; ").join([query, sequences])
    cursor = conn.execute(query)
    row = cursor.fetchone()
    values: dict[int, tuple[int, bool]] = {}
    if sequences is not None:
        cursor.nextset()
        values = {int(oid): (int(value), bool(called)) for oid, value, called in cursor}
    relations = {
        int(oid): (bool(catalog), str(kind), int(ins), int(upd), int(dele))
        for oid, catalog, kind, ins, upd, dele in (row[0] if row else [])
    }
    return _state(facts, relations), values


def _state(facts: Sequence[Any], relations: dict[int, tuple[bool, str, int, int, int]]) -> State:
    return State(int(facts[0]), str(facts[1]), str(facts[2]), str(facts[3]), str(facts[4]), str(facts[5]), relations)


def fresh_state(admin: psycopg.Connection[Any], name: str) -> State:
    """The state of clone ``name``, just made (``admin``: a connection elsewhere): its relations have no counters
    yet (a new database's statistics start empty)."""
    facts = admin.execute(FRESH_QUERY, [name]).fetchone()
    if facts is None:
        raise NotRecyclable(f"database {name} is gone")
    return _state(facts, {})


def read_sequences(conn: psycopg.Connection[Any], pristine: Pristine) -> dict[int, tuple[int, bool]]:
    query = pristine.sequence_query()
    if query is None:
        return {}
    return {int(oid): (int(value), bool(called)) for oid, value, called in conn.execute(query)}


def plan_restore(pristine: Pristine, before: State, after: State, sequences: Mapping[int, tuple[int, bool]]) -> Plan:
    """What gives the clone back its state at hand-over (``before``), seen ``after`` the test; raises
    :class:`NotRecyclable` when only a fresh clone will do."""
    changes = after.database_changes(before)
    if changes:
        raise NotRecyclable(f"the database's own row, settings, comment or statistics changed: {'; '.join(changes)}")
    changed: dict[int, tuple[int, int, int]] = {}  # table (a TOAST table counts for its owner) -> ins, upd, del
    total = 0
    for oid, (catalog, kind, ins, upd, dele) in after.relations.items():
        was = before.relations.get(oid, (catalog, kind, 0, 0, 0))
        delta = (ins - was[2], upd - was[3], dele - was[4])
        if min(delta) < 0:
            raise NotRecyclable(f"the counters of relation {oid} went back")
        if not any(delta):
            continue
        table = pristine.toast_owner.get(oid, oid)
        total += sum(delta)
        if catalog:
            raise NotRecyclable(f"a catalog changed (relation {oid})")
        if kind == "m":
            raise NotRecyclable(f"materialized view {oid} was written to")
        if table not in pristine.tables:
            raise NotRecyclable(f"relation {oid} is not a table of the template")
        previous = changed.get(table, (0, 0, 0))
        changed[table] = (previous[0] + delta[0], previous[1] + delta[1], previous[2] + delta[2])
    for oid, counts in before.relations.items():
        if oid not in after.relations and any(counts[2:]):
            raise NotRecyclable(f"the counters of relation {oid} are gone")
    if total != after.writes - before.writes:
        raise NotRecyclable("the database's counters and its relations' do not add up")
    plan = Plan()
    truncate: set[int] = set()
    for oid, (_ins, upd, dele) in changed.items():
        written = pristine.tables[oid]
        if written.empty:
            truncate.add(oid)
        elif upd or dele:
            raise NotRecyclable(f"{written.name} had rows in the template and some were updated or deleted")
        elif not written.deletable:
            raise NotRecyclable(f"{written.name} has a DELETE trigger or rule, or forced row-level security")
        else:
            plan.delete_new.append(oid)
    plan.truncate = sorted(_referencing_closure(pristine, truncate))
    for oid in plan.truncate:
        if not pristine.tables[oid].truncatable:
            raise NotRecyclable(f"{pristine.tables[oid].name} has a TRUNCATE trigger")
    plan.delete_new = _referencing_first(pristine, plan.delete_new)
    if set(sequences) != set(pristine.sequences):
        raise NotRecyclable("the sequences are not the template's")
    plan.setval = sorted(oid for oid, value in sequences.items() if pristine.sequences[oid][1:] != value)
    return plan


def _referencing_closure(pristine: Pristine, tables: Iterable[int]) -> set[int]:
    """``tables`` and every table that references them, directly or not: TRUNCATE wants them together. Each
    must be empty in the template (an unchanged one is empty still)."""
    found = set(tables)
    todo = list(found)
    while todo:
        for referencing in pristine.referenced_by.get(todo.pop(), ()):
            if referencing in found:
                continue
            table = pristine.tables.get(referencing)
            if table is None or not table.empty:
                raise NotRecyclable(f"table {referencing} references a table to empty and has rows of its own")
            found.add(referencing)
            todo.append(referencing)
    return found


def _referencing_first(pristine: Pristine, tables: list[int]) -> list[int]:
    """``tables`` ordered so that a table comes before those it references (their new rows may be what the
    test's new rows point at: deleting a parent first would break the foreign key). A cycle: as it comes (the
    DELETE may then fail, and the clone is replaced)."""
    chosen = set(tables)
    references: dict[int, set[int]] = {oid: set() for oid in tables}
    for referenced, referencing in pristine.referenced_by.items():
        if referenced in chosen:
            for oid in referencing & chosen - {referenced}:
                references[oid].add(referenced)
    ordered: list[int] = []
    placed: set[int] = set()
    while len(ordered) < len(tables):
        # next: a table no remaining table references
        ready = sorted(
            oid for oid in tables if oid not in placed and not any(oid in references[o] for o in chosen - placed)
        )
        if not ready:
            ordered += sorted(chosen - placed)
            break
        ordered += ready
        placed |= set(ready)
    return ordered


def _since(xid: sql.Composable, start: str) -> sql.Composed:
    """How many xids ``xid`` (a 32-bit one) comes after ``start``, modulo 2^32."""
    return sql.SQL("mod({} - {} + 4294967296, 4294967296)").format(xid, sql.Literal(int(start)))


def restore(conn: psycopg.Connection[Any], pristine: Pristine, plan: Plan, before: State) -> None:
    """Carry out ``plan`` in one transaction, and have the counters flushed when it ends: one round trip
    (``conn``: the tests' role on the clone, autocommit). Raises :class:`psycopg.Error` when anything fails."""
    if plan.empty:
        return
    tables = pristine.tables
    statements: list[sql.Composable] = [
        sql.SQL(INTERNAL + "BEGIN"),
        sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)),
    ]
    if plan.truncate:
        statements.append(
            sql.SQL("TRUNCATE ONLY {}").format(sql.SQL(", ").join(sql.SQL(tables[oid].name) for oid in plan.truncate))
        )
    for oid in plan.delete_new:
        # rows written since the hand-over: their xmin is between its next xid and now's, modulo 2^32 (VACUUM
        # FREEZE keeps the xmin; a template row would need to be 4 billion transactions old to pass for new)
        statements.append(
            sql.SQL("DELETE FROM ONLY {} WHERE {} < {}").format(
                sql.SQL(tables[oid].name),
                _since(sql.SQL("xmin::text::bigint"), before.next_xid),
                _since(sql.SQL(f"mod({NEXT_XID}, 4294967296)"), before.next_xid),
            )
        )
    for oid in plan.setval:
        _name, value, called = pristine.sequences[oid]
        statements.append(
            sql.SQL("SELECT setval({}::oid, {}, {})").format(sql.Literal(oid), sql.Literal(value), sql.Literal(called))
        )
    statements += [sql.SQL("COMMIT"), sql.SQL("SELECT pg_stat_force_next_flush()")]
    conn.execute(sql.SQL("; ").join(statements))
