"""Nothing left behind: half-written directories of killed runs, dynamic shared memory, the cache's size, and
`pgsandbox clean` naming what it stops."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import StartLocal
from pgsandbox.cli import main as cli_main
from pgsandbox.server import runs
from test_leftovers import gone, start_orphan

POLL_TIMEOUT = 60.0


@pytest.fixture
def private_cache(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> Iterator[Path]:
    """An empty cache of the test's own (``cache_dir`` stays the suite's)."""
    path = Path(tempfile.mkdtemp(prefix="pgsb-cache-"))
    path.chmod(0o755)
    monkeypatch.setenv("PGSANDBOX_CACHE", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def poll(find: object, what: str) -> Path:
    """The first path ``find()`` returns, polled (no fixed sleep)."""
    assert callable(find)
    deadline = time.monotonic() + POLL_TIMEOUT
    delay = 0.001
    while time.monotonic() < deadline:
        found = find()
        if found:
            return Path(found[0])
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    raise AssertionError(f"{what} did not appear within {POLL_TIMEOUT} s")


def spawn(script: str) -> subprocess.Popen[str]:
    """A python process in a process group of its own: SIGKILL to the group also ends its initdb."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def kill_group(process: subprocess.Popen[str]) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # initdb's own children (postgres --boot / --single) are in the group too: wait until none is left
    deadline = time.monotonic() + POLL_TIMEOUT
    while time.monotonic() < deadline:
        if not any(_in_group(p, process.pid) for p in psutil.process_iter()):
            return
        time.sleep(0.01)
    raise AssertionError("the killed process group did not exit")


