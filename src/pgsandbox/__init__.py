"""pgsandbox: a real, private PostgreSQL for every test.

The core works without pytest::

    from pgsandbox import Sandbox, Settings

    with Sandbox.start(Settings(migrations=("sql:migrations",))) as sandbox:
        with sandbox.database(isolation="transaction") as db:
            db.execute("insert into users (name) values ('ada')")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pgsandbox.binaries import Installation as Installation
    from pgsandbox.binaries import find_installations as find_installations
    from pgsandbox.binaries import select_installation as select_installation
    from pgsandbox.data.catalog import UnknownTable
    from pgsandbox.data.rows import InsertError
    from pgsandbox.data.values import CannotFill
    from pgsandbox.drivers.sqlalchemy import sqlalchemy_engine
    from pgsandbox.errors import (
        BinariesNotFound,
        ConfigError,
        ConnectError,
        MissingExtra,
        PgSandboxError,
        PgSandboxWarning,
        PrivilegeError,
        ServerStartError,
        UnsupportedVersion,
    )
    from pgsandbox.isolation.fence import ConnectionFenced
    from pgsandbox.isolation.findings import IsolationError
    from pgsandbox.sandbox import ConnectionInfo, Database, Sandbox, ServerGone, SessionLogin
    from pgsandbox.sandbox.queries import Queries, Recorded
    from pgsandbox.server import ExternalServer, LocalServer, Server, start_server
    from pgsandbox.server.statement_log import StatementLogError
    from pgsandbox.settings import Settings
    from pgsandbox.template.base import MigrationError, Migrator, Target
    from pgsandbox.template.guard import ForeignConnection

from pgsandbox._version import __version__

# Imported on first use: the pytest plugin loads this package in every pytest run, and psycopg alone
# takes about 0.1 s to import, which a suite that never touches the database should not pay.
_EXPORTS = {
    # what a test or a script opens, and annotates
    "Sandbox": "pgsandbox.sandbox",
    "Settings": "pgsandbox.settings",
    "Database": "pgsandbox.sandbox",
    "SessionLogin": "pgsandbox.sandbox",
    "ConnectionInfo": "pgsandbox.sandbox",
    "Queries": "pgsandbox.sandbox.queries",
    "Recorded": "pgsandbox.sandbox.queries",
    "Server": "pgsandbox.server",
    "LocalServer": "pgsandbox.server",
    "ExternalServer": "pgsandbox.server",
    "start_server": "pgsandbox.server",
    "Migrator": "pgsandbox.template.base",
    "sqlalchemy_engine": "pgsandbox.drivers.sqlalchemy",
    "Target": "pgsandbox.template.base",
    # what it catches (every error is a PgSandboxError) and filters
    "PgSandboxError": "pgsandbox.errors",
    "PgSandboxWarning": "pgsandbox.errors",
    "ConfigError": "pgsandbox.errors",
    "BinariesNotFound": "pgsandbox.errors",
    "ServerStartError": "pgsandbox.errors",
    "ConnectError": "pgsandbox.errors",
    "PrivilegeError": "pgsandbox.errors",
    "UnsupportedVersion": "pgsandbox.errors",
    "MissingExtra": "pgsandbox.errors",
    "ServerGone": "pgsandbox.sandbox",
    "IsolationError": "pgsandbox.isolation.findings",
    "ConnectionFenced": "pgsandbox.isolation.fence",
    "MigrationError": "pgsandbox.template.base",
    "ForeignConnection": "pgsandbox.template.guard",
    "StatementLogError": "pgsandbox.server.statement_log",
    "InsertError": "pgsandbox.data.rows",
    "CannotFill": "pgsandbox.data.values",
    "UnknownTable": "pgsandbox.data.catalog",
}
# Binary discovery is pgsandbox.binaries' business; these names still resolve here for code that took them from
# the package, but are not part of its public names.
_FORMER_EXPORTS = {
    "Installation": "pgsandbox.binaries",
    "find_installations": "pgsandbox.binaries",
    "select_installation": "pgsandbox.binaries",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name) or _FORMER_EXPORTS.get(name)
    if module is not None:
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'pgsandbox' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "BinariesNotFound",
    "CannotFill",
    "ConfigError",
    "ConnectError",
    "ConnectionFenced",
    "ConnectionInfo",
    "Database",
    "ExternalServer",
    "ForeignConnection",
    "InsertError",
    "IsolationError",
    "LocalServer",
    "MigrationError",
    "Migrator",
    "MissingExtra",
    "PgSandboxError",
    "PgSandboxWarning",
    "PrivilegeError",
    "Queries",
    "Recorded",
    "Sandbox",
    "Server",
    "ServerGone",
    "ServerStartError",
    "SessionLogin",
    "Settings",
    "StatementLogError",
    "Target",
    "UnknownTable",
    "UnsupportedVersion",
    "__version__",
    "sqlalchemy_engine",
    "start_server",
]
