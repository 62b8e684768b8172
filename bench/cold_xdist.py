"""Stress test (issue 14): cold ``pytest -n 4`` runs, each with a fresh cache, one after another.

Usage::

    python bench/cold_xdist.py [--runs 20] [--workers 4] [--parallel 1] [--deadline 900] [--bin DIR | --pg-version N]
                               [--json PATH]

A cold run starts from nothing: a new ``PGSANDBOX_CACHE`` (so initdb runs, the template is built and the
cluster is saved as a snapshot and restarted), then four workers attach to the controller's server, some
over TCP (the tests' connections), some over the socket (their admin). Each run is a small project: a
migration, 16 tests in transaction isolation and 8 in database isolation, over 3 modules. The run
directories are the default ones (``/dev/shm/pgsandbox-<uid>``), shared with whatever else runs pgsandbox
on this machine, as a user's would be. ``--parallel 2`` runs two cold runs at once (more contention).

For each run: exit status, seconds, and the postgres processes of that run still alive after it exited
(none expected). A failed run's output is printed (its last lines). Not run in CI: it takes minutes. Bounded:
each run has a timeout, and no new run starts after ``--deadline`` seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness import (
    REPO,
    bench_parser,
    chosen_bindir,
    clean_env,
    command_line,
    our_processes,
    pgsandbox_env,
    positive,
    write_json,
)

RUN_TIMEOUT = 300.0

MIGRATION = "create table items (id serial primary key, name text not null);\n"
TRANSACTION_TESTS = """\
import pytest


@pytest.mark.parametrize("i", range(8))
def test_insert(pg_conn, i):
    pg_conn.execute("insert into items (name) values (%s)", [f"item{i}"])
    assert pg_conn.execute("select count(*) from items").fetchone()[0] == 1
"""
DATABASE_TESTS = """\
import psycopg
import pytest


@pytest.mark.pg(isolation="database")
@pytest.mark.parametrize("i", range(8))
def test_own_connection(pg, i):
    with psycopg.connect(pg.dsn) as conn:  # over TCP, as the app would
        conn.execute("insert into items (name) values ('x')")
    assert pg.fetchval("select count(*) from items") == 1
"""


def write_project(root: Path) -> None:
    (root / "migrations").mkdir(parents=True)
    (root / "migrations/1.sql").write_text(MIGRATION)
    (root / "pyproject.toml").write_text('[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n')
    (root / "test_a.py").write_text(TRANSACTION_TESTS)
    (root / "test_b.py").write_text(TRANSACTION_TESTS)
    (root / "test_c.py").write_text(DATABASE_TESTS)


def run_dirs_of(pid: int) -> list[Path]:
    """The run directories whose owner.json names ``pid``."""
    found = []
    for base in (Path("/dev/shm"), Path(tempfile.gettempdir())):
        for owner in (base / f"pgsandbox-{os.geteuid()}").glob("run-*/owner.json"):
            try:
                if json.loads(owner.read_text()).get("pid") == pid:
                    found.append(owner.parent)
            except (OSError, ValueError):
                continue
    return found


def one_run(number: int, work: Path, workers: int, bindir: Path) -> dict[str, object]:
    root = work / f"run{number}"
    write_project(root / "project")
    env = {**clean_env(), **pgsandbox_env(bindir, cache=root / "cache"), "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "pytest", "-q", "-n", str(workers), "-p", "no:randomly", "-p", "no:cacheprovider"]
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=root / "project", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # the run directories are named after the controller: find them while it runs
    dirs: set[Path] = set()
    deadline = time.monotonic() + RUN_TIMEOUT
    output = ""
    while True:
        dirs.update(run_dirs_of(process.pid))
        try:
            output = process.communicate(timeout=0.2)[0]
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                process.kill()
                output = process.communicate()[0] + "\n(timed out)"
                break
    seconds = time.perf_counter() - started
    left = our_processes(sorted(dirs))
    shutil.rmtree(root, ignore_errors=True)
    return {
        "run": number,
        "status": process.returncode,
        "seconds": round(seconds, 2),
        "left_running": left,
        "summary": output.strip().splitlines()[-1] if output.strip() else "",
        "output": output if process.returncode != 0 or left else "",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--runs", type=int, default=20, help="cold runs (default 20)")
    parser.add_argument("--workers", type=int, default=4, help="pytest-xdist workers per run (default 4)")
    parser.add_argument("--parallel", type=int, default=1, help="cold runs at once (default 1)")
    parser.add_argument("--deadline", type=float, default=900.0, help="start no run after this many seconds")
    args = parser.parse_args(argv)
    positive(parser, args, "runs", "workers", "parallel")
    bindir = chosen_bindir(args)
    if bindir is None:
        return 2
    print(f"command: {command_line()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="pgsandbox-cold-xdist-"))
    began = time.monotonic()
    results: list[dict[str, object]] = []

    def job(number: int) -> dict[str, object] | None:
        if time.monotonic() - began > args.deadline:
            return None
        result = one_run(number, work, args.workers, bindir)
        ok = result["status"] == 0 and not result["left_running"]
        print(
            f"  run {number:2d}: {'ok    ' if ok else 'FAILED'} {result['seconds']:6.2f} s  {result['summary']}"
            + (f"  left running: {result['left_running']}" if result["left_running"] else ""),
            flush=True,
        )
        if not ok:
            print("\n".join("      | " + line for line in str(result["output"]).splitlines()[-60:]), flush=True)
        return result

    try:
        with ThreadPoolExecutor(args.parallel) as pool:
            results = [r for r in pool.map(job, range(1, args.runs + 1)) if r is not None]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [r for r in results if r["status"] != 0 or r["left_running"]]
    times = sorted(float(str(r["seconds"])) for r in results)
    median = times[len(times) // 2] if times else 0.0
    print(
        f"\n{len(results)} cold -n {args.workers} runs ({args.parallel} at a time): "
        f"{len(results) - len(failed)} passed, {len(failed)} failed; "
        f"median {median:.2f} s, max {max(times, default=0):.2f} s"
    )
    write_json(args.json, results)
    return 1 if failed or len(results) < args.runs else 0


if __name__ == "__main__":
    sys.exit(main())
