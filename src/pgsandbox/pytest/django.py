"""pytest-django on pgsandbox, with nothing in the project's conftest.

When pytest-django runs with Django settings whose ``DATABASES`` has a PostgreSQL alias (and ``pg_django`` is
not ``off``), two of its fixtures are replaced by a plugin registered after it (a later plugin's fixture of the
same name wins; a conftest's still wins over both):

- ``django_db_setup``: no test database of Django's own. A ``django:`` migrator (added first to
  ``pg_migrations`` unless the project names one) has run ``migrate`` into the template; every PostgreSQL alias
  points at the session's own database (``pg_login``: the tests' role, not the superuser), for what runs outside
  a test (Django's unittest classes, session fixtures).
- ``_django_db_helper`` (what ``django_db``, ``db`` and ``transactional_db`` go through): the test gets a
  pgsandbox database, like ``pg``, and every alias points at it with the test's ``application_name``. A
  ``TestCase`` test runs in ``pg_isolation`` (``transaction``: Django's connection is a guest on the session
  database, Django's atomic blocks roll it back, and a savepoint of pgsandbox's inside Django's transaction
  tells an escaped ``COMMIT``); a ``transaction=True`` test gets ``database`` isolation, a clone that is dropped,
  so Django's flush is skipped. So pgsandbox counts these tests, shows a failed one's SQL and runs its guards.
  ``pg.execute``/``fetch``/``insert`` run on Django's connection of the test (``TestInternals.borrowed``), in
  its transaction; under keep-failed a failed test's Django transaction is committed, not rolled back.

Django's own test classes collected by pytest run on the session's database as pytest-django runs them; they are
counted (``django unittest``) and a failed one's SQL is shown (``Sandbox.watch``). Django's database fixture is
set up before pgsandbox's per-test fixtures, whatever the order of a test's arguments.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from pgsandbox.errors import PgSandboxError, with_link
from pgsandbox.pytest import state
from pgsandbox.pytest.fixtures import fail, sandbox_database

if TYPE_CHECKING:
    from pgsandbox.sandbox import Sandbox
    from pgsandbox.template.base import Migrator

PLUGIN_NAME = "pgsandbox-django"


def choose_driver(early_config: pytest.Config) -> None:
    """Before pytest-django sets Django up (``django.setup()`` may load the PostgreSQL backend): load it with the
    project's driver (``pg_django``: auto, psycopg or psycopg2), when pytest-django runs with a settings
    module."""
    import os

    from pgsandbox.settings import BY_NAME, Settings

    if not early_config.pluginmanager.hasplugin("django"):
        return
    known = early_config.known_args_namespace
    try:
        named = getattr(known, "ds", None) or os.environ.get("DJANGO_SETTINGS_MODULE")
        named = named or early_config.getini("DJANGO_SETTINGS_MODULE")
        ini = early_config.getini(BY_NAME["django"].ini)
    except ValueError:
        return
    if not named or importlib.util.find_spec("django") is None:
        return
    try:
        options = Settings.from_sources(cli={"django": getattr(known, "pg_django", None)}, ini={"django": ini})
    except PgSandboxError:
        return  # said in full by pytest_configure
    if options.django == "off":
        return
    from pgsandbox.template.django import project_driver, use_driver

    driver = project_driver() if options.django == "auto" else options.django
    try:
        use_driver(driver, options.source_of("django"))
    except PgSandboxError as error:
        raise pytest.UsageError(f"pgsandbox: {with_link(error)}") from None


def header(config: pytest.Config) -> list[str]:
    """What the report header says of Django, when pgsandbox runs it."""
    if not config.pluginmanager.has_plugin(PLUGIN_NAME):
        return []
    from pgsandbox.template.django import driver_of_django

    return [f"pgsandbox: Django's databases on the sandbox, driver {driver_of_django()} (pg_django)"]


def configure(config: pytest.Config) -> None:
    """Register the fixtures when pytest-django is active, its settings are configured and name a PostgreSQL
    database, and ``pg_django`` is not ``off``; add the ``django:`` migrator unless ``pg_migrations`` has one."""
    if not config.pluginmanager.hasplugin("django") or state.settings(config).django == "off":
        return
    try:
        from django.conf import settings as django_settings
    except ImportError:
        return
    if not django_settings.configured:
        return
    from pgsandbox.template.django import postgres_aliases

    if not postgres_aliases():
        return  # SQLite and others: pytest-django as it is
    import sys

    config.pluginmanager.register(sys.modules[__name__], PLUGIN_NAME)
    if not any(spec.startswith("django:") for spec in state.settings(config).migrations):
        use_migrations = not config.getoption("nomigrations", False)
        config.stash[state.EXTRA_MIGRATIONS_KEY] = [unblocked_migrator(config, use_migrations)]


def unblocked_migrator(config: pytest.Config, use_migrations: bool) -> Migrator:
    """The ``django:`` migrator, run with database access allowed: pytest-django blocks it outside ``django_db``
    tests, and the template's build is not one. (Made here, not at import: the template layer imports psycopg,
    which a run without Django need not pay for.)"""
    from pgsandbox.template.base import Target
    from pgsandbox.template.django import DjangoMigrator

    class UnblockedMigrator(DjangoMigrator):
        def migrate(self, target: Target) -> None:
            from pytest_django.plugin import blocking_manager_key

            blocker = config.stash.get(blocking_manager_key, None)
            with blocker.unblock() if blocker is not None else contextlib.nullcontext():
                super().migrate(target)

    return UnblockedMigrator("", config.rootpath, use_migrations)


def _backend_pid(connection: Any) -> int:
    """psycopg 3 and psycopg2 both say it in ``info``."""
    return int(connection.connection.info.backend_pid)


@pytest.fixture(scope="session")
def django_db_setup(django_test_environment: None, django_db_blocker: Any, pg_sandbox: Sandbox) -> Iterator[None]:
    """Every PostgreSQL alias on the session's own database (migrated in the template, owned by the tests'
    role); no test database is created, no migration runs here."""
    from pgsandbox.template.django import point_aliases, postgres_aliases

    try:
        login = pg_sandbox.session_login()
    except PgSandboxError as error:
        fail(error)
    with django_db_blocker.unblock():
        restore = point_aliases(login.params, postgres_aliases())
    try:
        yield
    finally:
        with django_db_blocker.unblock():
            restore()


@pytest.fixture
def _django_db_helper(
    request: pytest.FixtureRequest, django_db_setup: None, django_db_blocker: Any, pg_sandbox: Sandbox
) -> Iterator[None]:
    """pytest-django's, with the test's database from pgsandbox (see the module's docstring)."""
    from pytest_django.django_compat import is_django_unittest
    from pytest_django.fixtures import _get_databases_for_test, validate_django_db

    if is_django_unittest(request):
        yield
        return
    marker = request.node.get_closest_marker("django_db")
    transactional, reset_sequences, databases, serialized_rollback, available_apps = (
        validate_django_db(marker) if marker else (False, False, None, False, None)
    )
    transactional = (
        transactional or reset_sequences or bool({"transactional_db", "live_server"} & set(request.fixturenames))
    )
    reset_sequences = reset_sequences or "django_db_reset_sequences" in request.fixturenames
    serialized_rollback = serialized_rollback or "django_db_serialized_rollback" in request.fixturenames

    db = sandbox_database(request, pg_sandbox, "database" if transactional else None)

    import django.test
    from django.db import DEFAULT_DB_ALIAS, connections

    from pgsandbox.template.django import point_aliases, postgres_aliases

    aliases = postgres_aliases()
    used = [alias for alias in _get_databases_for_test(request.node)[0] if alias in aliases]
    base = django.test.TransactionTestCase if transactional else django.test.TestCase
    dropped = db.isolation == "database"  # a clone: Django's flush at the end is wasted work

    class PgSandboxDjangoTestCase(base):  # type: ignore[misc,valid-type]
        pass

    PgSandboxDjangoTestCase.reset_sequences = reset_sequences
    PgSandboxDjangoTestCase.serialized_rollback = serialized_rollback
    if databases is not None:
        PgSandboxDjangoTestCase.databases = databases
    if available_apps is not None:
        PgSandboxDjangoTestCase.available_apps = available_apps
    if not transactional:
        # as pytest-django: TestCase's class set-up (setUpTestData, closing connections) is not used
        PgSandboxDjangoTestCase.setUpClass = classmethod(lambda cls: super(django.test.TestCase, cls).setUpClass())
        PgSandboxDjangoTestCase.tearDownClass = classmethod(
            lambda cls: super(django.test.TestCase, cls).tearDownClass()
        )
    elif dropped:
        PgSandboxDjangoTestCase._fixture_teardown = lambda self: None

    from pgsandbox.isolation.guests import SAVEPOINT, literal
    from pgsandbox.server.tags import INTERNAL

    marked: list[str] = []  # aliases whose transaction holds pgsandbox's savepoint
    # transaction isolation: Django's connections to the session database serve the next test too (a connect
    # and Django's set-up of it cost more than the test itself), parked like the drivers' between tests
    reused = [alias for alias in used if _unpark(db, alias)]
    parked: list[str] = []
    with django_db_blocker.unblock():  # for the test too, as pytest-django's
        restore = point_aliases(db.params, aliases, {"application_name": db.application_name}, keep=reused)
        try:
            for alias in used:  # now, not in the test: a backend that comes later looks like a leak
                if alias in reused:
                    with connections[alias].connection.cursor() as cursor:
                        cursor.execute(f"{INTERNAL}SET application_name = {literal(db.application_name)}")
                else:
                    connections[alias].ensure_connection()
                    db._test.joined(_backend_pid(connections[alias]))
            PgSandboxDjangoTestCase.setUpClass()
            test_case = PgSandboxDjangoTestCase(methodName="__init__")
            if not getattr(PgSandboxDjangoTestCase, "_pre_setup_ran_eagerly", False):
                test_case._pre_setup()
            if not transactional and db.isolation == "transaction":
                for alias in used:
                    with connections[alias].connection.cursor() as cursor:
                        cursor.execute(f"{INTERNAL}SAVEPOINT {SAVEPOINT}")
                    marked.append(alias)
            if used:  # pg.execute, fetch and insert write where the ORM reads: in Django's transaction
                db._test.borrowed = _raw_connection(DEFAULT_DB_ALIAS if DEFAULT_DB_ALIAS in used else used[0])
            yield
            db._test.borrowed = None
            if db.keep:  # a failed test under keep-failed: its database is kept with what it wrote
                for alias in marked:
                    connections[alias].connection.commit()
                escaped = list(used)  # not parked: the kept database is renamed, a new one made
            else:
                escaped = [alias for alias in marked if not _roll_back_to_savepoint(db, alias)]
            test_case._post_teardown()
            PgSandboxDjangoTestCase.tearDownClass()
            PgSandboxDjangoTestCase.doClassCleanups()
            if db.isolation == "transaction":
                parked = [alias for alias in used if alias not in escaped and _park(db, alias)]
        finally:
            db._test.borrowed = None
            restore(keep=parked)  # closes the others before pgsandbox ends the test


def _raw_connection(alias: str) -> Callable[[], Any]:
    """Django's DB-API connection of ``alias`` (psycopg or psycopg2), connected if it was not."""
    from django.db import connections

    def raw() -> Any:
        connections[alias].ensure_connection()
        return connections[alias].connection

    return raw


# pgsandbox's fixtures of one test's database (the others last longer than a test)
_LONGER_THAN_A_TEST = frozenset(
    ("pg_sandbox", "pg_server", "pg_login", "pg_module", "pg_class", "pg_package", "pg_session_data")
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that asks for ``pg`` (or another per-test fixture of pgsandbox's) before ``transactional_db``,
    ``live_server`` or ``db`` gets Django's database first: the first fixture to ask opens the test's database,
    and only Django's knows it needs ``database`` isolation (``def test(pg, transactional_db)`` would otherwise run
    a transactional test in a transaction, and its commits would escape)."""
    for item in items:
        names: list[str] | None = getattr(item, "fixturenames", None)
        if names:
            django_database_first(names)


def django_database_first(names: list[str]) -> None:
    """Move pytest-django's ``_django_db_helper`` (what ``db``, ``transactional_db`` and ``live_server`` go
    through) before the first per-test fixture of pgsandbox's in ``names``, a test's fixtures in setup order."""
    if "_django_db_helper" not in names:
        return
    helper = names.index("_django_db_helper")
    ours = [index for index, name in enumerate(names[:helper]) if name.startswith("pg")]
    first = next((index for index in ours if names[index] not in _LONGER_THAN_A_TEST), None)
    if first is not None:
        names.insert(first, names.pop(helper))


UNITTEST_KIND = "django unittest"  # what the report counts Django's own test classes as


@pytest.fixture(autouse=True)
def _pgsandbox_django_unittest(request: pytest.FixtureRequest) -> None:
    """Django's own test classes collected by pytest (``TestCase``, ``TransactionTestCase``) run as
    pytest-django runs them, on the session's database with Django's isolation (a class-wide transaction, or a
    flush): pgsandbox counts them in the report and shows the SQL of a failed one."""
    from pytest_django.django_compat import is_django_unittest

    if not is_django_unittest(request) or not getattr(request.cls, "databases", None):
        return  # a SimpleTestCase: no database
    sandbox: Sandbox = request.getfixturevalue("pg_sandbox")
    try:
        dbname = sandbox.session_login().dbname
    except PgSandboxError as error:
        fail(error)
    request.node.stash[state.LOG_KEY] = sandbox.watch(request.node.nodeid, dbname, UNITTEST_KIND)


def _unpark(db: Any, alias: str) -> bool:
    """Whether Django's connection of ``alias``, parked by the previous test, serves this one."""
    from django.db import connections

    raw = db._test.unpark(f"django {alias}")
    return raw is not None and connections[alias].connection is raw


def _park(db: Any, alias: str) -> bool:
    """Keep Django's connection of ``alias`` open for the next test, when it is idle and healthy."""
    from django.db import connections

    connection = connections[alias]
    raw = connection.connection
    if raw is None or connection.in_atomic_block or not connection.get_autocommit() or not connection.is_usable():
        return False

    def close() -> bool:
        if connections[alias].connection is raw:
            connections[alias].close()
        else:
            raw.close()
        return True

    return bool(db._test.park(f"django {alias}", raw, _backend_pid(connection), close))


def _roll_back_to_savepoint(db: Any, alias: str) -> bool:
    """The savepoint is gone when a ``COMMIT`` replaced Django's transaction: the test's writes escaped."""
    from django.db import connections

    from pgsandbox.isolation.guests import SAVEPOINT
    from pgsandbox.server.tags import INTERNAL

    raw = connections[alias].connection
    try:
        with raw.cursor() as cursor:
            cursor.execute(f"{INTERNAL}ROLLBACK TO SAVEPOINT {SAVEPOINT}")
    except Exception:
        db._test.escaped(f"Django {alias!r}")
        raw.rollback()
        return False
    return True


def start(config: pytest.Config) -> None:
    """For the plugin's ``pytest_configure``: a configuration error is a usage error."""
    try:
        configure(config)
    except PgSandboxError as error:
        raise pytest.UsageError(f"pgsandbox: {with_link(error)}") from None
