"""Declared factories: the app's own rules for a table's rows, on top of the values pg.insert makes up::

    from pgsandbox.data import Factory, lazy, sequence, sub

    class Users(Factory):
        table = "users"
        name = sequence(lambda n: f"user{n}")
        email = lazy(lambda row: f"{row['name']}@example.com")
        traits = {"admin": {"role": "admin"}}

    class Posts(Factory):
        table = "posts"
        author_id = sub(Users, role="author")  # a row of its own; the column gets its key

    Users.create(pg, admin=True)      # one row (a dict of every column)
    Posts.create_batch(pg, 3)         # three, each with its own author
    await Users.acreate(pg)           # async tests: on the test's async connection

Only what a team wants named goes in a factory: every other required column is still made up by pg.insert.
Teams on factory_boy can keep it: ``pgsandbox.drivers.factoryboy.TableFactory`` gives factory_boy's declarations the
same schema-filled defaults.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pgsandbox.errors import PgSandboxError

if TYPE_CHECKING:
    from pgsandbox.data.catalog import Table
    from pgsandbox.data.rows import Rows


class Database(Protocol):
    """What factories need of a test's database (the ``pg`` handle has it)."""

    @property
    def rows(self) -> Rows: ...

    def insert(self, table: str, /, *, using: Any = None, **values: Any) -> dict[str, Any]: ...

    async def ainsert(self, table: str, /, *, using: Any = None, **values: Any) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Sequence:
    make: Callable[[int], Any]


@dataclass(frozen=True)
class Lazy:
    make: Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class Sub:
    factory: type[Factory]
    values: dict[str, Any] = field(default_factory=dict)


def sequence(make: Callable[[int], Any]) -> Any:
    """A value from a number counted per factory and test (1, 2, 3...: the same on every run)."""
    return Sequence(make)


def lazy(make: Callable[[dict[str, Any]], Any]) -> Any:
    """A value computed from the row's other declared and given values (a dict), once they are known."""
    return Lazy(make)


def sub(factory: type[Factory], **values: Any) -> Any:
    """A row made by another factory for this one: the column gets the row's key (what its foreign key
    references, or the primary key)."""
    return Sub(factory, values)


class Factory:
    """A table's named defaults and traits; subclass it with ``table = "name"`` (see the module's doc)."""

    table: ClassVar[str] = ""
    traits: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def declared(cls) -> dict[str, Any]:
        """The default values this factory and its bases declare, by column."""
        values: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            if klass is object or klass is Factory:
                continue
            for name, value in vars(klass).items():
                if name.startswith("_") or name in ("table", "traits") or _is_method(value):
                    continue
                values[name] = value
        return values

    @classmethod
    def _plan(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        if not cls.table:
            raise PgSandboxError(f"factory {cls.__name__} names no table.", f"add table = '...' to {cls.__name__}.")
        values = cls.declared()
        given = dict(overrides)
        for trait in [name for name in given if name in cls.traits]:
            if given.pop(trait):
                values.update(cls.traits[trait])
        values.update(given)
        return values

    @classmethod
    def _finish(cls, db: Database, values: dict[str, Any], parents: dict[str, dict[str, Any]]) -> dict[str, Any]:
        table = db.rows.table(cls.table)
        for name, row in parents.items():
            values[name] = row[_key(table, name, db.rows.table(values[name].factory.table))]
        for name, value in values.items():
            if isinstance(value, Sequence):
                values[name] = value.make(db.rows.maker.next(f"factory:{cls.__module__}.{cls.__qualname__}:{name}"))
        for name, value in values.items():
            if isinstance(value, Lazy):
                values[name] = value.make({k: v for k, v in values.items() if not isinstance(v, Lazy)})
        return values

    @classmethod
    def create(cls, db: Database, **overrides: Any) -> dict[str, Any]:
        """One row: the declared values, those of the traits set to True, then ``overrides``."""
        values = cls._plan(overrides)
        parents = {
            name: value.factory.create(db, **value.values) for name, value in values.items() if isinstance(value, Sub)
        }
        return db.insert(cls.table, **cls._finish(db, values, parents))

    @classmethod
    def create_batch(cls, db: Database, count: int, **overrides: Any) -> list[dict[str, Any]]:
        return [cls.create(db, **overrides) for _ in range(count)]

    @classmethod
    async def acreate(cls, db: Database, **overrides: Any) -> dict[str, Any]:
        """:meth:`create` for async tests, on the test's async connection (see ``pg.ainsert``)."""
        values = cls._plan(overrides)
        parents = {}
        for name, value in values.items():
            if isinstance(value, Sub):
                parents[name] = await value.factory.acreate(db, **value.values)
        return await db.ainsert(cls.table, **cls._finish(db, values, parents))

    @classmethod
    async def acreate_batch(cls, db: Database, count: int, **overrides: Any) -> list[dict[str, Any]]:
        return [await cls.acreate(db, **overrides) for _ in range(count)]


def _is_method(value: Any) -> bool:
    return isinstance(value, classmethod | staticmethod | property) or inspect.isfunction(value)


def _key(table: Table, column: str, parent: Table) -> str:
    """Which of a parent row's columns goes into ``column``: what its foreign key references, or the parent's
    primary key when it is one column."""
    for fk in table.foreign_keys:
        if column in fk.columns and fk.table == parent.key:
            return fk.references[fk.columns.index(column)]
    if len(parent.primary_key) == 1:
        return parent.primary_key[0]
    raise PgSandboxError(
        f"{table.key}.{column} is declared sub() of a {parent.key} row, but it is no foreign key to that table "
        "and that table's primary key is not one column.",
        f"declare it lazy(...) and take the value from the row yourself, or add the foreign key to {table.key}.",
    )
