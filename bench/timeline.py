"""Where a database test's whole-process overhead goes (issue 16): a 1-database-test run and a 1-plain-test run of
one project, each moment of both on one clock, medians of interleaved runs.

Each pytest run is spawned with ``PGSANDBOX_TRACE`` naming a file: pgsandbox then records its own moments there
(``pgsandbox.common.trace``: the first collected test that needs the database, its imports done, the server
prepared, the cluster copied, postgres spawned and ready, connected, the session database created and connected,
the sandbox stopped), and a small plugin this script writes records pytest's (configured, collecting, collected,
the test's setup, body and teardown, the session's end). Every moment is shown as milliseconds since the spawn,
the same clock (``CLOCK_MONOTONIC``) in both processes; ``exit`` is when the process had ended. Then the overhead
(the database run's exit minus the plain run's) is split into stages, each the database run's time in it minus
the plain run's:

- ``pytest start``: from the spawn to the first collection hook (interpreter, pytest, plugins, conftests);
- ``collection``: to the end of collection (pgsandbox imports what the tests need here and starts postgres in a
  thread);
- ``server wait``: to the sandbox started (the part of the server's start the imports did not hide);
- ``first test``: from there to the test's body (the session database);
- ``test end``: from the body to the end of the session (teardown, the server stopped);
- ``exit``: from the end of the session to the process's end (the report, the interpreter's end).

Two projects are timed so: a bare one, whose plain run imports nothing but pytest (so the database run pays for
importing psycopg, 50-100 ms, as well as pgsandbox's own work), and one whose ``conftest.py`` imports psycopg, as a
project does whose code uses it (its application, its fixtures): there the plain run imports the driver too, and
the difference is what pgsandbox adds.

The pgsandbox run uses a local server started from a warm cache (the warm-up round fills it). The runs use this
interpreter, whichever pgsandbox it imports (``PYTHONPATH=src`` for a checkout's), and the plugins installed here
minus the unrelated ones a database run does not use either.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from harness import (
    bench_parser,
    clean_env,
    current_runner,
    fmt,
    load_average,
    machine_facts,
    pgsandbox_env,
    pgsandbox_revision,
    positive,
    print_facts,
    run_bench,
    write_json,
)

DB_TEST = "def test_db(pg_conn):\n    assert pg_conn.execute('select 1').fetchone() == (1,)\n"
PLAIN_TEST = "def test_plain():\n    assert 1\n"

# pytest's own moments, recorded through pgsandbox's trace (the plain run imports only that module of it)
MARKS_PLUGIN = """\
import pytest
from pgsandbox.common import trace


def pytest_configure(config):
    trace.mark("pytest: configured")


