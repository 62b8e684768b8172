"""Parallel runs (issue 5): a CPU-bound 200-test suite on one server, at -n 1, -n 2, and as two processes.

Usage::

    python bench/xdist.py [--runs N] [--json PATH] [--bin DIR | --pg-version N] [--cpu-ms MS]

Every test burns about ``--cpu-ms`` (default 50) of CPU in Python, then inserts a row into one of the 50
tables of the reference schema (``../shared/bench/schema50.sql``, or the same SQL generated) through
``pg_conn`` and checks the table holds 201 rows (the previous test's write to it is gone). Cases, each a
``python -m pytest`` run of a generated project timed from spawn to exit, interleaved over rounds after a
warm-up round (the template comes from the cache):

* no database, -n 1 and -n 2 (context): the same CPU work without pgsandbox: the speed-up this machine allows;
* pgsandbox, no xdist; pgsandbox -n 1; pgsandbox -n 2: one server for all workers, one template;
* two processes: two pytest runs at once on the same project (100 tests each), each with its own local server
  and the cached template: what two terminals or a sharding runner get.

Target (issue 5): pgsandbox -n 2 at least 1.6x faster than -n 1 on this 2-core machine.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from harness import (
    REPO,
    TABLES,
    bench_parser,
    chosen_bindir,
    clean_env,
    command_line,
    current_runner,
    machine_facts,
    pgsandbox_env,
    pgsandbox_revision,
    positive,
    print_facts,
    print_ratios,
    run_together,
    sandbox_project,
    schema_sql,
    scratch,
    write_json,
)

TESTS = 200

TEST_MODULE = """\
import pytest

CPU_LOOPS = {loops}


def burn():
    total = 0
    for i in range(CPU_LOOPS):
        total += i * i
    return total


@pytest.mark.parametrize("i", range({start}, {stop}))
def test_row({fixture}i):
    burn()
{body}"""

BODY = """\
    table = f"t{{i % {tables}}}"
    pg_conn.execute(f"insert into {{table}} (name, value) values (%s, %s)", (f"bench{{i}}", i))
    assert pg_conn.execute(f"select count(*) from {{table}}").fetchone()[0] == 201
"""

CASES = {
    "empty-n1": "no database, -n 1 (context)",
    "empty-n2": "no database, -n 2 (context)",
    "pgsandbox-plain": "pgsandbox, no xdist",
    "pgsandbox-n1": "pgsandbox, -n 1",
    "pgsandbox-n2": "pgsandbox, -n 2",
    "pgsandbox-two": "pgsandbox, two processes at once (100 tests each)",
}


def calibrate(cpu_ms: float) -> int:
    """Loop iterations that take about ``cpu_ms`` here (the fastest of five tries: the least disturbed)."""
    loops = 500_000
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        total = 0
        for i in range(loops):
            total += i * i
        best = min(best, time.perf_counter() - started)
    return max(1000, int(cpu_ms / 1000 / (best / loops)))


def write_project(root: Path, loops: int, database: bool, schema: str, split: bool) -> None:
    root.mkdir(parents=True)
    ini = "[tool.pytest.ini_options]\n"
    if database:
        ini += 'pg_migrations = ["sql:migrations"]\n'
        sandbox_project(root, schema)
    (root / "pyproject.toml").write_text(ini)
    fixture = "pg_conn, " if database else ""
    body = BODY.format(tables=TABLES) if database else ""
    halves = [(0, TESTS // 2), (TESTS // 2, TESTS)] if split else [(0, TESTS)]
    for number, (start, stop) in enumerate(halves):
        source = TEST_MODULE.format(loops=loops, start=start, stop=stop, fixture=fixture, body=body)
        (root / f"test_part{number}.py").write_text(source)


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--runs", type=int, default=3, help="measured rounds (default 3)")
    parser.add_argument("--cpu-ms", type=float, default=50.0, help="CPU work per test in ms (default 50)")
    args = parser.parse_args(argv)
    positive(parser, args, "runs")
    bindir = chosen_bindir(args)
    if bindir is None:
        return 2
    command = command_line()
    loops = calibrate(args.cpu_ms)
    schema, schema_origin = schema_sql()
    runner = current_runner()
    facts = {
        **machine_facts(bindir, runner, pgsandbox_revision()),
        "schema": f"{TABLES} tables: {schema_origin}",
        "CPU work per test": f"{args.cpu_ms:.0f} ms ({loops} loop iterations)",
        "pytest-xdist": subprocess.run(
            [sys.executable, "-c", "import xdist; print(xdist.__version__)"], capture_output=True, text=True
        ).stdout.strip(),
    }
    times: dict[str, list[float]] = {key: [] for key in CASES}
    with scratch("pgsandbox-xdist-") as (work, data):
        env = {
            **clean_env(),
            **pgsandbox_env(bindir, runtime=data, cache=work / "cache"),
            "PYTHONPATH": str(REPO / "src"),
        }
        write_project(work / "empty", loops, False, schema, split=False)
        write_project(work / "db", loops, True, schema, split=True)
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]
        plans = {
            "empty-n1": (work / "empty", [[*pytest, "-p", "no:pgsandbox", "-n", "1"]]),
            "empty-n2": (work / "empty", [[*pytest, "-p", "no:pgsandbox", "-n", "2"]]),
            "pgsandbox-plain": (work / "db", [[*pytest, "-p", "no:xdist"]]),
            "pgsandbox-n1": (work / "db", [[*pytest, "-n", "1"]]),
            "pgsandbox-n2": (work / "db", [[*pytest, "-n", "2"]]),
            "pgsandbox-two": (
                work / "db",
                [[*pytest, "-p", "no:xdist", "test_part0.py"], [*pytest, "-p", "no:xdist", "test_part1.py"]],
            ),
        }
        print(f"command: {command}")
        print_facts(facts, 22)
        for round_number in range(args.runs + 1):
            for key, (cwd, commands) in plans.items():
                seconds = run_together(commands, cwd, env)
                if round_number:
                    times[key].append(seconds)
                print(f"    {CASES[key]}: {seconds:.2f} s", flush=True)
            print(f"  round {round_number}/{args.runs} done{' (warm-up)' if not round_number else ''}", flush=True)
    medians = {key: statistics.median(values) for key, values in times.items()}
    print(f"\ncase ({args.runs} runs after 1 warm-up)                       whole run (s)    min    max")
    for key, label in CASES.items():
        print(f"{label:<55} {medians[key]:>8.2f} {min(times[key]):>6.2f} {max(times[key]):>6.2f}")
    speedups = {
        "no database: -n 1 / -n 2 (what this machine allows)": medians["empty-n1"] / medians["empty-n2"],
        "pgsandbox: -n 1 / -n 2": medians["pgsandbox-n1"] / medians["pgsandbox-n2"],
        "pgsandbox: no xdist / -n 2": medians["pgsandbox-plain"] / medians["pgsandbox-n2"],
        "pgsandbox: -n 1 / two processes": medians["pgsandbox-n1"] / medians["pgsandbox-two"],
    }
    print()
    print_ratios(speedups, 55)
    target = speedups["pgsandbox: -n 1 / -n 2"] >= 1.6
    print(f"\n  target: pgsandbox -n 2 at least 1.6x faster than -n 1: {'MET' if target else 'NOT MET'}")
    write_json(args.json, {"facts": facts, "times": times, "speedups": speedups})
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
