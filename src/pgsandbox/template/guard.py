"""While a template is built, connections to any other database are refused where pgsandbox can see them.

An ``env.py`` or a ``python:`` migration that builds its engine from the app's own settings would otherwise
migrate the database those settings name (a real server), and the build would look like a success. The
guard wraps the connect entry points of the client libraries that are already imported (psycopg 3 sync and
async, psycopg2, asyncpg; those the migration imports are patched once imported, by a ``sys.meta_path``
finder, so that no library is imported for the guard's sake) and adds a ``do_connect`` listener on
SQLAlchemy's ``Engine`` class, which sees every dialect. A
connection to a template being built passes; any other raises :class:`ForeignConnection`, naming the target
without its password. Everything is put back when the last build ends.
"""

from __future__ import annotations

import contextlib
import getpass
import importlib.abc
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pgsandbox.template.base import MigrationError

README_RECIPE = (
    'README, "Alembic with an async env.py": an env.py that builds its engine from the app\'s own setting must '
    "let pgsandbox's URL win"
)


class ForeignConnection(MigrationError):
    """A migration tried to connect to a database other than the template being built."""

    label = ""  # the migrator that tried


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.building: dict[str, str] = {}  # template name -> the label of the migrator building it
        self.undo: list[Callable[[], None]] = []
        self.refused: list[ForeignConnection] = []


_state = _State()


@contextlib.contextmanager
def only_template(dbname: str, label: str) -> Iterator[list[ForeignConnection]]:
    """Refuse every connection but to ``dbname`` (and other templates being built) while the block runs.

    Yields the refusals, so that a caller can raise one the migration caught and swallowed."""
    refused: list[ForeignConnection] = []
    with _state.lock:
        if not _state.building:
            try:
                _install()
            except BaseException:
                _uninstall()
                raise
        _state.building[dbname] = label
        start = len(_state.refused)
    try:
        yield refused
    finally:
        with _state.lock:
            refused.extend(error for error in _state.refused[start:] if error.label == label)
            del _state.building[dbname]
            if not _state.building:
                _uninstall()


def check(params: Mapping[str, Any], library: str) -> None:
    """Raise :class:`ForeignConnection` unless ``params`` (libpq keywords) name a template being built."""
    dbname = str(params.get("dbname") or os.environ.get("PGDATABASE") or params.get("user") or _default_user())
    with _state.lock:
        if not _state.building or dbname in _state.building:
            return
        label = next(reversed(_state.building.values()))
        template = next(reversed(_state.building))
        error = ForeignConnection(
            f"{label} tried to connect to {describe(params, dbname)} through {library} while pgsandbox was "
            f"building the template {template}. A migration may reach only the template, so that it cannot "
            "change another database (the one your app's settings name): pgsandbox refused the connection.",
            "make the migration connect where pgsandbox points it. Alembic: in env.py, "
            'url = config.attributes.get("pgsandbox_url", <your setting>), and build the engine from it '
            f"({README_RECIPE}); a python: migration or hook: use the connection it is given, or take a "
            "parameter named url, dsn or session.",
        )
        error.label = label
        _state.refused.append(error)
    raise error


def describe(params: Mapping[str, Any], dbname: str) -> str:
    host = params.get("host") or params.get("hostaddr") or os.environ.get("PGHOST") or "the default socket"
    port = params.get("port") or os.environ.get("PGPORT") or 5432
    user = params.get("user") or os.environ.get("PGUSER") or _default_user()
    return f"database {dbname!r} on {host}:{port} as {user}"


def _default_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "(the OS user)"


def _loaded(name: str) -> Any:
    return sys.modules.get(name)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds a watched library's module with the other finders and patches it once it is executed."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        install = _WATCHED.get(name)
        if install is None:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Patching(spec.loader, install)
        return spec


class _Patching(importlib.abc.Loader):
    def __init__(self, loader: Any, install: Callable[[], None]) -> None:
        self.loader = loader
        self.install = install

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        with _state.lock:
            if _state.building:
                self.install()

    def __getattr__(self, name: str) -> Any:  # resource readers and the like
        return getattr(self.loader, name)