@pytest.hookimpl(tryfirst=True)
def pytest_collection(session):
    trace.mark("pytest: collecting")


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    trace.mark("pytest: collected")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    trace.mark("test: setup")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    trace.mark("test: body")


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    trace.mark("test: torn down")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    trace.mark("pytest: session finished")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    trace.mark("pytest: unconfigured")
"""

# unrelated plugins, installed by the [dev] extra: the plain and database runs both leave them out
UNRELATED = ["-p", "no:pytest-factoryboy", "-p", "no:faker", "-p", "no:pytest_postgresql", "-p", "no:anyio"]
UNRELATED += ["-p", "no:django", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"]

STAGES = (
    ("pytest start", None, "pytest: collecting"),
    ("collection", "pytest: collecting", "pytest: collected"),
    ("server wait", "pytest: collected", "test: setup"),
    ("first test", "test: setup", "test: body"),
    ("test end", "test: body", "pytest: session finished"),
    ("exit", "pytest: session finished", "exit"),
)


def run_once(command: Sequence[str], cwd: Path, env: dict[str, str], trace_file: Path) -> dict[str, float]:
    """One pytest run: each moment (the first time it happened) in milliseconds since the spawn."""
    trace_file.unlink(missing_ok=True)
    spawned = time.monotonic()
    done = subprocess.run(command, cwd=cwd, env={**env, "PGSANDBOX_TRACE": str(trace_file)}, capture_output=True)
    ended = time.monotonic()
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout.decode()[-3000:]}{done.stderr.decode()[-2000:]}")
    moments: dict[str, float] = {}
    for line in trace_file.read_text().splitlines():
        entry = json.loads(line)
        moments.setdefault(entry["moment"], (entry["at"] - spawned) * 1000)
    moments["exit"] = (ended - spawned) * 1000
    return moments


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    names = {name for run in runs for name in run}
    return {name: statistics.median(run[name] for run in runs if name in run) for name in names}


def stage_times(moments: dict[str, float]) -> dict[str, float | None]:
    times: dict[str, float | None] = {}
    for name, start, end in STAGES:
        begin = 0.0 if start is None else moments.get(start)
        finish = moments.get(end)
        times[name] = None if begin is None or finish is None else finish - begin
    return times


PROJECTS = {"bare": {}, "driver imported": {"conftest.py": "import psycopg  # the project's code uses it\n"}}


def timeline_main(args: argparse.Namespace, bindir: Path, work: Path, data: Path, command: str) -> int:
    runner = current_runner()
    projects: dict[str, Path] = {}
    for label, extra in PROJECTS.items():
        projects[label] = work / label.replace(" ", "_")
        files = {"test_db.py": DB_TEST, "test_plain.py": PLAIN_TEST, **extra}
        runner.write({projects[label] / name: text for name, text in files.items()})
    plugins = work / "plugins"
    runner.write({plugins / "timeline_marks.py": MARKS_PLUGIN})
    env = clean_env()
    env.update(pgsandbox_env(bindir, runtime=data / "runtime", cache=data / "cache"))
    inherited = [str(Path(entry).resolve()) for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    env["PYTHONPATH"] = os.pathsep.join([str(plugins), *inherited])  # absolute: the runs start in the project
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed project keeps its bytecode: so do these runs
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    (data / "runtime").mkdir()
    base = [sys.executable, "-m", "pytest", "-q", "-p", "timeline_marks", *UNRELATED]
    runs = {(label, kind): [*base, f"test_{kind}.py"] for label in projects for kind in ("plain", "db")}
    trace_file = work / "trace.jsonl"

    facts = machine_facts(bindir, runner, pgsandbox_revision())
    print(f"{args.runs} rounds of {len(runs)} runs after a warm-up round, interleaved ...", flush=True)
    for (label, _), command_line in runs.items():  # warm-up: bytecode, the initdb cache
        run_once(command_line, projects[label], env, trace_file)
    results: dict[tuple[str, str], list[dict[str, float]]] = {key: [] for key in runs}
    for number in range(args.runs):
        for key in list(runs) if number % 2 else list(reversed(runs)):
            results[key].append(run_once(runs[key], projects[key[0]], env, trace_file))

    print()
    print("Where a database test's overhead goes: one run of 1 database test next to one of 1 plain test")
    print(f"command: {command}")
    print_facts({**facts, "load average (after)": load_average()}, 24)
    summary: dict[str, object] = {}
    for label in projects:
        plain, db = medians(results[(label, "plain")]), medians(results[(label, "db")])
        summary[label] = {"plain": plain, "db": db, "overhead_ms": db["exit"] - plain["exit"]}
        print_project(label, plain, db, args.runs)
    write_json(
        args.json,
        {
            "command": command,
            "facts": facts,
            "medians": summary,
            "runs": {f"{label} {kind}": found for (label, kind), found in results.items()},
        },
    )
    return 0


def print_project(label: str, plain: dict[str, float], db: dict[str, float], runs: int) -> None:
    print()
    print(f"project: {label}")
    print(f"{'moment (ms since spawn, medians of ' + str(runs) + ' runs)':<52}{'plain':>8}{'db':>8}")
    for name, at in sorted(db.items(), key=lambda item: item[1]):
        print(f"  {name:<50}{fmt(plain.get(name), 0):>8}{fmt(at, 0):>8}")
    plain_stages, db_stages = stage_times(plain), stage_times(db)
    print(f"{'stage (ms)':<52}{'plain':>8}{'db':>8}{'db-plain':>10}")
    for name, _, _ in STAGES:
        p, d = plain_stages[name], db_stages[name]
        extra = None if p is None or d is None else d - p
        print(f"  {name:<50}{fmt(p, 0):>8}{fmt(d, 0):>8}{fmt(extra, 0):>10}")
    overhead = db["exit"] - plain["exit"]
    print(f"  {'whole process (exit)':<50}{fmt(plain['exit'], 0):>8}{fmt(db['exit'], 0):>8}{fmt(overhead, 0):>10}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--runs", type=int, default=9, help="measured rounds (default 9)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directories")
    args = parser.parse_args(argv)
    positive(parser, args, "runs")
    return run_bench(__file__, "pgsandbox-timeline-", args, argv, timeline_main)


if __name__ == "__main__":
    sys.exit(main())
