"""``python:package.module:function`` and the ``pytest_pgsandbox_migrate``/``_seed`` hooks.

The function gets a psycopg connection to the template (committed after it returns), or the DSN when its
one parameter is called ``dsn`` or ``url``. Its hash covers its module's source and the files listed in
``pg_migrations_inputs``: Python code can read anything, so say what else it reads.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg

from pgsandbox.template.base import MigrationError, Migrator, Target, file_inputs, files_matching


class CallableMigrator(Migrator):
    def __init__(
        self,
        label: str,
        function: Callable[..., Any],
        inputs: Iterable[str],
        root: Path,
        sources: Iterable[Path] | None = None,
    ) -> None:
        self.label = label
        self.function = function
        self.input_patterns = tuple(inputs)
        self.root = root
        self._sources = None if sources is None else list(sources)

    def sources(self) -> list[Path]:
        if self._sources is not None:
            return self._sources
        module = inspect.getmodule(self.function)
        path = getattr(module, "__file__", None)
        return [Path(path)] if path else []

    def inputs(self) -> Iterable[tuple[str, bytes]]:
        files = self.sources() + files_matching(self.input_patterns, self.root)
        pairs = file_inputs(sorted(set(files)), self.root)
        if not files:
            # no file to hash: the function's own code is the best identity there is
            pairs.append(("code", self.function.__code__.co_code if hasattr(self.function, "__code__") else b""))
        return pairs

    def migrate(self, target: Target) -> None:
        wants_dsn = _wants_dsn(self.function)
        try:
            if wants_dsn:
                self.function(target.url if wants_dsn == "url" else target.dsn)
                return
            with target.connect() as conn:
                self.function(conn)
                conn.commit()
        except MigrationError:
            raise
        except Exception as error:
            where = ""
            frames = [f for f in inspect.trace() if not f.filename.startswith(str(Path(__file__).parent))]
            if frames:
                where = f" ({frames[-1].filename}, line {frames[-1].lineno})"
            message = error.diag.message_primary if isinstance(error, psycopg.Error) else None
            raise MigrationError(
                f"{self.label} failed{where}: {type(error).__name__}: {message or error}",
                "fix the migration function and run again; the template was not kept.",
            ) from error


def _wants_dsn(function: Callable[..., Any]) -> str | None:
    try:
        parameters = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return None
    if len(parameters) == 1 and parameters[0] in ("dsn", "url"):
        return parameters[0]
    return None


def import_from_root(kind: str, spec: str, module_name: str, root: Path) -> ModuleType:
    """Import ``module_name`` with pytest's rootdir importable; errors name the ``kind:spec`` entry."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise MigrationError(
            f"{kind}:{spec}: cannot import {module_name}: {error}.",
            "check the module path; it must be importable from pytest's rootdir or the installed packages.",
        ) from None
    except Exception as error:
        frames = inspect.trace()
        where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
        raise MigrationError(
            f"{kind}:{spec}: importing {module_name} failed{where}: {type(error).__name__}: {error}",
            "fix the module (the traceback names the line) and run again.",
        ) from error


def load_function(spec: str, root: Path) -> Callable[..., Any]:
    """``package.module:function`` → the function; the rootdir is importable, like pytest's rootdir conftest."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise MigrationError(
            f"python:{spec} is not of the form python:package.module:function.",
            "write pg_migrations = python:myapp.db:migrate (module path, colon, function name).",
        )
    module = import_from_root("python", spec, module_name, root)
    function = getattr(module, attribute, None)
    if not callable(function):
        raise MigrationError(
            f"python:{spec}: {module_name} has no function {attribute}.",
            "check the function name after the colon.",
        )
    return function  # type: ignore[no-any-return]


class PythonMigrator(CallableMigrator):
    def __init__(self, spec: str, inputs: Iterable[str], root: Path) -> None:
        super().__init__(f"python:{spec}", load_function(spec, root), inputs, root)
