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
    from pgsandbox.binaries import Installation, find_installations, select_installation
    from pgsandbox.errors import PgSandboxError
    from pgsandbox.sandbox import Database, Sandbox, SessionLogin
    from pgsandbox.server import ExternalServer, LocalServer, Server, start_server
    from pgsandbox.settings import Settings

from pgsandbox._version import __version__

# Imported on first use: the pytest plugin loads this package in every pytest run, and psycopg alone
# takes about 0.1 s to import, which a suite that never touches the database should not pay.
_EXPORTS = {
    "Database": "pgsandbox.sandbox",
    "Sandbox": "pgsandbox.sandbox",
    "SessionLogin": "pgsandbox.sandbox",
    "ExternalServer": "pgsandbox.server",
    "Installation": "pgsandbox.binaries",
    "LocalServer": "pgsandbox.server",
    "PgSandboxError": "pgsandbox.errors",
    "Server": "pgsandbox.server",
    "Settings": "pgsandbox.settings",
    "find_installations": "pgsandbox.binaries",
    "select_installation": "pgsandbox.binaries",
    "start_server": "pgsandbox.server",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pgsandbox' has no attribute {name!r}")


__all__ = [
    "Database",
    "ExternalServer",
    "Installation",
    "LocalServer",
    "PgSandboxError",
    "Sandbox",
    "Server",
    "SessionLogin",
    "Settings",
    "__version__",
    "find_installations",
    "select_installation",
    "start_server",
]
