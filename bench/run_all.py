"""Run the benchmarks one after another and print BENCHMARKS.md's headline figures: ``--quick`` in a few minutes.

Usage::

    python bench/run_all.py --quick [--bin DIR | --pg-version N] [--only a,b] [--logs DIR] [--verbose] [--json PATH]
    python bench/run_all.py          # the same figures from the full runs (BENCHMARKS.md's parameters: long)

Each benchmark runs as its own process (``bench/<name>.py ... --json``), one at a time so that they do not slow
each other down; its whole output goes to a log file (``--logs``, or a temporary directory that is printed), or
to the terminal too with ``--verbose``. At the end, one table of headline figures: session start-up warm and
cold against pytest-postgresql and raw initdb + ``pg_ctl`` (startup.py); a 200-test suite's whole run and the
per-test cost of transaction and database isolation against pytest-postgresql and a hand-written BEGIN/ROLLBACK
(isolation.py); the teardown guards (guards.py), the statement log (sql_log.py), ``pg.insert`` against
hand-written INSERTs (factories.py), and connecting over TCP loopback against the Unix socket (connect.py). Every
ratio compares figures measured in the same run of that benchmark. xdist.py, cold_xdist.py and dsm.py are not
run here (minutes each, and their figures hold for their issue only): run them by hand.

``--quick`` uses fewer rounds and smaller counts (and leaves out pytest-postgresql with its data on disk, 1-2
minutes a run): the figures are noisier than the full runs' but of the same kind, to tell in a few minutes whether
a change made something slower. The machine's load average is printed before and after: compare runs made under
a similar load.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import bench_parser, command_line, load_average, write_json

BENCH = Path(__file__).resolve().parent
ISOLATION_CASES = (
    "empty",
    "pgsandbox-transaction",
    "pgsandbox-database",
    "pgsandbox-transaction-empty",
    "pgsandbox-database-empty",
    "pytest-postgresql-shm",
    "hand-rollback",
)

Figures = list[tuple[str, float | None, str]]  # (what, value, unit)


def get(document: Any, *path: str) -> float | None:
    """``document[path[0]][path[1]]...``, None where a step is missing or null."""
    for key in path:
        if not isinstance(document, dict) or document.get(key) is None:
            return None
        document = document[key]
    return float(document)


def startup_figures(document: Any) -> Figures:
    ratios = document.get("ratios", {})
    return [
        ("start-up: pgsandbox warm, to the test body", get(document, "cases", "pgsandbox-warm", "median_ms"), "ms"),
        ("start-up: pgsandbox cold", get(document, "cases", "pgsandbox-cold", "median_ms"), "ms"),
        ("start-up: pytest-postgresql", get(document, "cases", "pytest-postgresql", "median_ms"), "ms"),
        ("start-up: raw initdb + pg_ctl start", get(document, "cases", "raw", "median_ms"), "ms"),
        ("start-up: pytest-postgresql / pgsandbox warm", ratios.get("pytest-postgresql / pgsandbox warm"), "x"),
        ("start-up: pytest-postgresql / pgsandbox cold", ratios.get("pytest-postgresql / pgsandbox cold"), "x"),
        ("start-up: raw initdb+pg_ctl / pgsandbox warm", ratios.get("raw initdb+pg_ctl / pgsandbox warm"), "x"),
    ]


def isolation_figures(document: Any) -> Figures:
    ratios, per_test = document.get("ratios", {}), document.get("per_test_over_empty_ms", {})
    figures: Figures = [
        ("isolation: " + label, get(document, "cases", key, "whole_s"), "s")
        for key, label in (
            ("pgsandbox-transaction", "pgsandbox transaction, whole run of 200 tests"),
            ("pgsandbox-database", "pgsandbox database, whole run"),
            ("pytest-postgresql", "pytest-postgresql, whole run"),
            ("pytest-postgresql-shm", "pytest-postgresql on /dev/shm, whole run"),
            ("hand-rollback", "hand-written BEGIN/ROLLBACK, whole run"),
        )
        if key in document.get("cases", {})
    ]
    figures += [
        (
            "isolation: pgsandbox transaction adds per test (fixture only)",
            per_test.get("pgsandbox transaction adds, fixture only over empty (ms)"),
            "ms",
        ),
        (
            "isolation: pgsandbox database adds per test (fixture only)",
            per_test.get("pgsandbox database adds, fixture only over empty (ms)"),
            "ms",
        ),
    ]
    figures += [("isolation: " + name, value, "x") for name, value in ratios.items() if value is not None]
    return figures


def guards_figures(document: Any) -> Figures:
    return [
        ("guards: one close + open, guards as shipped", get(document, "medians_ms", "shipped"), "ms"),
        ("guards: one close + open, no guards (raw rollback)", get(document, "medians_ms", "none"), "ms"),
        ("guards: what the guards cost a test", get(document, "guards_cost_ms"), "ms"),
    ]


def sql_log_figures(document: Any) -> Figures:
    return [
        ("statement log: one test, pg_sql_log = off", get(document, "one_test_ms", "off"), "ms"),
        ("statement log: one test, jsonlog", get(document, "one_test_ms", "jsonlog"), "ms"),
        ("statement log: jsonlog / off", get(document, "ratio_to_off", "jsonlog"), "x"),
        ("statement log: jsonlog + read back / off", get(document, "ratio_to_off", "jsonlog+read"), "x"),
    ]


def fence_figures(document: Any) -> Figures:
    return [
        ("fence: connect + close, no fence", get(document, "connect_ms", "no fence"), "ms"),
        ("fence: connect + close, fenced (allowed)", get(document, "connect_ms", "fence"), "ms"),
        ("fence: its check per allowed connect", get(document, "check_us", "allowed"), "us"),
    ]


def factories_figures(document: Any) -> Figures:
    return [
        ("factories: hand-written INSERTs, per row", get(document, "per_row_ms", "hand-written"), "ms"),
        ("factories: pg.insert, per row", get(document, "per_row_ms", "pg.insert"), "ms"),
        ("factories: pg.insert / hand-written", get(document, "ratio_to_hand_written", "pg.insert"), "x"),
        ("factories: pg.insert_many / hand-written", get(document, "ratio_to_hand_written", "pg.insert_many"), "x"),
    ]


def connect_figures(document: Any) -> Figures:
    return [
        ("connect: connect + close over the Unix socket", get(document, "connect_ms", "socket"), "ms"),
        ("connect: connect + close over TCP loopback", get(document, "connect_ms", "tcp"), "ms"),
        (
            "connect: transaction isolation test, pg_listen = none",
            get(document, "transaction_isolation_ms", "none"),
            "ms",
        ),
        (
            "connect: transaction isolation test, TCP (default)",
            get(document, "transaction_isolation_ms", "127.0.0.1"),
            "ms",
        ),
    ]


@dataclass(frozen=True)
class Benchmark:
    script: str
    quick: tuple[str, ...]  # arguments of the quick run
    full: tuple[str, ...]  # BENCHMARKS.md's
    figures: Callable[[Any], Figures]


BENCHMARKS = {
    "startup": Benchmark("startup.py", ("--runs", "3"), ("--runs", "5"), startup_figures),
    "isolation": Benchmark(
        "isolation.py",
        ("--runs", "1", "--cases", ",".join(ISOLATION_CASES)),
        ("--runs", "3"),
        isolation_figures,
    ),
    "guards": Benchmark("guards.py", ("--tests", "300", "--rounds", "1"), (), guards_figures),
    "sql_log": Benchmark(
        "sql_log.py", ("--tests", "150", "--rounds", "1"), ("--tests", "400", "--rounds", "5"), sql_log_figures
    ),
    "fence": Benchmark("fence.py", ("--connects", "100", "--checks", "5000", "--starts", "3"), (), fence_figures),
    "factories": Benchmark("factories.py", ("--rows", "300", "--rounds", "3"), (), factories_figures),
    "connect": Benchmark(
        "connect.py",
        ("--connects", "100", "--queries", "1000", "--tests", "300", "--rounds", "1"),
        ("--connects", "500", "--queries", "5000", "--rounds", "5"),
        connect_figures,
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and smaller counts: a few minutes")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--logs", type=Path, metavar="DIR", help="keep each benchmark's output and JSON here")
    parser.add_argument("--verbose", action="store_true", help="show each benchmark's output as it runs")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = [name for name in chosen if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose among {', '.join(BENCHMARKS)}")
    logs = args.logs or Path(tempfile.mkdtemp(prefix="pgsandbox-bench-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    binaries = ["--bin", str(args.bin)] if args.bin else []
    binaries += ["--pg-version", args.pg_version] if args.pg_version else []
    print(f"command: {command_line()}")
    print(f"  load average at start: {load_average()}; each benchmark's output in {logs}", flush=True)
    began = time.perf_counter()
    figures: Figures = []
    failed: list[str] = []
    for name in chosen:
        benchmark = BENCHMARKS[name]
        result = logs / f"{name}.json"
        result.unlink(missing_ok=True)
        command = [
            sys.executable,
            str(BENCH / benchmark.script),
            *(benchmark.quick if args.quick else benchmark.full),
            *binaries,
            "--json",
            str(result),
        ]
        started = time.perf_counter()
        with open(logs / f"{name}.txt", "w") as log:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                if args.verbose:
                    print(line, end="", flush=True)
            status = process.wait()
        seconds = time.perf_counter() - started
        print(
            f"  {benchmark.script:<14} {'ok' if status == 0 else f'FAILED ({status})':<12} {seconds:6.0f} s", flush=True
        )
        if status != 0 or not result.exists():
            failed.append(name)
        if result.exists():
            figures += benchmark.figures(json.loads(result.read_text()))
    print(f"  load average at end: {load_average()}; {time.perf_counter() - began:.0f} s in all")
    width = max((len(what) for what, _, _ in figures), default=20) + 2
    print(f"\n{'headline figures' + (' (quick)' if args.quick else ''):<{width}}{'value':>10}")
    for what, value, unit in figures:
        shown = "-" if value is None else f"{value:.2f}{unit}" if unit == "x" else f"{value:.2f} {unit}"
        print(f"{what:<{width}}{shown:>10}")
    for name in failed:
        print(f"\nFAILED: {BENCHMARKS[name].script}, see {logs / (name + '.txt')}")
    write_json(args.json, {"quick": args.quick, "figures": [list(figure) for figure in figures], "failed": failed})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
