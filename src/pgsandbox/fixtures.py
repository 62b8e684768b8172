"""The fixtures: ``pg_sandbox`` and ``pg_server`` for the session, ``pg`` and ``pg_conn`` per test."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from pgsandbox.errors import PgSandboxError

if TYPE_CHECKING:
    import psycopg

    from pgsandbox.sandbox import Database, Sandbox
    from pgsandbox.server import Server

MARKER_OPTIONS = ("isolation", "keep_failed")


@pytest.fixture(scope="session")
def pg_sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """The session's server with its templates built: hands out each test's database."""
    from pgsandbox import plugin

    sandbox = plugin.start_sandbox(request.config, request.session)
    try:
        yield sandbox
    finally:
        plugin.stop_sandbox(request.config, sandbox)


@pytest.fixture(scope="session")
def pg_server(pg_sandbox: Sandbox) -> Server:
    """The session's PostgreSQL server: a local throwaway one, or the configured external one.

    ``pg_server.version``, ``.dsn`` (admin, password included: never print it; ``.dsn_redacted``),
    ``.connect(dbname=None)``, ``.create_database(name=None, template=None)``, ``.drop_database(name)``.
    """
    return pg_sandbox.server


@pytest.fixture
def pg(request: pytest.FixtureRequest, pg_sandbox: Sandbox) -> Database:
    """This test's database, migrated and seeded: ``dsn``, ``url()``, ``info``, ``env``, ``connect()``,
    ``execute()``, ``fetch()``. Rolled back (``transaction`` isolation) or dropped (``database``) after the test."""
    return sandbox_database(request, pg_sandbox)


@pytest.fixture
def pg_conn(request: pytest.FixtureRequest, pg_sandbox: Sandbox) -> psycopg.Connection[Any]:
    """A psycopg 3 connection inside the test's isolation (``commit()`` becomes a savepoint in
    ``transaction`` isolation)."""
    return sandbox_database(request, pg_sandbox).connection


def sandbox_database(request: pytest.FixtureRequest, sandbox: Sandbox) -> Database:
    """The test's :class:`Database`, shared by every pgsandbox fixture the test uses. The first fixture to
    ask opens it and closes it at its teardown, which comes after the others' (pytest tears down in
    reverse order). Fixtures call this instead of depending on ``pg``: one fixture less per test."""
    from pgsandbox import plugin

    node = request.node
    db: Database | None = node.stash.get(plugin.DATABASE_KEY, None)
    if db is not None:
        return db
    options = marker_options(node)
    try:
        db = sandbox.open(options.get("isolation"), node.nodeid)
    except PgSandboxError as error:
        pytest.fail(f"pgsandbox: {error}", pytrace=False)
    node.stash[plugin.DATABASE_KEY] = db

    def close() -> None:
        del node.stash[plugin.DATABASE_KEY]
        try:
            findings = sandbox.close(
                db,
                keep=node.stash.get(plugin.KEEP_KEY, False),
                next_test_id=plugin.next_transaction_test(node, sandbox),
            )
        except PgSandboxError as error:
            pytest.fail(f"pgsandbox: {error}", pytrace=False)
        for finding in findings:
            warnings.warn(plugin.PgSandboxWarning(finding), stacklevel=1)

    request.addfinalizer(close)
    return db


def marker_options(node: pytest.Item) -> dict[str, Any]:
    marker = node.get_closest_marker("pg")
    if marker is None:
        return {}
    if marker.args:
        pytest.fail("pgsandbox: @pytest.mark.pg takes keyword options only, such as isolation='database'.")
    unknown = sorted(set(marker.kwargs) - set(MARKER_OPTIONS))
    if unknown:
        pytest.fail(
            f"pgsandbox: @pytest.mark.pg got unknown option(s) {', '.join(unknown)}; "
            f"it takes {', '.join(MARKER_OPTIONS)}.",
            pytrace=False,
        )
    return dict(marker.kwargs)
