"""The fixtures: ``pg_server`` for now; per-test databases come with the template issue."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from pgsandbox.errors import PgSandboxError

if TYPE_CHECKING:
    from pgsandbox.server import Server


@pytest.fixture(scope="session")
def pg_server(request: pytest.FixtureRequest) -> Iterator[Server]:
    """The session's PostgreSQL server: a local throwaway one, or the configured external one.

    ``pg_server.version``, ``.dsn`` (admin, password included: never print it; ``.dsn_redacted``),
    ``.connect(dbname=None)``, ``.create_database(name=None, template=None)``, ``.drop_database(name)``.
    """
    from pgsandbox.plugin import progress_writer, settings
    from pgsandbox.server import start_server

    try:
        server = start_server(settings(request.config), progress_writer(request.config))
    except PgSandboxError as error:
        pytest.fail(f"pgsandbox: {error}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()
