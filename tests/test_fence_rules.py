"""The connection fence's rules, without a server: where a connection goes (resolved as libpq does), what may be
reached, what a refusal says, the libpq environment it sets and puts back. test_fence.py has the real servers."""

from __future__ import annotations

import os
from typing import NamedTuple

import psycopg
import pytest

from pgsandbox import ConfigError, ConnectionFenced, PgSandboxWarning, Settings
from pgsandbox.common.connect_hooks import (
    Allowed,
    Endpoint,
    Target,
    _asyncpg_target,
    conninfo_params,
    parse_allowed,
    resolve,
    same_host,
)
from pgsandbox.isolation import fence
from pgsandbox.isolation.fence import Fence

PROD = Endpoint("10.1.2.3", 5432)


class AsyncpgParams(NamedTuple):  # what asyncpg's _parse_connect_arguments gives, in part
    database: str
    user: str


def target(*endpoints: Endpoint, library: str = "psycopg", **fields: object) -> Target:
    return Target(endpoints or (PROD,), "proddb", "app", library, psycopg.OperationalError, **fields)  # type: ignore[arg-type]


def test_the_target_is_resolved_as_libpq_does() -> None:
    url = conninfo_params("postgresql://app:pw@h1:6000,h2/shop")
    assert resolve(url, env={}).endpoints == (Endpoint("h1", 6000), Endpoint("h2", 5432))
    assert resolve(url, env={}).describe() == "database 'shop' on h1:6000, h2:5432 as app"
    from_env = resolve({}, env={"PGHOST": "db", "PGPORT": "7000", "PGUSER": "u", "PGDATABASE": "d"})
    assert (from_env.endpoints, from_env.dbname, from_env.user) == ((Endpoint("db", 7000),), "d", "u")
    assert resolve({"user": "u"}, env={}).dbname == "u"  # libpq's default database: the user's name
    assert resolve({"host": "name", "hostaddr": "10.0.0.1", "port": "5"}, env={}).endpoints == (
        Endpoint("10.0.0.1", 5),
    )
    assert resolve(conninfo_params("host=/run/pg port=6001"), env={}).endpoints == (Endpoint("/run/pg", 6001),)
    assert resolve({}, env={}).endpoints[0].is_socket  # the default Unix socket
    assert "pw" not in repr(resolve(url, env={}))  # no password in a target


def test_asyncpg_addresses_and_sockets() -> None:
    found = _asyncpg_target([("127.0.0.1", 6000), "/run/pg/.s.PGSQL.6001"], AsyncpgParams("shop", "app"))
    assert found.endpoints == (Endpoint("127.0.0.1", 6000), Endpoint("/run/pg", 6001))
    assert (found.dbname, found.user, found.connection_error) == ("shop", "app", ConnectionRefusedError)


def test_allowed_endpoints_and_hosts() -> None:
    assert parse_allowed("127.0.0.1:5433") == Allowed("127.0.0.1", 5433)
    assert parse_allowed("db.internal") == Allowed("db.internal", None)
    assert parse_allowed("[::1]:5432") == Allowed("::1", 5432)
    assert parse_allowed("/run/postgresql:5432") == Allowed("/run/postgresql", 5432)
    assert str(Endpoint("::1", 5432)) == "[::1]:5432"
    for bad in ("", "db:port", ":5432", "db:70000"):
        with pytest.raises(ValueError):
            parse_allowed(bad)
    assert same_host("localhost", "127.0.0.1") and same_host("::1", "127.0.0.1")
    assert same_host("/tmp", "/tmp/") and not same_host("/tmp", "127.0.0.1")
    assert not same_host("10.1.2.3", "10.1.2.4")
    assert Allowed("10.1.2.3").matches(PROD) and not Allowed("10.1.2.3", 5433).matches(PROD)


def test_a_bad_allowed_endpoint_says_what_the_option_takes() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_sources(env={"PGSANDBOX_FENCE_ALLOW": "db:port"})
    message = str(caught.value)
    assert (
        "PGSANDBOX_FENCE_ALLOW: bad value 'db:port': 'db:port': the port must be a number from 1 to 65535." in message
    )
    assert "What to do: fix PGSANDBOX_FENCE_ALLOW; --pg-fence-allow takes: servers the connection fence" in message


@pytest.fixture
def session_fence() -> object:
    installed = Fence("error").install()
    installed.allow_endpoints([Endpoint("127.0.0.1", 6000), Endpoint("/run/sandbox", 6000)])
    yield installed
    installed.remove()


