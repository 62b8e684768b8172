"""Django under pytest-django on pgsandbox: the example project (examples/django_library) as its users run it,
with no conftest: zero set-up, migrations once into the template, pytest-django's semantics, the report, SQL of a
failed test, the escape guard, the opt-out. Django's settings are process-wide, so each run is a process."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from pgsandbox.template.django import django_settings, schema_value

EXAMPLE = Path(__file__).parent.parent / "examples" / "django_library"
# what production settings hold: a server pgsandbox must not try, with TLS required and a password
PRODUCTION_URL = "postgresql://library:prod-secret@db.invalid:5432/library"

MORE_TESTS = """
import pytest
from django.db import connection

from catalog.models import Author, Genre


@pytest.mark.django_db
def test_fails_showing_its_sql():
    Author.objects.create(name="Octavia Butler")
    assert Genre.objects.filter(name="Horror").exists()


@pytest.mark.django_db
def test_commit_escapes():
    Author.objects.create(name="Escaped")
    connection.connection.commit()


@pytest.mark.django_db
def test_pg_queries_sees_what_django_runs(pg_queries, django_assert_num_queries):
    with pg_queries(2), django_assert_num_queries(2):
        Author.objects.create(name="Counted")
        assert Author.objects.filter(name="Counted").count() == 1


@pytest.mark.django_db
def test_the_projects_driver_as_the_sessions_role():
    assert connection.Database.__name__ == "psycopg2"  # pg_django = psycopg2, though psycopg 3 is installed
    with connection.cursor() as cursor:
        cursor.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        assert cursor.fetchone() == (False,)


@pytest.mark.django_db
def test_after_the_escape_the_database_is_clean():
    assert not Author.objects.filter(name="Escaped").exists()
    assert Genre.objects.filter(name="Drama").exists()  # the changed data migration's
"""


BROKEN_MIGRATION = """
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("catalog", "0004_trigram_search")]
    operations = [migrations.RunSQL("CREATE TABLEX oops (id int)")]
