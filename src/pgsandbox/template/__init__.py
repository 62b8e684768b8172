"""Templates: migrators behind one interface, built once per hash of their inputs and cached."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pgsandbox.template.base import MigrationError, Migrator, Target, naming_setting
from pgsandbox.template.builds import Chain, Layer, TemplateInfo, ensure_templates, release

__all__ = [
    "Chain",
    "Layer",
    "MigrationError",
    "Migrator",
    "Target",
    "TemplateInfo",
    "ensure_templates",
    "load_migrators",
    "release",
]


def load_migrators(
    specs: Sequence[str], inputs: Sequence[str], root: Path, setting: str = "pg_migrations"
) -> list[Migrator]:
    """``sql:DIR`` (or a directory), ``alembic:PATH``, ``python:module:function``, ``sqlalchemy:module:metadata``,
    ``django:[settings]`` → migrators, in order. ``setting``: where the specs come from (``pg_seed`` takes the
    same forms), for messages."""
    with naming_setting(setting):
        return _load_migrators(specs, inputs, root)


def _load_migrators(specs: Sequence[str], inputs: Sequence[str], root: Path) -> list[Migrator]:
    # each migrator's module only when a spec names its kind: every session starts here
    migrators: list[Migrator] = []
    for spec in specs:
        kind, sep, rest = spec.partition(":")
        if sep and kind == "python":
            from pgsandbox.template.python import PythonMigrator

            migrators.append(PythonMigrator(rest, inputs, root))
            continue
        if sep and kind == "django":
            from pgsandbox.template.django import DjangoMigrator

            migrators.append(DjangoMigrator(rest.strip(), root))
            continue
        if sep and kind == "sqlalchemy":
            from pgsandbox.template.sqlalchemy import SqlAlchemyMigrator

            migrators.append(SqlAlchemyMigrator(rest, inputs, root))
            continue
        if sep and kind in ("sql", "alembic"):
            path = Path(rest).expanduser()
        elif sep and len(kind) > 1:
            raise MigrationError(
                f"pg_migrations entry {spec!r}: unknown kind {kind!r}.",
                "use sql:DIR, alembic:PATH/alembic.ini, python:package.module:function "
                "sqlalchemy:package.module:metadata or django: (django:project.settings).",
            )
        else:
            kind, path = "", Path(spec).expanduser()
        path = path if path.is_absolute() else root / path
        if kind == "alembic" or (not kind and (path.name.endswith(".ini") or (path / "env.py").is_file())):
            from pgsandbox.template.alembic import AlembicMigrator

            migrators.append(AlembicMigrator(path, root))
        else:
            from pgsandbox.template.sql import SqlDirMigrator

            migrators.append(SqlDirMigrator(path, root))
    return migrators
