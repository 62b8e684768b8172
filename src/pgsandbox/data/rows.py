"""``pg.insert(table, **values)``: one row with the values given, every other required column made up, and a
parent row for each required foreign key left out (made the same way, recursively).

The work is written once as a generator of statements, each answered with the row it returned; a sync and an
async runner drive it on any connection: psycopg (sync and async), psycopg2, asyncpg, SQLAlchemy sessions and
connections (sync and async).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pgsandbox.data.catalog import Catalog, Table, UnknownTable, quoted
from pgsandbox.data.values import CannotFill, Maker
from pgsandbox.errors import PgSandboxError, causes, sqlstate

Step = tuple[str, list[Any]]  # SQL with %s placeholders, and its parameters
Steps = Generator[Step, dict[str, Any], dict[str, Any]]
JSON_TYPES = ("json", "jsonb")
REFUSALS = {
    "23514": "a CHECK constraint refused the row",
    "23505": "a unique constraint refused the row (a value given, or one already in the template's data)",
    "23503": "a foreign key refused the row",
    "23502": "a NOT NULL column got no value",
    "23P01": "an exclusion constraint refused the row",
}


class InsertError(PgSandboxError):
    """The server refused a row pgsandbox made: the message says which constraint and which values were made."""


def _quote(name: str) -> str:
    """An identifier, with % doubled: the statements use %s placeholders (see connections.py)."""
    return quoted(name).replace("%", "%%")


@dataclass
class Rows:
    """The data factory of one test: its catalog, its values (from its seed) and the rows it made."""

    catalog: Catalog
    seed: str
    read_table: Callable[[str], Catalog] | None = None  # reads a table the template did not have
    maker: Maker = field(init=False)
    made: int = 0
    _sql: dict[tuple[str, tuple[str, ...], tuple[str, ...], bool], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.maker = Maker(self.catalog, self.seed)

    # -- what a row needs ------------------------------------------------------------------------------
    def table(self, name: str) -> Table:
        found = self.catalog.find(name)
        if found is None and self.read_table is not None:
            self._take(self.read_table(name))  # a table this test created, or one of another schema
            found = self.catalog.find(name)
        if found is None:
            known = ", ".join(
                sorted(t.name if t.schema in self.catalog.search_path else t.key for t in self.catalog.tables.values())[
                    :30
                ]
            )
            raise UnknownTable(
                f"pg.insert: there is no table {name!r} in the test's database (searched: "
                f"{', '.join(self.catalog.search_path)}; tables: {known or 'none'}).",
                "name one of its tables, as table or schema.table.",
            )
        return found

    def read_again(self, table: Table) -> Table:
        """``table`` as the test's connection sees it now: the test may have altered it since the template."""
        if self.read_table is not None:
            self._take(self.read_table(table.identifier))
        return self.catalog.tables.get(table.key, table)

    def _take(self, read: Catalog) -> None:
        """Tables read from the test's connection: they replace the template's in this test's catalog only."""
        self.catalog.tables.update(read.tables)
        self.catalog.types.update(read.types)

    def insert_steps(self, name: str, given: Mapping[str, Any], path: tuple[str, ...] = ()) -> Steps:
        """The statements that insert one row into ``name`` (its parents first); returns the row."""
        table = self.table(name)
        if any(table.column(name) is None for name in given):
            table = self.read_again(table)  # a column the test added itself
        for name in given:
            if table.column(name) is None:
                raise PgSandboxError(
                    f"pg.insert: table {table.key} has no column {name!r}.",
                    f"use one of {', '.join(c.name for c in table.columns)}.",
                )
        values = dict(given)
        for fk in table.foreign_keys:
            if any(c in values for c in fk.columns):
                continue
            if not any((c := table.column(name)) is not None and c.required for name in fk.columns):
                continue  # nullable (or defaulted): left to the database
            if fk.table in path or fk.table == table.key:
                chain = " -> ".join([*path, table.key, fk.table])
                raise CannotFill(
                    f"pg.insert: {table.key}.{', '.join(fk.columns)} needs a row of {fk.table}, which needs one "
                    f"of {table.key} in turn ({chain}): a cycle of required foreign keys pgsandbox cannot break.",
                    f"pass a value for one of them, such as pg.insert({table.name!r}, {fk.columns[0]}=...) with "
                    "the key of a row you inserted first.",
                )
            parent = yield from self.insert_steps(fk.table, {}, (*path, table.key))
            for name, referenced in zip(fk.columns, fk.references, strict=True):
                values[name] = parent[referenced]
        made: dict[str, str] = {}
        checks = [c.definition for c in table.checks]
        for column in table.columns:
            if column.name in values or not column.required:
                continue
            try:
                made[column.name] = self.maker.value(
                    table.key, column.name, column.type, column.typmod, table.unique(column.name), checks
                )
            except CannotFill as error:
                raise CannotFill(
                    f"pg.insert: {error.what}",
                    f"pass the value yourself: pg.insert({table.name!r}, {column.name}=...).",
                ) from None
        query, params = self._statement(table, values, made)
        try:
            row = yield query, params
        except Exception as error:
            raise self._refused(error, table, values, made) from error
        self.made += 1
        return row

    def _statement(self, table: Table, given: dict[str, Any], made: dict[str, str]) -> Step:
        override = any((c := table.column(n)) is not None and c.identity == "a" for n in given)
        key = (table.key, tuple(given), tuple(made), override)
        query = self._sql.get(key)
        params: list[Any] = []
        for name, value in given.items():
            column = table.column(name)
            assert column is not None
            if column.generated:
                raise PgSandboxError(
                    f"pg.insert: {table.key}.{name} is a generated column: the database computes it.",
                    f"leave {name} out.",
                )
            if value is not None and self._is_json(column.type) and not isinstance(value, str):
                value = json.dumps(value, default=str)
            params.append(value)
        params.extend(made.values())
        if query is None:
            names = [*given, *made]
            placeholders = [
                self._placeholder(table, name, name in made or self._is_json(table.column(name).type))  # type: ignore[union-attr]
                for name in names
            ]
            target = table.identifier.replace("%", "%%")
            if names:
                query = (
                    f"INSERT INTO {target} ({', '.join(map(_quote, names))})"
                    + (" OVERRIDING SYSTEM VALUE" if override else "")
                    + f" VALUES ({', '.join(placeholders)}) RETURNING *"
                )
            else:
                query = f"INSERT INTO {target} DEFAULT VALUES RETURNING *"
            self._sql[key] = query
        return query, params

    def _placeholder(self, table: Table, name: str, as_text: bool) -> str:
        column = table.column(name)
        assert column is not None
        # text, cast by the server to the column's type: every driver sends it alike
        return f"CAST(CAST(%s AS text) AS {column.sql_type})" if as_text else "%s"

    def _is_json(self, type_oid: int) -> bool:
        pgtype = self.catalog.types.get(type_oid)
        while pgtype is not None and pgtype.kind == "d":
            pgtype = self.catalog.types.get(pgtype.base)
        return pgtype is not None and pgtype.typname in JSON_TYPES

    def _refused(self, error: Exception, table: Table, given: dict[str, Any], made: dict[str, str]) -> Exception:
        state = next((s for s in map(sqlstate, causes(error)) if s), None)
        if state not in REFUSALS:
            return error
        constraint = next(
            (
                getattr(getattr(e, "diag", None), "constraint_name", None) or getattr(e, "constraint_name", None)
                for e in causes(error)
            ),
            None,
        )
        definition = next((c.definition for c in table.checks if c.name == constraint), "")
        column = next(
            (
                getattr(getattr(e, "diag", None), "column_name", None) or getattr(e, "column_name", None)
                for e in causes(error)
            ),
            None,
        )
        if state == "23502" and column and table.column(column) is None:
            return InsertError(
                f"pg.insert({table.name!r}): {table.key}.{column} is NOT NULL but not in the schema pgsandbox read "
                "from the template: was it added by the test (or its fixtures)? The server said: "
                + str(error).strip().splitlines()[0],
                f"pass it once: pg.insert({table.name!r}, {column}=...); pgsandbox then reads {table.key} again "
                "and fills it from then on.",
            )
        shown = ", ".join(f"{name}={value!r}" for name, value in made.items()) or "none"
        return InsertError(
            f"pg.insert({table.name!r}): {REFUSALS[state]}"
            + (f": {constraint}" if constraint else "")
            + (f" {definition}" if definition else "")
            + f". Values pgsandbox made: {shown}; given: {', '.join(given) or 'none'}. The server said: "
            + str(error).strip().splitlines()[0],
            f"pass the values this constraint needs: pg.insert({table.name!r}, column=...).",
        )

    # -- many rows ---------------------------------------------------------------------------------------
    @staticmethod
    def row_values(values: Mapping[str, Any], index: int) -> dict[str, Any]:
        """Row ``index``'s values: a callable is called with the index, a list or tuple gives its item."""
        row = {}
        for name, value in values.items():
            if callable(value):
                row[name] = value(index)
            elif isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray):
                row[name] = value[index]
            else:
                row[name] = value
        return row


def run(steps: Steps, execute: Callable[[str, list[Any]], dict[str, Any]]) -> dict[str, Any]:
    """Drive ``steps`` with a blocking ``execute``."""
    try:
        step = next(steps)
        while True:
            try:
                row = execute(*step)
            except Exception as error:
                step = steps.throw(error)
                continue
            step = steps.send(row)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def run_async(steps: Steps, execute: Callable[[str, list[Any]], Any]) -> dict[str, Any]:
    """Drive ``steps`` with an awaitable ``execute``."""
    try:
        step = next(steps)
        while True:
            try:
                row = await execute(*step)
            except Exception as error:
                step = steps.throw(error)
                continue
            step = steps.send(row)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
