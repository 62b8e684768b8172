"""Client libraries: each adapter gives a test a connection of its library inside the test's isolation.

``transaction`` isolation: the psycopg 3 family (``pg``, ``pg_conn``, ``pg_engine``, ``pg_session``) shares
the test's one connection; every other library gets a connection of its own to the session database, in a
transaction of its own with the same savepoint protocol (commits move a savepoint; the end rolls back and a
lost savepoint reveals a raw ``COMMIT``). ``database`` isolation: plain connections to the test's clone.
An adapter is imported only when its fixture is used: a missing library costs nothing until asked for. The
protocol they share is :mod:`pgsandbox.drivers.guests`; each library's module keeps only its own part.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from pgsandbox.errors import MissingExtra

PACKAGES = {"psycopg2": "psycopg2-binary", "pytest_asyncio": "pytest-asyncio", "factory": "factory_boy"}


def require(module: str, extra: str, user: str) -> ModuleType:
    """Import ``module`` or say which extra installs it (``user``: what needs it, for the message)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing(module, extra, user) from None


def missing(module: str, extra: str, user: str) -> MissingExtra:
    package = PACKAGES.get(module, module)
    error = MissingExtra(
        f"{user} needs {package}, which is not installed.",
        f"pip install 'pytest-pgsandbox[{extra}]' (or add {package} to your test dependencies).",
    )
    error.module, error.extra = module, extra
    return error