def test_refused_with_the_librarys_error_and_a_message(session_fence: Fence) -> None:
    session_fence.check(target(Endpoint("localhost", 6000)))  # the sandbox, by another name
    session_fence.check(target(Endpoint("/run/sandbox", 6000)))  # pgsandbox's own socket
    session_fence.enter_test("tests/test_app.py::test_checkout")
    with pytest.raises(psycopg.OperationalError) as caught:
        session_fence.check(target(Endpoint("127.0.0.1", 6000), PROD))  # libpq would try both
    error = caught.value
    assert isinstance(error, ConnectionFenced) and error.test == "tests/test_app.py::test_checkout"
    assert str(error) == (
        "pgsandbox's connection fence refused a connection through psycopg to database 'proddb' on 127.0.0.1:6000, "
        "10.1.2.3:5432 as app, made by the test tests/test_app.py::test_checkout. While pgsandbox's session runs, "
        "tests and migrations may reach only the sandbox's server (127.0.0.1:6000, /run/sandbox:6000), so that no "
        "test changes a real database.\n  What to do: if it was meant for the sandbox, connect where pgsandbox "
        "points (pg.dsn, pg.url(), pg.env, or the PGHOST/PGPORT/PGDATABASE environment it sets while a test runs). "
        "If this test must reach that server, allow it: pg_fence_allow = 10.1.2.3:5432 (ini; --pg-fence-allow "
        "10.1.2.3:5432, env PGSANDBOX_FENCE_ALLOW), or for one test @pytest.mark.pg(fence_allow=['10.1.2.3:5432']); "
        "pg_fence = warn lets such connections through with a warning, pg_fence = off turns the fence off."
    )
    session_fence.leave_test()
    with pytest.raises(ConnectionFenced, match="made by code running outside any test"):
        session_fence.check(target())


def test_allowed_warned_or_let_through(session_fence: Fence) -> None:
    session_fence.enter_test("t", allow=["10.1.2.3:5432"])
    session_fence.check(target())
    session_fence.enter_test("t", mode="off")
    session_fence.check(target())
    session_fence.enter_test("t", mode="warn")
    with pytest.warns(PgSandboxWarning, match="refused a connection through psycopg to database 'proddb'"):
        session_fence.check(target())
    session_fence.leave_test()
    session_fence.check(target(via_sqlalchemy=True))  # the driver's own hook sees it
    with session_fence.exempt():  # pgsandbox starting its server
        session_fence.check(target())
    session_fence.allowed.append(Allowed("10.1.2.3"))  # pg_fence_allow = 10.1.2.3: any port
    session_fence.check(target())


def test_the_innermost_fence_decides(session_fence: Fence) -> None:
    inner = Fence("error", allow=["10.1.2.3:5432"]).install()  # a pytest run inside a test
    try:
        assert fence.active() is inner
        session_fence.check(target())
        inner.check(target())
    finally:
        inner.remove()
    assert fence.active() is session_fence
    with pytest.raises(ConnectionFenced):
        session_fence.check(target())


def test_the_libpq_environment_points_at_the_sandbox_and_is_put_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "prod.example")
    monkeypatch.setenv("PGPASSWORD", "prod-password")
    monkeypatch.setenv("DATABASE_URL", "postgresql://prod.example/shop")
    monkeypatch.delenv("PGPORT", raising=False)
    session = {"host": "127.0.0.1", "port": 6000, "user": "tests", "passfile": "/run/x/passfile", "dbname": "postgres"}
    installed = Fence("error", env_urls=["DATABASE_URL"]).install()
    try:
        installed.point_env(session)
        assert (os.environ["PGHOST"], os.environ["PGPORT"], os.environ["PGUSER"]) == ("127.0.0.1", "6000", "tests")
        assert not {"PGDATABASE", "PGPASSWORD", "DATABASE_URL"} & set(os.environ)
        installed.point_env({**session, "dbname": "test_db"}, "postgresql://tests@127.0.0.1:6000/test_db")
        assert (os.environ["PGDATABASE"], os.environ["DATABASE_URL"]) == (
            "test_db",
            "postgresql://tests@127.0.0.1:6000/test_db",
        )
        installed.point_env_at_session()
        assert "PGDATABASE" not in os.environ and "DATABASE_URL" not in os.environ
        assert os.environ["PGHOST"] == "127.0.0.1"
    finally:
        installed.remove()
    assert os.environ["PGHOST"] == "prod.example" and os.environ["PGPASSWORD"] == "prod-password"
    assert os.environ["DATABASE_URL"] == "postgresql://prod.example/shop" and "PGPORT" not in os.environ


def test_the_markers_fence_options_are_checked() -> None:
    from pgsandbox.pytest.markers import marker_value

    assert marker_value("fence_allow", ["127.0.0.1:5433", "db.internal"]) == ("127.0.0.1:5433", "db.internal")
    assert marker_value("fence_allow", "127.0.0.1:5433") == ("127.0.0.1:5433",)
    assert marker_value("fence", "warn") == "warn"
    with pytest.raises(pytest.fail.Exception) as caught:
        marker_value("fence", "loose")
    assert str(caught.value).startswith("pgsandbox: @pytest.mark.pg(fence='loose') is not one of error, warn, off.")
    with pytest.raises(pytest.fail.Exception) as caught:
        marker_value("fence_allow", ["db:port"])
    assert str(caught.value).startswith(
        "pgsandbox: @pytest.mark.pg(fence_allow='db:port'): 'db:port': the port must be a number from 1 to 65535.\n"
        "  What to do: fence_allow takes: servers the connection fence lets tests reach"
    )