def _in_group(process: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE
    except (OSError, psutil.Error):
        return False


def parent_of_runs(runtime: Path) -> Path:
    return runtime / f"pgsandbox-{os.geteuid()}"


START = """
    from pgsandbox import LocalServer, Settings
    LocalServer.start(Settings.from_env())
"""


@pytest.mark.slow
def test_killed_at_initdb_on_a_cold_cache(
    private_runtime: Path, private_cache: Path, start_local: StartLocal, capsys: pytest.CaptureFixture[str]
) -> None:
    owner = spawn(START)
    initdb = poll(lambda: list(parent_of_runs(private_runtime).glob("initdb-*/data/base")), "initdb's cluster")
    kill_group(owner)
    work = initdb.parent.parent
    assert work.is_dir()  # what the kill leaves

    assert cli_main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"Cache: {private_cache} (" in out and " MB; bound 1000 MB from the default of pg_cache_max_size)" in out
    assert "Half-written directories of killed runs: \n" in out
    assert f"  {work} (" in out and " MB; the next run or pgsandbox clean removes it)" in out

    lines: list[str] = []
    start_local(lines.append, runtime_dir=private_runtime, cache=private_cache)
    assert not work.exists()
    assert any(line.startswith(f"removed {work} (") and "half-written by a killed run" in line for line in lines)


SNAPSHOT = """
    import sys, threading
    from pgsandbox import LocalServer, Settings
    from pgsandbox.server import clusters

    copy = clusters.copy_tree

    def copy_then_hang(source, destination):
        copy(source, destination)
        if destination.parent.name.startswith(".build-"):
            print("writing the snapshot", flush=True)
            threading.Event().wait()  # killed here, as if the cache's disk were slow

    clusters.copy_tree = copy_then_hang
    server = LocalServer.start(Settings.from_env())
    print(server.pid, server.run.path, flush=True)
    server.save_snapshot("f" * 64)
    sys.stdin.read()
"""


@pytest.mark.usefixtures("machine_wide_servers")
@pytest.mark.slow
def test_killed_while_the_snapshot_is_written(
    private_runtime: Path,
    private_cache: Path,
    cache_dir: Path,
    start_local: StartLocal,
    capsys: pytest.CaptureFixture[str],
) -> None:
    start_local().stop()  # the suite's cache has the initdb cluster: copy it, so this run starts warm
    shutil.copytree(cache_dir / "initdb", private_cache / "initdb", symlinks=True)
    owner = spawn(SNAPSHOT)
    assert owner.stdout is not None
    postmaster = int(owner.stdout.readline().split()[0])
    assert owner.stdout.readline() == "writing the snapshot\n"
    kill_group(owner)
    snapshot = poll(lambda: list(parent_of_runs(private_runtime).glob("snapshot-*")), "the snapshot copied aside")
    build = poll(lambda: list(private_cache.glob("snapshots/*/.build-*")), "the snapshot being stored")

    assert cli_main(["doctor"]) == 0
    out = capsys.readouterr().out
    for path in (snapshot, build):
        assert f"  {path} (" in out
    assert cli_main(["clean", "--keep-cache"]) == 0
    out = capsys.readouterr().out
    assert f"removed {snapshot} (" in out and f"removed {build} (" in out
    assert not snapshot.exists() and not build.exists()
    assert gone(postmaster)
    assert private_cache.is_dir()  # --keep-cache


@pytest.mark.slow
def test_live_runs_half_written_directories_are_left_alone(private_runtime: Path, start_local: StartLocal) -> None:
    from pgsandbox.common.staging import make_staging_dir

    parent = runs.runtime_parent(private_runtime)
    mine = make_staging_dir(parent, "initdb")
    dead = subprocess.Popen(["true"])
    dead.wait()
    reused = parent / f"initdb-{os.getpid()}.12345-abc"  # this pid, another start time: a reused pid
    theirs = parent / f"initdb-{dead.pid}.{int(time.time())}-abc"
    unmarked = parent / "snapshot-0123abcd-xyz"  # named before owners were marked, and recent
    for path in (reused, theirs, unmarked):
        path.mkdir()
    start_local(runtime_dir=private_runtime)
    assert mine.exists() and unmarked.exists()
    assert not reused.exists() and not theirs.exists()


# -- dynamic shared memory ------------------------------------------------------------------------------------


def _shared_memory_files(pid: int) -> list[str]:
    """The files process ``pid`` maps as shared memory: /dev/shm segments and pg_dynshmem files."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return [line.split()[-1] for line in lines if "/dev/shm/PostgreSQL." in line or "/pg_dynshmem/" in line]


DSM_ORPHAN = """
    import sys
    import psycopg
    from pgsandbox import LocalServer, Settings
    server = LocalServer.start(Settings.from_env())
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute("set debug_parallel_query = on")  # a parallel worker, so a DSM segment per query
        conn.execute("create table t as select g from generate_series(1, 100000) g")
        conn.execute("set max_parallel_maintenance_workers = 2")
        conn.execute("create index on t (g)")
        assert conn.execute("select count(*) from t").fetchone()[0] == 100000
    print(server.pid, server.run.path, flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def tmpfs_runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Like private_runtime, on tmpfs (the default runtime directory's kind, where the segments are files)."""
    path = Path(tempfile.mkdtemp(prefix="pgsb-", dir="/dev/shm"))
    path.chmod(0o755)
    monkeypatch.setenv("PGSANDBOX_RUNTIME_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="POSIX shared memory in /dev/shm (Linux)")
@pytest.mark.slow
def test_a_killed_server_leaves_no_dynamic_shared_memory(tmpfs_runtime: Path, start_local: StartLocal) -> None:
    owner = spawn(DSM_ORPHAN)
    assert owner.stdout is not None
    postmaster_text, run_dir = owner.stdout.readline().split()
    postmaster = int(postmaster_text)
    try:
        mapped = _shared_memory_files(postmaster)
    finally:
        kill_group(owner)
        os.killpg(postmaster, signal.SIGKILL)  # the server too, with its backends: nothing can clean up
    # the control segment: a file in the run's data directory, nothing in /dev/shm (which other runs share)
    assert mapped and all(path.startswith(f"{run_dir}/data/pg_dynshmem/mmap.") for path in mapped), mapped
    while not gone(postmaster):
        time.sleep(0.01)
    start_local(runtime_dir=tmpfs_runtime)  # reaps the dead run
    assert not Path(run_dir).exists()  # and the segments with it
    assert not [path for path in mapped if Path(path).exists()]


# -- pgsandbox clean: --dry-run, RUN_ID -------------------------------------------------------------------------


@pytest.mark.usefixtures("machine_wide_servers", "private_runtime")
@pytest.mark.slow
def test_clean_dry_run_and_one_run(capsys: pytest.CaptureFixture[str]) -> None:
    first, first_dir = start_orphan()
    runs.mark_kept(runs.RunDir(first_dir))  # as --pg-keep-failed does: the next start leaves it running
    second, second_dir = start_orphan()
    cache = Path(os.environ["PGSANDBOX_CACHE"])

    assert cli_main(["clean", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would stop and remove {first_dir} (server pid {first} still running), " in out
    assert f"would stop and remove {second_dir} (" in out
    assert f"would remove cache {cache} (" in out
    assert not gone(first) and not gone(second) and first_dir.exists() and cache.exists()

    first_id = first_dir.name.removeprefix("run-")
    assert cli_main(["clean", first_id]) == 0
    assert f"stopped and removed {first_dir} (" in capsys.readouterr().out
    assert gone(first) and not first_dir.exists()
    assert not gone(second) and second_dir.exists() and cache.exists()  # the other run and the cache stay

    assert cli_main(["clean", "nosuchrun"]) == 2
    err = capsys.readouterr().err
    assert "no leftover or kept run nosuchrun of this user" in err
    assert "`pgsandbox doctor` lists the runs clean can stop; nothing was stopped." in err
    assert not gone(second)
    assert cli_main(["clean", "--keep-cache", second_dir.name]) == 0  # run-<id> works too
    assert gone(second) and not second_dir.exists()


@pytest.mark.slow
def test_clean_refuses_a_live_run(start_local: StartLocal, capsys: pytest.CaptureFixture[str]) -> None:
    server = start_local()
    assert cli_main(["clean", server.run_id]) == 2
    err = capsys.readouterr().err
    assert f"({server.run_id} still running: its pytest process stops it)" in err
    assert server.process.poll() is None and server.run.path.exists()


# -- the cache's size bound -------------------------------------------------------------------------------------


def _cluster(path: Path, megabytes: int, used: float) -> Path:
    (path / "data").mkdir(parents=True)
    (path / "data" / "base").write_bytes(b"\0" * (megabytes * 10**6))
    (path / "ready").touch()
    os.utime(path / "ready", (used, used))
    return path


def test_pruning_keeps_the_newest_and_what_a_run_copies(tmp_path: Path) -> None:
    from filelock import FileLock

    from pgsandbox.server import clusters

    now = time.time()
    snapshots = tmp_path / "snapshots" / "0123456789abcdef"
    copied, old, newest = (_cluster(snapshots / name, 1, now - age) for name, age in (("a", 300), ("b", 200), ("c", 0)))
    initdb = _cluster(tmp_path / "initdb" / "0123456789abcdef", 1, now - 400)
    with FileLock(str(copied) + ".lock"):  # a run copies it (snapshot_source holds this lock)
        pruned = clusters.prune_cache(tmp_path, max_size=2_500_000)
    assert [entry.path for entry in pruned] == [old]
    assert copied.exists() and newest.exists() and initdb.exists() and not old.exists()
    assert clusters.prune_cache(tmp_path, max_size=0) == []  # no bound
    assert [entry.path for entry in clusters.prune_cache(tmp_path, max_size=1)] == [copied]


def test_the_cache_size_reads_the_record_of_each_finished_entry(tmp_path: Path) -> None:
    from filelock import FileLock

    from pgsandbox.common.staging import SIZE_RECORD, tree_size, write_size_record
    from pgsandbox.server import clusters

    now = time.time()
    recorded = _cluster(tmp_path / "snapshots" / "0123456789abcdef" / "a", 1, now)
    write_size_record(recorded)  # as the cache writes each entry, before marking it ready
    older = _cluster(tmp_path / "initdb" / "0123456789abcdef", 1, now)  # written before the records
    busy = _cluster(tmp_path / "initdb" / "fedcba9876543210", 1, now)  # the same, while a run copies it
    half = tmp_path / "initdb" / ".build-1.2-x"  # half-written: its record is not trusted before it is ready
    (half / "data").mkdir(parents=True)
    (half / "data" / "base").write_bytes(b"\0" * 1000)
    (half / SIZE_RECORD).write_text("5\n")
    (tmp_path / "postgres-versions.json").write_text("{}")
    with FileLock(str(busy) + ".lock"):
        assert clusters.cache_size(tmp_path) == tree_size(tmp_path)
    assert (older / SIZE_RECORD).is_file() and not (busy / SIZE_RECORD).exists()  # recorded when not in use
    assert clusters.cache_size(tmp_path) == tree_size(tmp_path)
    assert (busy / SIZE_RECORD).is_file()
    # an entry never changes once ready, so its files are not counted again: the record is what is read
    (recorded / "data" / "base").write_bytes(b"")
    assert clusters.cache_size(tmp_path) == tree_size(tmp_path) + 10**6


@pytest.mark.usefixtures("private_runtime")
@pytest.mark.slow
def test_a_bounded_cache_keeps_the_newest_snapshot(
    project: pytest.Pytester, private_cache: Path, cache_dir: Path, start_local: StartLocal
) -> None:
    from pgsandbox.common.staging import tree_size

    start_local().stop()  # a warm initdb cluster to copy: the runs below build only templates
    shutil.copytree(cache_dir / "initdb", private_cache / "initdb", symlinks=True)
    project.makepyfile("def test_users(pg):\n    assert pg.fetchval('select count(*) from users') == 2\n")
    for version in (1, 2):  # each migration change stores another snapshot
        (project.path / "migrations" / f"{version + 1}.sql").write_text(f"create table t{version} (id int);\n")
        result = project.runpytest("--pg-cache-max-size=1MB", "--pg-report=json", "-p", "no:randomly")
        result.assert_outcomes(passed=1)
    stored = sorted(path.parent for path in private_cache.glob("snapshots/*/*/ready"))
    assert len(stored) == 1  # the newest; without a bound, both are kept
    result.stdout.fnmatch_lines([f"cache: {private_cache}, * MB; bound 1 MB (pg_cache_max_size)"])
    report = json.loads((project.path / "pgsandbox-report.json").read_text())
    assert report["cache"]["path"] == str(private_cache) and report["cache"]["max_bytes"] == 10**6
    assert report["cache"]["bytes"] > 10**6  # over the bound: the newest snapshot and initdb cluster stay
    # each entry's size was recorded as it was written: the report's count reads the records, and is exact
    assert all((path / ".size").is_file() for path in stored)
    assert report["cache"]["bytes"] == tree_size(private_cache)
    # a snapshot keeps only the WAL segment of its last checkpoint (the rest is recycled space every start copied)
    for wal in private_cache.glob("snapshots/*/*/data/pg_wal"):
        assert len([path for path in wal.iterdir() if path.is_file()]) == 1


@pytest.mark.slow
def test_cache_max_size_values(pytester: pytest.Pytester) -> None:
    from pgsandbox.settings import BY_NAME

    parse = BY_NAME["cache_max_size"].parse
    assert [parse(v) for v in ("1GB", "500 MB", "1.5g", "2048", "0", "none")] == [10**9, 500 * 10**6, 1.5e9, 2048, 0, 0]
    pytester.makepyfile("def test_one(pg):\n    pass\n")
    result = pytester.runpytest("--pg-cache-max-size=lots")
    result.stderr.fnmatch_lines(
        ["*--pg-cache-max-size: bad value 'lots': expected a size such as 500MB, 2GB or 1.5G (0 or none: no bound)*"]
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="another user's runs: only root sees them")
@pytest.mark.usefixtures("machine_wide_servers")
@pytest.mark.slow
def test_clean_leaves_other_users_runs_unless_all_users(
    private_runtime: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    theirs = private_runtime / "pgsandbox-4242" / "run-theirs01"  # a kept server of OS user 4242, long gone
    theirs.mkdir(parents=True)
    (theirs / "owner.json").write_text(json.dumps({"pid": dead.pid, "started": 0.0, "kept": True}))
    for args in (["clean", "--keep-cache", "--dry-run"], ["clean", "--keep-cache"]):
        assert cli_main(args) == 0
        assert str(theirs) not in capsys.readouterr().out
    assert theirs.exists()
    assert cli_main(["clean", "--keep-cache", "--all-users"]) == 0
    assert f"stopped and removed {theirs} (no server running)" in capsys.readouterr().out
    assert not theirs.exists()


AS_NOBODY = """
    import os, pwd, sys
    from pgsandbox.cli import main
    nobody = pwd.getpwnam("nobody")  # imported as root (the virtualenv may be under /root), then no longer root
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
    sys.exit(main(["clean", "--all-users"]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the CLI as another user")
@pytest.mark.slow
def test_clean_all_users_needs_root() -> None:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(AS_NOBODY)], capture_output=True, text=True, cwd="/")
    assert out.returncode == 2, out.stderr
    assert "clean --all-users stops other users' servers, which only root may do; nothing was stopped." in out.stderr
    assert "Run it as root (sudo pgsandbox clean --all-users)" in out.stderr
