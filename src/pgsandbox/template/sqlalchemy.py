"""``sqlalchemy:package.module:metadata``: ``metadata.create_all()`` into the template, for projects
without migrations.

The attribute is a ``MetaData``, a declarative base (``class Base(DeclarativeBase)``, ``declarative_base()``)
or a ``registry``; a dotted attribute (``db.metadata``) is followed. The module is imported with
pytest's rootdir importable, as for ``python:``.

What ``create_all`` builds can be defined far from the module named: model modules it imports, mixins, enum
classes, custom types, a Core ``Table`` in a module no model imports. Following source files to all of
those is guesswork, so the hash covers what create_all would do, plus the code that could change it:

- the DDL itself, compiled for PostgreSQL without a database (SQLAlchemy's mock engine) and sorted (a
  table's indexes come in set order): exact for everything the metadata holds, wherever it is defined;
- the source of the module named, and of every module defining a mapped class of this metadata or one of
  its bases (mixins): DDL event listeners are Python, and one that needs a real connection cannot run on
  the mock engine;
- SQLAlchemy's version, and the files ``pg_migrations_inputs`` matches.

So editing a model module rebuilds the template even when only a method changed: a needless rebuild costs
one create_all, a stale template costs tests that pass against a schema the code no longer has. Test modules
stay out of the hash unless they map classes.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from pgsandbox.template.base import MigrationError
from pgsandbox.template.python import CallableMigrator, import_from_root

if TYPE_CHECKING:
    from sqlalchemy import MetaData
    from sqlalchemy.orm import registry

FORM = "sqlalchemy:package.module:metadata"
EXAMPLE = "sqlalchemy:myapp.models:Base"
FAILED_FIX = (
    "fix the model, or create what it needs (CREATE EXTENSION, CREATE SCHEMA, ...) in an earlier pg_migrations "
    "step such as sql:DIR, and run again; the template was not kept."
)


def _require_sqlalchemy() -> None:
    try:
        import sqlalchemy
    except ImportError:
        raise MigrationError(
            "pg_migrations has a sqlalchemy: entry, but SQLAlchemy is not installed.",
            "pip install 'pytest-pgsandbox[sqlalchemy]' (or add sqlalchemy>=2 to your test dependencies).",
        ) from None
    if int(sqlalchemy.__version__.split(".")[0]) < 2:
        raise MigrationError(
            f"pg_migrations has a sqlalchemy: entry, but SQLAlchemy is {sqlalchemy.__version__}.",
            "pip install 'sqlalchemy>=2' (the template's URL uses the psycopg 3 dialect, new in 2.0).",
        )


def load_metadata(spec: str, root: Path) -> tuple[MetaData, list[registry]]:
    """``package.module:attribute`` → its MetaData and the registries whose classes it maps."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise MigrationError(
            f"sqlalchemy:{spec} is not of the form {FORM}.",
            f"write pg_migrations = {EXAMPLE} (module path, colon, the MetaData or declarative base).",
        )
    _require_sqlalchemy()
    from sqlalchemy import MetaData
    from sqlalchemy import inspect as sa_inspect
    from sqlalchemy.orm import registry

    module = import_from_root("sqlalchemy", spec, module_name, root)

    value: Any = module
    for part in attribute.split("."):
        if not hasattr(value, part):
            raise MigrationError(
                f"sqlalchemy:{spec}: {module_name} has no attribute {attribute}.",
                f"name the MetaData or the declarative base after the colon, e.g. {EXAMPLE}.",
            )
        value = getattr(value, part)

    shown = f"{module_name}.{attribute}"
    registries: list[registry] = []
    declared = getattr(value, "metadata", None)
    if isinstance(value, MetaData):
        metadata = value
    elif isinstance(value, registry):
        metadata, registries = value.metadata, [value]
    elif isinstance(value, type) and isinstance(declared, MetaData):
        if sa_inspect(value, raiseerr=False) is not None:
            raise MigrationError(
                f"sqlalchemy:{spec}: {shown} is a mapped class, not a declarative base.",
                f"name the base class it inherits from (e.g. {EXAMPLE}): every table of its metadata is created.",
            )
        metadata = declared
        own = getattr(value, "registry", None)
        registries = [own] if isinstance(own, registry) else []
    elif isinstance(declared, MetaData):
        raise MigrationError(
            f"sqlalchemy:{spec}: {shown} is {_a(value)}, not a MetaData, a declarative base or a registry.",
            f"name its MetaData: sqlalchemy:{spec}.metadata.",
        )
    else:
        raise MigrationError(
            f"sqlalchemy:{spec}: {shown} is {_a(value)}, not a MetaData, a declarative base or a registry.",
            "name the MetaData your tables use (MetaData()) or the declarative base your models inherit "
            f"(class Base(DeclarativeBase)), e.g. {EXAMPLE}.",
        )
    if not metadata.tables:
        raise MigrationError(
            f"sqlalchemy:{spec}: {shown} has no tables: importing {module_name} defined none.",
            f"name a module that imports every model module (e.g. {EXAMPLE} in a models package whose "
            "__init__ imports them), or import the models in this one.",
        )
    return metadata, registries + [r for r in _all_registries() if r.metadata is metadata and r not in registries]


