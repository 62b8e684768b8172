from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_loading_the_plugin_does_not_import_psycopg() -> None:
    """Every pytest run loads the plugin; only a run that uses the database pays for the driver."""
    code = "import sys, pgsandbox.pytest.plugin; print('psycopg' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_a_run_without_a_database_test_imports_neither_the_driver_nor_the_server(pytester: pytest.Pytester) -> None:
    """The start-up checks (pg_migrations_inputs' globs among them) run in every pytest run; the template package
    they once imported brought psycopg and the server along, about 0.2 s of every run, database or not."""
    pytester.makepyfile(
        "import sys\n"
        "def test_plain():\n"
        "    heavy = [m for m in ('psycopg', 'pgsandbox.server', 'pgsandbox.template') if m in sys.modules]\n"
        "    assert heavy == []\n"
    )
    result = pytester.runpytest_subprocess("--pg-migrations-inputs=dta/*.csv", "-p", "no:randomly")
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*pg_migrations_inputs: 'dta/*.csv' matches no file under *"])


@pytest.mark.slow
def test_a_database_session_imports_only_what_its_options_use(pytester: pytest.Pytester) -> None:
    """Every session's start-up pays for what it imports: the other migrators, Django's integration, database and
    schema isolation and the escape analysis load only in the sessions that use them."""
    (pytester.path / "migrations").mkdir()
    (pytester.path / "migrations/1.sql").write_text("create table t (id int);\n")
    pytester.makepyfile(
        "import os, sys\n"
        "def test_db(pg):\n"
        "    assert pg.fetchval('select count(*) from t') == 0\n"
        "    unused = ['pgsandbox.template.' + m for m in ('alembic', 'django', 'python', 'sqlalchemy', 'schemas')]\n"
        "    unused += ['pgsandbox.pytest.django', 'pgsandbox.isolation.database', 'pgsandbox.isolation.schema']\n"
        "    unused += ['pgsandbox.isolation.changes']\n"
        "    unused += ['psutil'] if os.path.exists('/proc/self/stat') else []  # (its fallback without /proc)\n"
        "    assert [m for m in unused if m in sys.modules] == []\n"
    )
    result = pytester.runpytest_subprocess("--pg-migrations=sql:migrations", "-p", "no:randomly")
    result.assert_outcomes(passed=1)


def test_public_names_resolve_on_first_use() -> None:
    import pgsandbox

    assert pgsandbox.Settings().server == "auto"
    assert pgsandbox.start_server.__module__ == "pgsandbox.server"
    try:
        pgsandbox.no_such_name  # noqa: B018
    except AttributeError as error:
        assert "has no attribute 'no_such_name'" in str(error)
    else:
        raise AssertionError("unknown names must raise AttributeError")


@pytest.mark.slow
def test_the_factory_boy_helpers_import_factory_boy_only_for_table_factory() -> None:
    """pg and pg_session load pgsandbox.drivers.factoryboy in every test; factory_boy (with Faker) loads only
    when a test module takes TableFactory."""
    code = (
        "import sys, pgsandbox.drivers.factoryboy as fb; before = 'factory' in sys.modules; fb.TableFactory; "
        "print(before, 'factory' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False True"


@pytest.mark.slow
def test_every_public_name_resolves_and_is_listed() -> None:
    """What users annotate and catch comes from the package itself, each name from its module, lazily: listing
    the names imports nothing."""
    import pgsandbox

    code = "import sys, pgsandbox; dir(pgsandbox); print('psycopg' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    for name in pgsandbox.__all__:
        value = getattr(pgsandbox, name)
        assert name in dir(pgsandbox)
        if isinstance(value, type):
            assert value.__name__ == name and value.__module__.startswith("pgsandbox.")
    for name in ["Queries", "Recorded", "IsolationError", "PgSandboxWarning", "Migrator", "Target"]:
        assert name in pgsandbox.__all__
    for name in ["MigrationError", "ConnectionInfo", "ServerGone", "ConfigError", "MissingExtra"]:
        assert name in pgsandbox.__all__
    errors = [getattr(pgsandbox, name) for name in pgsandbox.__all__ if name.endswith(("Error", "Gone"))]
    assert all(issubclass(error, pgsandbox.PgSandboxError) for error in errors)


def test_binary_discovery_is_found_in_its_module_and_still_resolves_from_the_package() -> None:
    import pgsandbox
    from pgsandbox import binaries

    for name in ["Installation", "find_installations", "select_installation"]:
        assert name not in pgsandbox.__all__
        assert getattr(pgsandbox, name) is getattr(binaries, name)