"""


def test_django_settings_replace_the_servers_keys_and_keep_the_apps() -> None:
    params = {"host": "127.0.0.1", "port": 5433, "dbname": "t1", "user": "login", "passfile": "/run/x/passfile"}
    options = {"sslmode": "require", "service": "prod", "server_side_binding": True, "options": "-c search_path=a"}
    entry = django_settings(params, options)
    assert entry["HOST"] == "127.0.0.1" and entry["PORT"] == "5433" and entry["NAME"] == "t1"
    assert entry["USER"] == "login" and entry["PASSWORD"] == ""  # libpq reads the passfile
    kept = {"server_side_binding": True, "options": "-c search_path=a"}
    assert entry["OPTIONS"] == {**kept, "passfile": "/run/x/passfile"}


def test_settings_in_the_hash_are_plain_and_stable() -> None:
    class Anything:
        pass

    value = schema_value({"apps": ("a", "b"), "modules": Anything()})
    assert value == {"apps": ["a", "b"], "modules": f"<{Anything.__qualname__}>"}


def test_djangos_database_fixture_is_set_up_before_pgs() -> None:
    from pgsandbox.pytest.django import django_database_first

    names = ["_django_db_marker", "pg_sandbox", "pg", "request", "transactional_db", "_django_db_helper"]
    django_database_first(names)
    assert names == ["_django_db_marker", "pg_sandbox", "_django_db_helper", "pg", "request", "transactional_db"]
    already = ["_django_db_helper", "db", "pg_conn"]
    django_database_first(already)
    assert already == ["_django_db_helper", "db", "pg_conn"]
    longer = ["pg_module", "pg_login", "db", "_django_db_helper"]  # not a test's database: left in place
    django_database_first(longer)
    assert longer == ["pg_module", "pg_login", "db", "_django_db_helper"]


@pytest.mark.slow
def test_example_project_on_pgsandbox(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, cache_dir: Path, tmp_path: Path
) -> None:
    shutil.copytree(EXAMPLE, pytester.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    # a cache of its own (from the suite's initdb cluster): the snapshot of its templates must outlive the runs
    # below, and the suite's other tests store enough snapshots meanwhile to push it out of the shared one
    for ready in cache_dir.glob("initdb/*/ready"):  # finished: not one another test is writing now
        shutil.copytree(ready.parent, tmp_path / "cache" / "initdb" / ready.parent.name, symlinks=True)
    monkeypatch.setenv("PGSANDBOX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DATABASE_URL", PRODUCTION_URL)
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    # pytest-django back among the plugins, which the suite's other runs leave out (conftest.UNUSED_PLUGINS)
    monkeypatch.setenv("PYTEST_ADDOPTS", os.environ["PYTEST_ADDOPTS"].replace("-p no:django", ""))

    # zero set-up: every alias (DATABASE_URL's default, the replica copied from it) on the sandbox; the
    # migrations run once, into the template
    first = pytester.runpytest_subprocess("-p", "no:randomly")
    first.assert_outcomes(passed=12)
    output = first.stdout.str()
    assert "migrations: django:" in output
    assert "Django's databases on the sandbox, driver psycopg" in output
    assert "migrations template" in output and "(django:): cache miss, built" in output
    assert "tests: 12 (database 3, transaction 9)" in output  # transaction=True: a clone each
    assert "findings: none" in output
    assert "prod-secret" not in output

    # xdist: one server, a database per worker; the template from the cache, also for the project elsewhere
    shutil.copytree(EXAMPLE, pytester.path / "elsewhere", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(pytester.path / "elsewhere")
    second = pytester.runpytest_subprocess("-p", "no:randomly", "-n", "2")
    # Django's own runner (TEST_RUNNER in the example's settings): the same server and template cache
    runner = pytester.run(sys.executable, "manage.py", "test")
    assert runner.ret == 0, runner.stderr.str()
    assert "cache hit, from the cached cluster, nothing to migrate" in runner.stderr.str()
    assert "Ran 5 tests" in runner.stderr.str() and "OK" in runner.stderr.str()
    monkeypatch.chdir(pytester.path)
    shutil.rmtree(pytester.path / "elsewhere")  # its tests package would shadow this one's
    second.assert_outcomes(passed=12)
    assert "cache hit, from the cached cluster, nothing to migrate" in second.stdout.str()
    assert "tests: 12 (database 3, transaction 9)" in second.stdout.str()

    # a changed migration rebuilds the template; a failed test shows its SQL; a COMMIT that escapes Django's
    # rollback is found, and the next test starts clean
    data_migration = pytester.path / "catalog/migrations/0003_seed_genres.py"
    data_migration.write_text(data_migration.read_text().replace('"Science"]', '"Science", "Drama"]'))
    (pytester.path / "tests/test_more.py").write_text(MORE_TESTS)
    third = pytester.runpytest_subprocess("-p", "no:randomly", "--pg-django=psycopg2", "tests/test_more.py")
    third.assert_outcomes(passed=4, failed=1, errors=1)
    output = third.stdout.str()
    assert "(django:): cache miss, built" in output
    assert "SQL of call" in output
    assert """INSERT INTO "catalog_author" ("name") VALUES ('Octavia Butler')""" in output
    assert """FROM "catalog_genre" WHERE "catalog_genre"."name" = 'Horror'""" in output
    assert "driver psycopg2" in output
    assert "the transaction of its Django 'default' connection was ended by a COMMIT" in output
    assert "findings: commits that escaped the rollback 1" in output

    # a migration that fails: the message names it and PostgreSQL's error
    (pytester.path / "catalog/migrations/0005_broken.py").write_text(BROKEN_MIGRATION)
    broken = pytester.runpytest_subprocess("-p", "no:randomly", "tests/test_catalog.py", "-k", "seeded_genres")
    broken.assert_outcomes(errors=1)
    broken.stdout.fnmatch_lines(
        ["*django:: `manage.py migrate` failed in catalog.0005_broken: ProgrammingError: *syntax error*"]
    )
    (pytester.path / "catalog/migrations/0005_broken.py").unlink()

    # the opt-out: pytest-django makes its own test database where the settings say
    off = pytester.runpytest_subprocess(
        "-p", "no:randomly", "--pg-django=off", "tests/test_catalog.py", "-k", "seeded_genres"
    )
    off.assert_outcomes(errors=1)
    assert "db.invalid" in off.stdout.str()
    assert "prod-secret" not in off.stdout.str()


SHOP = Path(__file__).parent / "projects" / "django_shop"


@pytest.mark.slow
def test_django_shop_project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """One run of tests/projects/django_shop (its tests check each point themselves; some fail on purpose):
    pg.insert/execute/fetch in Django's transaction and rolled back with it (both isolations), keep-failed
    keeping what a failed django_db test wrote (both isolations), serialized_rollback, pg asked for before
    transactional_db, django_db_blocker in a module fixture, reset_sequences, --nomigrations, Django's own test classes
    counted and their SQL shown, and an app a router migrates on a second alias present in the template."""
    shutil.copytree(SHOP, pytester.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("DATABASE_URL", PRODUCTION_URL)
    monkeypatch.setenv("LEDGER_URL", PRODUCTION_URL.replace("library", "ledger"))
    monkeypatch.delenv("DJANGO_SETTINGS_MODULE", raising=False)
    monkeypatch.setenv("PYTEST_ADDOPTS", os.environ["PYTEST_ADDOPTS"].replace("-p no:django", ""))
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    output = result.stdout.str()
    failed = {"test_fails_and_keeps_its_database", "test_transactional_fails_and_keeps_its_database"}
    failed.add("CustomerTests::test_fails_showing_its_sql")
    assert {line.split("::", 1)[1].split(" ")[0] for line in output.splitlines() if line.startswith("FAILED")} == failed
    result.assert_outcomes(passed=12, failed=3, skipped=1)
    assert "tests: 15 (database 6, django unittest 3, transaction 6)" in output
    assert "driver psycopg2" in output  # pg.insert on Django's psycopg2 connection (psycopg 3: the example's)
    # the failed unittest's SQL, Django's own rollback included
    assert """INSERT INTO "shop_customer" ("name") VALUES ('unittest-made')""" in output
    assert output.count("the database of this test is kept as") == 2  # their rows: test_zz_kept.py
    assert "prod-secret" not in output
    # --nomigrations: a template of its own, its tables made from the models
    nomigrations = pytester.runpytest_subprocess("-p", "no:randomly", "--nomigrations", "-k", "nomigrations")
    nomigrations.assert_outcomes(passed=1)
    assert "(django: (--nomigrations)): cache miss, built" in nomigrations.stdout.str()