def _a(value: object) -> str:
    return f"the class {value.__qualname__}" if isinstance(value, type) else f"a {type(value).__qualname__}"


def _all_registries() -> list[registry]:
    """Every live registry. SQLAlchemy keeps that list privately: without it, a bare MetaData's mapped
    classes go unhashed (the DDL still is), so a missing function is no error."""
    mapperlib = importlib.import_module("sqlalchemy.orm.mapper")
    found = getattr(mapperlib, "_all_registries", None)
    return list(found()) if callable(found) else []


def _is_library(module_name: str) -> bool:
    top = module_name.partition(".")[0]
    # SQLAlchemy's own files are covered by its version; the standard library's change with Python only
    return top in ("sqlalchemy", "builtins") or top in sys.stdlib_module_names


class SqlAlchemyMigrator(CallableMigrator):
    runs_app_code = False  # create_all on the URL it is given; empty metadata is no mistake of where

    def __init__(self, spec: str, inputs: Iterable[str], root: Path) -> None:
        self.metadata, self.registries = load_metadata(spec, root)
        self.module_name = spec.partition(":")[0]
        # a one-parameter function named "url" gets the template's SQLAlchemy URL from CallableMigrator
        super().__init__(f"sqlalchemy:{spec}", self.create_all, inputs, root)

    def sources(self) -> list[Path]:
        names = {self.module_name}
        tables = set(self.metadata.tables.values())
        for reg in self.registries:
            for mapper in reg.mappers:
                if tables.intersection(mapper.tables):
                    names.update(cls.__module__ for cls in mapper.class_.__mro__)
        files = {getattr(sys.modules.get(name), "__file__", None) for name in names if not _is_library(name)}
        return sorted(Path(file) for file in files if file)

    def inputs(self) -> Iterable[tuple[str, bytes]]:
        import sqlalchemy

        return [
            *super().inputs(),
            ("sqlalchemy version", sqlalchemy.__version__.encode()),
            ("create_all DDL", self.ddl().encode()),
        ]

    def ddl(self) -> str:
        from sqlalchemy import create_mock_engine

        statements: list[str] = []

        def record(sql: Any, *multiparams: Any, **params: Any) -> None:
            statements.append(str(sql.compile(dialect=engine.dialect)) + (repr(multiparams) if multiparams else ""))

        engine = create_mock_engine("postgresql+psycopg://", record)
        try:
            self.metadata.create_all(engine, checkfirst=False)
        except Exception as error:
            # a DDL listener that needs a real connection: the sources in the hash still identify it
            return f"not compiled without a database: {type(error).__name__}"
        return "\n;\n".join(sorted(statements))

    def create_all(self, url: str) -> None:
        from sqlalchemy import create_engine, event
        from sqlalchemy.pool import NullPool

        engine = create_engine(url, poolclass=NullPool)
        running: list[Any] = []

        def remember(conn: Any, clauseelement: Any, *args: Any) -> None:
            running[:] = [clauseelement]

        event.listen(engine, "before_execute", remember)
        try:
            with engine.begin() as conn:
                self.metadata.create_all(conn)
        except Exception as error:
            raise self.failure(error, running[0] if running else None) from error
        finally:
            engine.dispose()

    def failure(self, error: Exception, statement: Any) -> MigrationError:
        from sqlalchemy.exc import DBAPIError, NoReferencedTableError

        if isinstance(error, NoReferencedTableError):
            return MigrationError(
                f"{self.label}: create_all failed: {error}.",
                "check the ForeignKey target (a table name such as 'users.id', not the class name) and that "
                f"{self.module_name} imports the module defining that table.",
            )
        if not isinstance(error, DBAPIError):
            return MigrationError(f"{self.label}: create_all failed: {type(error).__name__}: {error}", FAILED_FIX)
        lines = [f"{self.label}: create_all failed on {_describe(statement)}:"]
        lines += [f"    {line.rstrip().expandtabs(4)}" for line in str(error.statement or "").strip().splitlines()[:12]]
        orig = error.orig
        if isinstance(orig, psycopg.Error):
            diag = orig.diag
            lines.append(
                f"  PostgreSQL: {diag.message_primary}" + (f" (SQLSTATE {diag.sqlstate})" if diag.sqlstate else "")
            )
            lines += [
                f"  {name}: {value}"
                for name, value in (("detail", diag.message_detail), ("hint", diag.message_hint))
                if value
            ]
        else:
            lines.append(f"  {type(orig).__name__}: {orig}")
        return MigrationError("\n".join(lines), FAILED_FIX)


def _describe(statement: Any) -> str:
    """The schema object a DDL statement creates: 'table orders', 'index ix_x on table orders', ..."""
    from sqlalchemy import Index, Table
    from sqlalchemy.schema import Constraint

    element = getattr(statement, "element", None)
    if isinstance(element, Table):
        return f"table {element.fullname}"
    if isinstance(element, Index):
        table = element.table
        return f"index {element.name} on table {table.fullname if isinstance(table, Table) else table}"
    if isinstance(element, Constraint):
        named = f"constraint {element.name}" if element.name else "a constraint"
        return f"{named} on table {getattr(element.table, 'fullname', '?')}"
    name = getattr(element, "name", None)
    if name is not None:
        return f"{type(element).__name__.lower()} {name}"
    return "a statement"
