"""A cluster copied ahead (server/spares.py): a start renames it instead of copying, and a server started from a
cluster used often has the next start's copy made while it runs; stale, extra and half-made copies go."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import StartLocal
from pgsandbox.server import spares

pytestmark = pytest.mark.slow  # servers and the copy's shell


def test_a_start_takes_the_copy_made_while_the_last_server_ran(start_local: StartLocal, private_runtime: Path) -> None:
    first = start_local(runtime_dir=private_runtime)  # fills the cache (or uses the suite's)
    parent = first.run.path.parent
    first.stop()
    # the cluster was used a moment ago: a copy of it is made while this server runs, ready once it stops
    second = start_local(runtime_dir=private_runtime)
    assert second.copy_ahead is not None and second.copy_ahead.work.parent == parent
    spare = second.copy_ahead.final
    second.stop()
    assert second.copy_ahead is None and second.process.poll() is not None
    assert (spare / "data" / "PG_VERSION").is_file() and not list(parent.glob(".spare-*"))
    third = start_local(runtime_dir=private_runtime)
    assert not spare.exists()  # renamed into the third run's directory, not copied
    assert third.admin.execute("select count(*) >= 3 from pg_database").fetchone() == (True,)
    assert third.run.data.stat().st_uid == third.account.uid  # the server's account owns it, as root too
    assert (third.run.data.stat().st_mode & 0o777) == 0o700
    third.stop()  # its own copy, for a fourth, is ready: nothing of it is left running
    assert len(spares.spares_in(parent)) == 1 and not list(parent.glob(".spare-*"))


def made(source: Path, parent: Path) -> Path:
    copy = spares.CopyAhead.start(source, parent)
    assert copy is not None and copy.finish()
    return copy.final


def test_a_rebuilt_cache_entry_s_spare_is_not_taken(tmp_path: Path) -> None:
    source = tmp_path / "cache" / "data"
    source.mkdir(parents=True)
    (source / "PG_VERSION").write_text("18\n")
    parent = tmp_path / "runtime"
    parent.mkdir()
    spare = made(source, parent)
    # the entry is written again (a rebuild stores a new directory under the same name)
    shutil.rmtree(source)
    source.mkdir()
    (source / "PG_VERSION").write_text("18\n")
    assert not spares.take(source, tmp_path / "run", parent) and not (tmp_path / "run").exists()
    made(source, parent)
    assert spares.take(source, tmp_path / "run", parent) and (tmp_path / "run" / "PG_VERSION").is_file()
    assert spare.exists()  # never taken; it goes once spares beyond MAX_SPARES do, or with pgsandbox clean


def test_spares_beyond_the_bound_go_oldest_first(tmp_path: Path) -> None:
    parent = tmp_path / "runtime"
    parent.mkdir()
    spares_made: list[Path] = []
    for number in range(spares.MAX_SPARES + 2):
        source = tmp_path / f"cache{number}" / "data"
        source.mkdir(parents=True)
        (source / "PG_VERSION").write_text("18\n")
        spares_made.append(made(source, parent))
        os.utime(spares_made[-1], (number, number))  # each older than the next
    left = spares.spares_in(parent)
    assert len(left) == spares.MAX_SPARES and left == spares_made[-spares.MAX_SPARES :]


def test_a_copy_that_fails_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parent = tmp_path / "runtime"
    parent.mkdir()
    source = tmp_path / "cache" / "data"
    source.mkdir(parents=True)
    (source / "PG_VERSION").write_text("18\n")
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "cp").write_text("#!/bin/sh\necho 'cp: No space left on device' >&2\nexit 1\n")
    (tools / "cp").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    copy = spares.CopyAhead.start(source, parent)
    assert copy is not None and not copy.finish()
    assert not list(parent.iterdir())  # the staging directory went with the failed copy
    assert not spares.take(source, tmp_path / "run", parent)


def test_clean_removes_the_spares_and_doctor_lists_them(private_runtime: Path, tmp_path: Path) -> None:
    source = tmp_path / "cache" / "data"
    source.mkdir(parents=True)
    (source / "PG_VERSION").write_text("18\n")
    parent = private_runtime / f"pgsandbox-{os.geteuid()}"
    parent.mkdir()
    spare = made(source, parent)
    env = {**os.environ, "PGSANDBOX_RUNTIME_DIR": str(private_runtime), "PGSANDBOX_CACHE": str(tmp_path / "c")}
    cli = [sys.executable, "-c", "import sys; from pgsandbox.cli import main; sys.exit(main())"]
    doctor = subprocess.run([*cli, "doctor"], env=env, capture_output=True, text=True)
    assert f"Clusters copied ahead for the next server's start: \n  {spare} (" in doctor.stdout
    cleaned = subprocess.run([*cli, "clean", "--keep-cache"], env=env, capture_output=True, text=True)
    assert f"removed {spare} (0.0 MB, a cluster copied ahead)" in cleaned.stdout
    assert not spare.exists()


def test_a_copy_half_made_by_a_killed_run_is_found_abandoned(tmp_path: Path) -> None:
    from pgsandbox.common import staging

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    half = tmp_path / f".spare-{process.pid}.1-x1y2z3"
    (half / "data").mkdir(parents=True)
    assert [found.path for found in staging.find_abandoned([tmp_path])] == [half]


def test_a_spare_whose_cached_cluster_went_goes_at_the_next_start(tmp_path: Path) -> None:
    parent = tmp_path / "runtime"
    parent.mkdir()
    kept_source, gone_source = tmp_path / "kept" / "data", tmp_path / "gone" / "data"
    for source in (kept_source, gone_source):
        source.mkdir(parents=True)
        (source / "PG_VERSION").write_text("18\n")
    kept, gone = made(kept_source, parent), made(gone_source, parent)
    shutil.rmtree(gone_source.parent)  # the cache cleaned, or a temporary one removed
    assert spares.remove_orphans(parent) == [gone]
    assert spares.spares_in(parent) == [kept] and not list(parent.glob(".spare-*"))
    assert spares.take(kept_source, tmp_path / "run", parent) and not kept.exists()
