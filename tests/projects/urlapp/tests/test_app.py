"""The app as it runs: settings from DATABASE_URL, a wait for the port, its own connections, its migrations."""

from __future__ import annotations

import time

import pytest
from urlapp import db
from urlapp.settings import Settings


def test_the_settings_take_host_and_port_from_the_url(pg, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", pg.database_url)
    settings = Settings.from_env()
    assert (settings.db_host, settings.db_port, settings.db_name) == ("127.0.0.1", pg.info.port, pg.name)
    assert settings.db_user == pg.params["user"]


@pytest.mark.pg(isolation="database")
def test_the_app_waits_for_its_port_then_writes_with_its_own_connection(pg, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", pg.database_url)
    monkeypatch.setenv("PGPASSFILE", pg.passfile)  # the app takes the password out of the URL: there is none
    settings = Settings.from_env()
    db.wait_for_database(settings, timeout=5)
    note = db.add_note(settings, "hello")
    assert pg.fetchone("select id, body from notes") == {"id": note, "body": "hello"}


def test_the_migrations_ran_through_the_ini_interpolation(pg):
    assert pg.fetchval("select version_num from alembic_version") == "0001"
    assert pg.fetchval("select count(*) from notes") == 0


def test_a_session_fixture_wrote_as_the_tests_role_in_its_own_database(pg, pg_login, pg_server, reference_note):
    assert pg_login.params["user"] == pg.params["user"] != pg_server.params["user"]  # the tests' role, not the admin
    assert pg_login.dbname != pg.name
    with pg_login.connect() as conn:
        assert conn.execute("select body from notes where id = %s", [reference_note]).fetchone() == ("reference",)
    assert pg.fetchval("select count(*) from notes") == 0  # the test's own database does not see it
    settings = Settings.from_env({"DATABASE_URL": pg_login.database_url})
    assert (settings.db_host, settings.db_port, settings.db_name) == ("127.0.0.1", pg.info.port, pg_login.dbname)


def test_a_worker_process_of_the_session_takes_jobs(pg_login, worker):
    with pg_login.connect(autocommit=True) as conn:
        job = conn.execute("insert into jobs (name) values ('send mail') returning id").fetchone()[0]
        done_by = wait_until(lambda: conn.execute("select done_by from jobs where id = %s", [job]).fetchone()[0])
    assert done_by == f"{pg_login.user}@{pg_login.dbname}"
    assert worker.poll() is None


def wait_until(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return result