def _patch(owner: Any, attribute: str, replacement: Any) -> None:
    original = owner.__dict__[attribute] if isinstance(owner, type) else getattr(owner, attribute)
    setattr(owner, attribute, replacement)
    _state.undo.append(lambda: setattr(owner, attribute, original))


def _uninstall() -> None:
    for undo in reversed(_state.undo):
        undo()
    _state.undo.clear()
    _state.refused.clear()


def _install() -> None:
    _psycopg()  # pgsandbox's own driver: always imported
    for name, install in _WATCHED.items():
        if name in sys.modules:
            install()
    finder = _PatchOnImport()
    sys.meta_path.insert(0, finder)
    _state.undo.append(lambda: sys.meta_path.remove(finder))


def _conninfo(conninfo: str) -> dict[str, Any]:
    from psycopg.conninfo import conninfo_to_dict

    try:
        return conninfo_to_dict(conninfo or "")
    except Exception:
        return {}


def _psycopg() -> None:
    import psycopg

    owner = next((c for c in psycopg.Connection.__mro__ if "_connect_gen" in c.__dict__), None)
    if owner is None:
        return
    original = owner.__dict__["_connect_gen"].__func__

    def _connect_gen(cls: Any, conninfo: str = "", *args: Any, **kwargs: Any) -> Any:
        check(_conninfo(conninfo), "psycopg")
        return original(cls, conninfo, *args, **kwargs)

    _patch(owner, "_connect_gen", classmethod(_connect_gen))


def _psycopg2() -> None:
    module = _loaded("psycopg2")
    if module is None or not hasattr(module, "_connect"):
        return
    original = module._connect

    def _connect(dsn: str, *args: Any, **kwargs: Any) -> Any:
        check(_conninfo(dsn), "psycopg2")
        return original(dsn, *args, **kwargs)

    _patch(module, "_connect", _connect)


def _asyncpg() -> None:
    module = _loaded("asyncpg.connect_utils")
    if module is None or not hasattr(module, "_parse_connect_arguments"):
        return
    original = module._parse_connect_arguments

    def _parse_connect_arguments(**kwargs: Any) -> Any:
        addrs, params, config = original(**kwargs)
        host, port = addrs[0] if addrs and isinstance(addrs[0], tuple) else (addrs[0] if addrs else None, None)
        check({"dbname": params.database, "user": params.user, "host": host, "port": port}, "asyncpg")
        return addrs, params, config

    _patch(module, "_parse_connect_arguments", _parse_connect_arguments)


def _sqlalchemy() -> None:
    engine_module = _loaded("sqlalchemy.engine")
    if engine_module is None:
        return
    from sqlalchemy import event

    def do_connect(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        params = _conninfo(cargs[0]) if cargs and isinstance(cargs[0], str) else {}
        params.update({k: v for k, v in cparams.items() if k in ("host", "port", "user", "dbname")})
        if cparams.get("database"):
            params["dbname"] = cparams["database"]
        if isinstance(cparams.get("dsn"), str):
            params = {**_conninfo(cparams["dsn"]), **params}
        check(params, f"SQLAlchemy ({dialect.name}+{dialect.driver})")
        if dialect.driver == "asyncpg" and isinstance(cparams.get("options"), str):
            # libpq's options (schema isolation's search_path) in a URL an env.py turned into asyncpg's, which
            # SQLAlchemy would pass to asyncpg.connect() as an argument it does not take: asyncpg sends them in
            # the startup packet, as libpq does, as a server setting
            cparams["server_settings"] = {"options": cparams.pop("options"), **(cparams.get("server_settings") or {})}

    event.listen(engine_module.Engine, "do_connect", do_connect)
    _state.undo.append(lambda: event.remove(engine_module.Engine, "do_connect", do_connect))


_WATCHED: dict[str, Callable[[], None]] = {
    "psycopg2": _psycopg2,
    "asyncpg.connect_utils": _asyncpg,
    "sqlalchemy.engine": _sqlalchemy,
}
