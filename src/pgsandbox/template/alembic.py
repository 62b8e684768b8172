"""``alembic:PATH/alembic.ini`` (or the script directory): ``alembic upgrade head`` into the template.

The template's URL is given to Alembic as ``sqlalchemy.url`` (SQLAlchemy's psycopg driver), and as
``config.attributes["pgsandbox_url"]`` for an ``env.py`` that builds its own engine.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pgsandbox.template.base import MigrationError, Migrator, Target, file_inputs

if TYPE_CHECKING:
    from alembic.config import Config


def _alembic_missing() -> MigrationError:
    return MigrationError(
        "pg_migrations has an alembic: entry, but Alembic is not installed.",
        "pip install 'pytest-pgsandbox[alembic]' (or add alembic to your test dependencies).",
    )


class AlembicMigrator(Migrator):
    runs_app_code = True  # env.py decides where it connects

    def __init__(self, path: Path, root: Path) -> None:
        self.path = path
        self.root = root
        try:
            shown = str(path.relative_to(root))
        except ValueError:
            shown = str(path)
        self.label = f"alembic:{shown}"

    def config(self, url: str | None = None) -> Config:
        try:
            from alembic.config import Config
        except ImportError:
            raise _alembic_missing() from None
        if self.path.is_file():
            config = Config(str(self.path))
        elif self.path.is_dir() and (self.path / "alembic.ini").is_file():
            config = Config(str(self.path / "alembic.ini"))
        elif self.path.is_dir() and (self.path / "env.py").is_file():
            config = Config()
            config.set_main_option("script_location", str(self.path))
        else:
            raise MigrationError(
                f"{self.label}: no alembic.ini or Alembic script directory (with env.py) at {self.path}.",
                "point pg_migrations at the alembic.ini file or the directory holding env.py.",
            )
        if url is not None:
            config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
            config.attributes["pgsandbox_url"] = url
        return config

    def _files(self) -> tuple[Path, list[Path], Path | None]:
        """The script directory, its files (env.py, the template, the revisions) and alembic.ini."""
        config = self.config()
        from alembic.script import ScriptDirectory

        script = ScriptDirectory.from_config(config)
        base = Path(script.dir)
        files = {
            p for p in base.rglob("*") if p.is_file() and p.suffix in (".py", ".mako") and "__pycache__" not in p.parts
        }
        for location in script.version_locations:
            files.update(p for p in Path(location).rglob("*.py") if "__pycache__" not in p.parts)
        ini = Path(config.config_file_name) if config.config_file_name else None
        return base, sorted(files), ini

    def inputs(self) -> Iterable[tuple[str, bytes]]:
        base, files, ini = self._files()
        pairs = file_inputs(files, base)
        if ini is not None:
            pairs.append(("alembic.ini", ini.read_bytes()))
        return pairs

    def input_paths(self) -> list[Path]:
        _, files, ini = self._files()
        return [*files, *([ini] if ini else [])]

    def unchanged(self, target: Target) -> None:
        # `alembic upgrade head` creates its version table in the database it migrates, even with no revision
        raise MigrationError(
            f"{self.label}: `alembic upgrade head` finished, but the template {target.dbname} is unchanged: no "
            "alembic_version table, nothing created. Its env.py most likely ignored the URL pgsandbox gave it "
            '(sqlalchemy.url, config.attributes["pgsandbox_url"]) and migrated the database your app\'s settings '
            "name instead.",
            'let pgsandbox\'s URL win in env.py: url = config.attributes.get("pgsandbox_url", <your setting>), '
            'then build the engine from url (README, "Alembic with an async env.py"); and check the database '
            "your settings name: these migrations may have run there.",
        )

    def _where(self, error: BaseException) -> list[str]:
        """The lines of the project's own files (env.py, the revisions) the error passed through, innermost
        last: the fixture shows the message alone, without a traceback."""
        try:
            base = self._files()[0].resolve()
        except Exception:  # the script directory itself is broken: the error says why
            return []
        frames = [
            frame
            for frame in traceback.extract_tb(error.__traceback__)
            if Path(frame.filename).resolve().is_relative_to(base)
        ]
        return [
            f"{Path(frame.filename).resolve().relative_to(base)}, line {frame.lineno}, in {frame.name}"
            + (f": {frame.line.strip()}" if frame.line else "")
            for frame in frames[-3:]
        ]

    def migrate(self, target: Target) -> None:
        from alembic import command

        config = self.config(target.url)
        # the env.py `alembic init` writes calls logging.config.fileConfig(), which disables every logger
        # that exists and replaces the root logger's handlers and level, in the test session (caplog then
        # sees nothing): put them back afterwards
        root = logging.getLogger()
        loggers = [root, *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]
        disabled = {logger: logger.disabled for logger in loggers}
        root_handlers, root_level = root.handlers[:], root.level
        try:
            command.upgrade(config, "head")
        except MigrationError:
            raise
        except Exception as error:
            where = self._where(error)
            raise MigrationError(
                f"{self.label}: `alembic upgrade head` failed: {type(error).__name__}: {error}"
                + "".join(f"\n  at {place}" for place in where),
                f"fix {where[-1].split(', in ')[0] if where else 'the failing revision (or env.py)'} and run again; "
                "the template was not kept.",
            ) from error
        finally:
            for logger, was in disabled.items():
                logger.disabled = was
            root.handlers[:] = root_handlers
            root.setLevel(root_level)
