"""The migrator interface: what identifies a schema (for the template's hash) and how to build it."""

from __future__ import annotations

import contextlib
import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from pgsandbox.errors import PgSandboxError


class MigrationError(PgSandboxError):
    """A migration failed; the message names the file, the statement and PostgreSQL's error."""


SETTING_OF_LAYER = {"migrations": "pg_migrations", "seed": "pg_seed"}
_PG_MIGRATIONS = re.compile(r"\bpg_migrations\b(?!_)")


@contextlib.contextmanager
def naming_setting(setting: str) -> Iterator[None]:
    """Errors of a migrator say ``pg_migrations``; one of ``pg_seed`` (the same forms) must name ``pg_seed``,
    where its entry is."""
    try:
        yield
    except PgSandboxError as error:
        if setting != "pg_migrations":
            error.what = _PG_MIGRATIONS.sub(setting, error.what)
            error.fix = _PG_MIGRATIONS.sub(setting, error.fix)
            error.args = (error.what + (f"\n  What to do: {error.fix}" if error.fix else ""),)
        raise


@dataclass(frozen=True)
class Target:
    """The empty database a migrator fills: a DSN for tools that connect themselves, or a connection."""

    dbname: str
    dsn: str = field(repr=False)
    url: str = field(repr=False)  # SQLAlchemy URL (postgresql+psycopg://...?passfile=...)

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, **kwargs)


class Migrator(ABC):
    """One step of a template build. ``inputs()`` must cover everything that changes what ``migrate()`` does."""

    label: str
    # runs the app's own code, which may connect wherever it likes: the build then checks that it changed
    # the template (see :meth:`unchanged`)
    runs_app_code = False

    @abstractmethod
    def inputs(self) -> Iterable[tuple[str, bytes]]:
        """(name, content) pairs that identify this step: files, sources, versions."""

    @abstractmethod
    def migrate(self, target: Target) -> None:
        """Apply this step to the target database. Raise :class:`MigrationError` with a useful message."""

    def input_paths(self) -> list[Path]:
        """The files ``inputs()`` hashes, where it hashes files: a build reading them is no news."""
        return []

    def unchanged(self, target: Target) -> None:
        """Called when this step (``runs_app_code``) created, altered, inserted, updated and deleted nothing
        in the template: raise :class:`MigrationError` when that cannot be right, or warn."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"


def fingerprint(migrators: Iterable[Migrator], *extra: str) -> str:
    """A hash of the migrators' labels and inputs, in order, plus ``extra`` strings."""
    digest = hashlib.sha256()
    for item in extra:
        digest.update(b"extra\0" + item.encode() + b"\0")
    for migrator in migrators:
        digest.update(b"migrator\0" + migrator.label.encode() + b"\0")
        for name, content in migrator.inputs():
            digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return digest.hexdigest()


def file_inputs(files: Iterable[Path], root: Path) -> list[tuple[str, bytes]]:
    """(relative name, bytes) for each file: renaming a file changes the hash, moving the project does not."""
    pairs = []
    for path in files:
        try:
            name = str(path.relative_to(root))
        except ValueError:
            name = str(path)
        pairs.append((name, path.read_bytes()))
    return pairs
