"""``python:package.module:function`` and the ``pytest_pgsandbox_migrate``/``_seed`` hooks.

What a function gets follows its parameter: a psycopg connection to the template (committed after it
returns); the DSN or the SQLAlchemy URL when the parameter is called ``dsn`` or ``url``; a SQLAlchemy
``Session`` bound to the template (committed and closed by pgsandbox) when it is called ``session`` or
annotated ``Session``, so that seeding through the app's own code is one line. An ``async def`` function
gets psycopg's ``AsyncConnection`` (or an ``AsyncSession``) and runs on an event loop of its own, in a
thread of its own, so that it works whether or not a loop runs where the build does. Its hash covers its
module's source and the files listed in ``pg_migrations_inputs``; files it reads besides are watched (see
``reads.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import inspect
import os
import sys
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg

from pgsandbox.common.files import files_matching
from pgsandbox.errors import PgSandboxWarning
from pgsandbox.template.base import MigrationError, Migrator, Target, file_inputs
from pgsandbox.template.reads import ignored_roots

GIVEN = ("conn", "dsn", "url", "session")


@dataclass(frozen=True)
class Call:
    """A function and what to pass it: (argument name or None for positional, what: conn/dsn/url/session)."""

    function: Callable[..., Any]
    arguments: tuple[tuple[str | None, str], ...]

    @classmethod
    def of(cls, function: Callable[..., Any]) -> Call:
        """A ``python:`` function: one parameter, by its name or annotation; otherwise the connection."""
        try:
            parameters = list(inspect.signature(function).parameters.values())
        except (TypeError, ValueError):
            parameters = []
        if len(parameters) == 1:
            return cls(function, ((None, _wanted(parameters[0])),))
        return cls(function, ((None, "conn"),))

    @classmethod
    def hook(cls, function: Callable[..., Any], names: Sequence[str]) -> Call:
        """A hook implementation: each argument it names (``conn``, ``dsn``, ``url``, ``session``: the
        hookspec's, which pluggy checked)."""
        return cls(function, tuple((name, name) for name in names if name in GIVEN))

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.function)

    @property
    def wants(self) -> set[str]:
        return {what for _, what in self.arguments}


def _wanted(parameter: inspect.Parameter) -> str:
    if parameter.name in ("dsn", "url", "session"):
        return parameter.name
    annotation = parameter.annotation
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    if text.rsplit(".", 1)[-1] in ("Session", "AsyncSession"):
        return "session"
    return "conn"


class CallableMigrator(Migrator):
    runs_app_code = True  # the function may connect anywhere

    def __init__(
        self,
        label: str,
        function: Callable[..., Any] | Sequence[Call],
        inputs: Iterable[str],
        root: Path,
        sources: Iterable[Path] | None = None,
    ) -> None:
        self.label = label
        self.calls = [Call.of(function)] if callable(function) else list(function)
        self.function = self.calls[0].function if self.calls else None
        self.input_patterns = tuple(inputs)
        self.root = root
        self._sources = None if sources is None else list(sources)

    def sources(self) -> list[Path]:
        if self._sources is not None:
            return self._sources
        module = inspect.getmodule(self.function)
        path = getattr(module, "__file__", None)
        return [Path(path)] if path else []

    def input_paths(self) -> list[Path]:
        return self.sources() + files_matching(self.input_patterns, self.root)

    def inputs(self) -> Iterable[tuple[str, bytes]]:
        files = self.input_paths()
        pairs = file_inputs(sorted(set(files)), self.root)
        if not files:
            # no file to hash: the function's own code is the best identity there is
            for call in self.calls:
                code = getattr(call.function, "__code__", None)
                pairs.append(("code", code.co_code if code is not None else b""))
        return pairs

    def migrate(self, target: Target) -> None:
        try:
            for call in self.calls:
                if call.is_async:
                    _in_own_loop(functools.partial(_call_async, call, target))
                else:
                    _call(call, target)
        except MigrationError:
            raise
        except Exception as error:
            where = ""
            # the innermost frame of the app's code: not pgsandbox's, Python's or a library's (psycopg's)
            libraries = ignored_roots()
            frames = [f for f in inspect.trace() if not os.path.realpath(f.filename).startswith(libraries)]
            if frames:
                where = f" ({frames[-1].filename}, line {frames[-1].lineno})"
            message = error.diag.message_primary if isinstance(error, psycopg.Error) else None
            raise MigrationError(
                f"{self.label} failed{where}: {type(error).__name__}: {message or error}",
                "fix the migration function and run again; the template was not kept.",
            ) from error

    def unchanged(self, target: Target) -> None:
        # not an error: a hook may have nothing to do on some runs; but tell, where the function is
        code = getattr(self.function, "__code__", None)
        warnings.warn_explicit(
            PgSandboxWarning(
                f"{self.label} changed nothing in the template {target.dbname} (no object, no row). If it connects "
                "by itself (a subprocess, a library pgsandbox does not watch), it may have changed another "
                "database: give it the connection, URL or session pgsandbox passes (a parameter named conn, url, "
                "dsn or session)."
            ),
            PgSandboxWarning,
            code.co_filename if code else "pgsandbox",
            code.co_firstlineno if code else 0,
        )


