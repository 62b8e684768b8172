"""The running test's database, where ``TableFactory`` inserts, and the rows it returns: apart from
:mod:`pgsandbox.drivers.table_factory`, which imports factory_boy, because every test's fixtures register the
database here whether it uses factory_boy or not."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pgsandbox.errors import PgSandboxError

if TYPE_CHECKING:
    from pgsandbox.sandbox import Database

# Module state, not a context variable: pytest-asyncio runs fixtures and tests in tasks of their own, and a
# context variable set in a fixture's task would not be seen by the test's.
_databases: list[Database] = []


class Row(dict[str, Any]):
    """A row as a dict whose columns also read as attributes (for factory_boy's ``SelfAttribute``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def enter_test(db: Database) -> None:
    """``db`` is the running test's database until :func:`leave_test` (the fixtures call both)."""
    _databases.append(db)


def leave_test(db: Database) -> None:
    _databases.remove(db)


def database() -> Database:
    """The running test's database (``pg``): where ``TableFactory`` inserts."""
    if not _databases:
        raise PgSandboxError(
            "a TableFactory ran, but this test has no database.",
            "request pg (or another pgsandbox fixture) in the test or a fixture it uses.",
        )
    return _databases[-1]
