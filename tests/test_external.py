"""Attach to a server someone else runs: use it, create only prefixed databases, drop only those."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg import sql

from pgsandbox import ExternalServer, LocalServer, Settings, start_server
from pgsandbox.errors import ConnectError, PrivilegeError, UnsupportedVersion
from pgsandbox.server.external import check_version

APP_PASSWORD = "app-Secret-7421"


@pytest.fixture(scope="module")
def other() -> Iterator[LocalServer]:
    """Someone else's server: TCP with password authentication, a CREATEDB role and a plain one."""
    server = LocalServer.start(Settings(listen="127.0.0.1"))
    for role, createdb in (("app", "CREATEDB"), ("plain", "NOCREATEDB")):
        server.admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN {} PASSWORD {}").format(
                sql.Identifier(role), sql.SQL(createdb), sql.Literal(APP_PASSWORD)
            )
        )
    server.admin.execute("CREATE DATABASE keepme OWNER app")
    yield server
    server.stop()


def url(server: LocalServer, user: str = "app", password: str = APP_PASSWORD) -> str:
    assert server.tcp is not None
    return f"postgresql://{user}:{password}@127.0.0.1:{server.tcp[1]}/postgres"


def databases(server: LocalServer) -> set[str]:
    return {row[0] for row in server.admin.execute("select datname from pg_database")}


@pytest.mark.slow
def test_attach_creates_and_drops_only_its_own(other: LocalServer) -> None:
    before = databases(other)
    with ExternalServer.attach(url(other)) as server:
        assert server.kind == "external" and server.version == other.version
        name = server.create_database("x")
        assert name.startswith(f"pgsandbox_{server.run_id}_")
        with server.connect(name) as conn:
            assert conn.execute("select current_user").fetchone() == ("app",)
        with pytest.raises(Exception, match="pgsandbox did not create database 'keepme', so it will not drop it"):
            server.drop_database("keepme")
        assert APP_PASSWORD not in repr(server)
    assert databases(other) == before


@pytest.mark.slow
def test_pytest_run_with_a_dsn(other: LocalServer, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_external(pg_server):
            assert pg_server.kind == "external"
            pg_server.create_database("from_test")
        """
    )
    before = databases(other)
    pytester.runpytest(f"--pg-dsn={url(other)}").assert_outcomes(passed=1)
    assert databases(other) == before


@pytest.mark.slow
def test_libpq_variables_and_pgpass(
    other: LocalServer, pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert other.tcp is not None
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{other.tcp[1]}:*:app:{APP_PASSWORD}\n")
    passfile.chmod(0o600)
    for name, value in {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(other.tcp[1]),
        "PGUSER": "app",
        "PGDATABASE": "postgres",
        "PGPASSFILE": str(passfile),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    pytester.makepyfile(
        """
        def test_external(pg_server):
            assert pg_server.kind == "external"
            assert pg_server.admin.execute("select current_user").fetchone() == ("app",)
        """
    )
    pytester.runpytest("--pg-server=external").assert_outcomes(passed=1)
    monkeypatch.setenv("PGSANDBOX_SERVER", "external")
    with start_server() as server:
        assert server.kind == "external"


def test_unreachable_host() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: nothing listens there
    with pytest.raises(ConnectError) as error:
        ExternalServer.attach(f"postgresql://app:{APP_PASSWORD}@127.0.0.1:{port}/postgres")
    message = str(error.value)
    assert f"pgsandbox could not reach the PostgreSQL server at host=127.0.0.1 port={port} user=app" in message
    assert "check that the server is running" in message
    assert APP_PASSWORD not in message


@pytest.mark.slow
def test_wrong_password(other: LocalServer) -> None:
    with pytest.raises(ConnectError) as error:
        ExternalServer.attach(url(other, password="not-the-password"))
    message = str(error.value)
    assert "refused the password" in message and 'password authentication failed for user "app"' in message
    assert "PGPASSWORD, or in ~/.pgpass" in message
    assert "not-the-password" not in message


@pytest.mark.slow
def test_missing_createdb_privilege(other: LocalServer) -> None:
    with pytest.raises(PrivilegeError) as error:
        ExternalServer.attach(url(other, user="plain"))
    message = str(error.value)
    assert "role 'plain' lacks the CREATEDB privilege" in message
    assert "ALTER ROLE plain CREATEDB" in message
    assert "use schema isolation (pg_isolation = schema), which needs only CREATE on the DSN's database" in message


@pytest.mark.slow
def test_too_old_a_server(other: LocalServer) -> None:
    check_version(other.version_num)  # the real server is new enough
    with pytest.raises(UnsupportedVersion) as error:
        check_version(other.version_num, minimum=(99,))
    assert f"the PostgreSQL server runs version {other.version_string}; pgsandbox needs 99 or newer" in str(error.value)
    assert "upgrade the server" in str(error.value)


@pytest.mark.slow
def test_bad_dsn_fails_the_test_with_the_message(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(pg_server): pass")
    result = pytester.runpytest("--pg-dsn=host=x port=5432 password=leaky oops")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*pgsandbox: --pg-dsn is not a valid connection string*"])
    assert "leaky" not in result.stdout.str()


@pytest.mark.slow
def test_what_an_existing_server_says_of_itself(other: LocalServer) -> None:
    """What the sandbox asks a server instead of its class: someone else's, or (an xdist worker's) the local
    server of the run, whose log it can read."""
    assert other.tcp is not None
    with ExternalServer.attach(url(other)) as server:
        assert not (server.owns_cluster or server.throwaway or server.can_save_snapshot or server.snapshot_hit)
        assert server.installation is None and server.bindir is None and server.run_dir is None
        assert server.address == f"127.0.0.1:{other.tcp[1]}"
        assert server.origin == f"PostgreSQL {other.version_string} on an existing server (127.0.0.1:{other.tcp[1]})"
        assert server.how_started == "attached"
        assert server.exited is None and server.describe_exit() is None and server.log_tail() == ""
        with pytest.raises(NotImplementedError, match="cannot save a snapshot"):
            server.save_snapshot("key")
    with ExternalServer.attach(other.dsn, local_run=other.run_dir) as worker:
        assert worker.throwaway and not worker.owns_cluster and worker.run_dir == other.run_dir
        assert "database system is ready to accept connections" in worker.log_tail(50)
        assert worker.log_tail(50) == other.log_tail(50)


@pytest.mark.slow
def test_an_existing_server_kept_for_its_databases_and_abandoned(
    other: LocalServer, machine_wide_servers: None
) -> None:
    from pgsandbox.server import runs

    server = ExternalServer.attach(url(other))
    name = server.create_database("gone")
    server.abandon()  # the server went away: nothing is asked of it
    assert name in databases(other)
    server.stop()
    assert name not in databases(other)

    server = ExternalServer.attach(url(other))
    name = server.create_database("kept")
    server.forget_database(name)
    secrets = server.secrets
    assert secrets is not None
    server.stop_keeping_databases()
    try:
        assert name in databases(other) and runs.is_kept(secrets) and server.kept_passfile.exists()
    finally:
        other.admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
        shutil.rmtree(secrets.path)