def _arguments(call: Call, target: Target, given: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    values = {"dsn": target.dsn, "url": target.url, **given}
    args = [values[what] for name, what in call.arguments if name is None]
    kwargs = {name: values[what] for name, what in call.arguments if name is not None}
    return args, kwargs


def _call(call: Call, target: Target) -> None:
    with contextlib.ExitStack() as stack:
        given: dict[str, Any] = {}
        if "conn" in call.wants:
            given["conn"] = stack.enter_context(target.connect())
        if "session" in call.wants:
            given["session"] = stack.enter_context(_session(target))
        args, kwargs = _arguments(call, target, given)
        call.function(*args, **kwargs)
        if "conn" in given:
            given["conn"].commit()
        if "session" in given:
            given["session"].commit()


async def _call_async(call: Call, target: Target) -> None:
    async with contextlib.AsyncExitStack() as stack:
        given: dict[str, Any] = {}
        if "conn" in call.wants:
            given["conn"] = await stack.enter_async_context(await psycopg.AsyncConnection.connect(target.dsn))
        if "session" in call.wants:
            given["session"] = await stack.enter_async_context(_async_session(target))
        args, kwargs = _arguments(call, target, given)
        await call.function(*args, **kwargs)
        if "conn" in given:
            await given["conn"].commit()
        if "session" in given:
            await given["session"].commit()


def _in_own_loop(coroutine: Callable[[], Any]) -> None:
    """``asyncio.run`` in a thread: the caller may run inside an event loop, or own the thread's loop."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(coroutine())
        except BaseException as error:
            failure.append(error)

    thread = threading.Thread(target=run, name="async migration")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def _sqlalchemy_missing() -> MigrationError:
    return MigrationError(
        "a migration or seed asks for a SQLAlchemy session, but SQLAlchemy is not installed.",
        "pip install 'pytest-pgsandbox[sqlalchemy]', or take a connection (conn) instead.",
    )


@contextlib.contextmanager
def _session(target: Target) -> Iterator[Any]:
    try:
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session
        from sqlalchemy.pool import NullPool
    except ImportError:
        raise _sqlalchemy_missing() from None
    engine = create_engine(target.url, poolclass=NullPool)
    try:
        with Session(engine) as session:
            yield session
    finally:
        engine.dispose()


@contextlib.asynccontextmanager
async def _async_session(target: Target) -> AsyncIterator[Any]:
    try:
        from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
        from sqlalchemy.pool import NullPool
    except ImportError:
        raise _sqlalchemy_missing() from None
    engine = create_async_engine(target.url, poolclass=NullPool)
    try:
        async with AsyncSession(engine) as session:
            yield session
    finally:
        await engine.dispose()


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
