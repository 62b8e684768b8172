"""factory_boy factories that write with the running test's SQLAlchemy session (extra ``[factoryboy]``).

Point a factory at the test's session once, in its ``Meta``::

    import factory
    from pgsandbox.drivers.factoryboy import session

    class UserFactory(factory.alchemy.SQLAlchemyModelFactory):
        class Meta:
            model = User
            sqlalchemy_session_factory = session  # the running test's pg_session
            sqlalchemy_session_persistence = "flush"

``UserFactory()`` then inserts through ``pg_session`` (rolled back with the test); pytest-factoryboy's
``register(UserFactory)`` works the same. In async tests the same factories run inside
``pg_async_session``: ``user = await create(UserFactory, name="ada")`` (or ``create_batch``).

Without models, ``TableFactory`` names a table and leaves every column it does not declare to ``pg.insert``,
which makes them up from the schema; its rows are dicts whose values also read as attributes::

    class AuthorFactory(TableFactory):
        class Meta:
            model = "author"  # the table
        name = factory.Sequence(lambda n: f"author{n}")

    class BookFactory(TableFactory):
        class Meta:
            model = "book"
        class Params:
            author = factory.SubFactory(AuthorFactory)
        author_id = factory.SelfAttribute("author.id")

This module imports factory_boy only for ``TableFactory``: it hands sessions out, factory_boy does the rest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from pgsandbox.drivers.running_test import Row, database
from pgsandbox.drivers.running_test import enter_test as enter_test  # the fixtures register the test's database
from pgsandbox.drivers.running_test import leave_test as leave_test
from pgsandbox.errors import PgSandboxError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

    from pgsandbox.drivers.table_factory import TableFactory as TableFactory  # for type checkers: see __getattr__

__all__ = ["Row", "create", "create_batch", "database", "session"]  # and TableFactory, imported on first use

T = TypeVar("T")

# Module state, not context variables: pytest-asyncio runs fixtures and tests in tasks of their own, and
# a context variable set in a fixture's task would not be seen by the test's.
_sessions: list[Session] = []
_async_sessions: list[AsyncSession] = []


def session() -> Session:
    """The running test's ``pg_session`` (for ``Meta.sqlalchemy_session_factory``)."""
    if _sessions:
        return _sessions[-1]
    if _async_sessions:
        raise PgSandboxError(
            "a factory ran outside the async session: this test uses pg_async_session, whose session "
            "cannot flush from synchronous code.",
            "create rows with `await pgsandbox.drivers.factoryboy.create(MyFactory, ...)` (or create_batch).",
        )
    raise PgSandboxError(
        "a factory asked for the test's SQLAlchemy session, but this test has no pg_session.",
        "request pg_session in the test or a fixture it uses, or mark the module: "
        "pytestmark = pytest.mark.usefixtures('pg_session').",
    )


@contextlib.contextmanager
def using(sync_session: Session) -> Iterator[None]:
    """Make ``sync_session`` the one factories use while the block runs (the pg_session fixture does)."""
    _sessions.append(sync_session)
    try:
        yield
    finally:
        _sessions.remove(sync_session)


@contextlib.contextmanager
def using_async(async_session: AsyncSession) -> Iterator[None]:
    _async_sessions.append(async_session)
    try:
        yield
    finally:
        _async_sessions.remove(async_session)


def _async_session() -> AsyncSession:
    if not _async_sessions:
        raise PgSandboxError(
            "pgsandbox.drivers.factoryboy.create() needs the test's pg_async_session, and this test has none.",
            "request pg_async_session in the test (in a sync test, call the factory directly with pg_session).",
        )
    return _async_sessions[-1]


async def _run(work: Callable[[], T]) -> T:
    """Run factory code on the async session's sync twin, in SQLAlchemy's greenlet, where it can flush."""

    def in_greenlet(sync_session: Session) -> T:
        with using(sync_session):
            return work()

    return await _async_session().run_sync(in_greenlet)


async def create(factory: Any, **kwargs: Any) -> Any:
    """``factory(**kwargs)`` in an async test: the row (and its SubFactory parents) through pg_async_session."""
    return await _run(lambda: factory.create(**kwargs))


async def create_batch(factory: Any, size: int, **kwargs: Any) -> list[Any]:
    return await _run(lambda: list(factory.create_batch(size, **kwargs)))


# -- TableFactory: factory_boy on pg.insert ------------------------------------------------------------------
def __getattr__(name: str) -> Any:
    if name == "TableFactory":
        # its module imports factory_boy: loaded only here, when a test module asks for the class
        from pgsandbox.drivers.table_factory import TableFactory

        return TableFactory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
