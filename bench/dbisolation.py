"""Database isolation in the shape of a real suite (issue 16): every test makes its own pool from its database's
URL and writes a few rows; what set-up plus teardown cost each test, and the whole process, side by side.

Usage::

    python bench/dbisolation.py [--tests N] [--runs N] [--cases a,b] [--json PATH] [--bin DIR | --pg-version N]
                                [--keep] [--user NAME]

The schema is the reference one (``bench/harness.py``: 50 tables of 200 rows, 3 indexes each). Test ``i`` makes
an SQLAlchemy engine (psycopg, a pool of 2) from the URL its fixture gives, inserts 3 rows into ``t{i % 50}``
and 3 into ``t{(i + 7) % 50}`` in one transaction, checks through a second pooled connection that the first
table holds 203 rows (the previous tests' rows are gone), and disposes of the engine. Every case runs the same
test module; only the ``db_url`` fixture in its conftest differs:

* pgsandbox database: ``pg.url("psycopg")`` with ``pg_isolation = "database"`` (warm cache), clones recycled
  (``pg_recycle_clones = auto``, the default);
* pgsandbox database, recycling off (context: what it was before, a new clone per test);
* pytest-postgresql: its ``postgresql`` fixture (the schema loaded into its template by ``postgresql_proc``),
  the URL built from the connection's parameters;
* hand-written conftest against a pre-started server: the server is started once by this script before the
  runs (initdb + ``pg_ctl start``, ``-F``, data on /dev/shm: what docker-compose or a CI service gives), the
  conftest loads the schema into a template database once per session and runs ``CREATE DATABASE ...
  TEMPLATE`` before each test and ``DROP DATABASE`` after it;
* empty: the same tests with a fixture that gives no database (context: pytest's own cost).

Visible per test: the test's set-up plus teardown (``pytest_runtest_logreport`` durations), the median and the
mean without the first set-up and the last teardown (the session fixtures'); whole process: spawn to exit. Runs
are interleaved (one of each case per round) after a discarded warm-up round.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    DURATIONS_ENV,
    NO_PGSANDBOX,
    NO_PYTEST_POSTGRESQL,
    RECORDER,
    ROWS,
    TABLES,
    BenchError,
    Runner,
    bench_parser,
    chosen_cases,
    clean_env,
    current_runner,
    divide,
    filesystem,
    fmt,
    load_average,
    machine_facts,
    package_version,
    pgsandbox_env,
    pgsandbox_revision,
    positive,
    print_facts,
    print_ratios,
    print_targets,
    pytest_postgresql_args,
    raw_server_commands,
    run_bench,
    run_timed,
    same_interpreter,
    schema_sql,
    shown_command,
    source_state,
    stop_stragglers,
    tail,
    unprivileged_runner,
    write_json,
)

PYTEST_TIMEOUT = 1800.0
SOCKET_ENV = "BENCH_SERVER_SOCKET"

TEST_MODULE = """\
import pytest
import sqlalchemy as sa


@pytest.mark.parametrize("i", range({tests}))
def test_write(db_url, i):
    if db_url is None:
        return
    engine = sa.create_engine(db_url, pool_size=2)
    try:
        with engine.begin() as conn:
            for table in (f"t{{i % {tables}}}", f"t{{(i + 7) % {tables}}}"):
                conn.execute(
                    sa.text(f"insert into {{table}} (name, value) values (:name, :value)"),
                    [{{"name": f"w{{i}}-{{k}}", "value": k}} for k in range(3)],
                )
        with engine.connect() as conn:
            assert conn.execute(sa.text(f"select count(*) from t{{i % {tables}}}")).scalar() == {expected}
    finally:
        engine.dispose()
"""

EMPTY = """
import pytest


@pytest.fixture
def db_url():
    return None
"""

PGSANDBOX = """
import pytest


@pytest.fixture
def db_url(pg):
    return pg.url("psycopg")
"""

PYTEST_POSTGRESQL = """
from pathlib import Path

import pytest
from pytest_postgresql import factories

postgresql_proc = factories.postgresql_proc(load=[Path(__file__).with_name("schema.sql")])
postgresql = factories.postgresql("postgresql_proc")


@pytest.fixture
def db_url(postgresql):
    info = postgresql.info
    return f"postgresql+psycopg://{info.user}@/{info.dbname}?host={info.host}&port={info.port}"
"""

HAND_PRESTARTED = """
import itertools
import os
from pathlib import Path

import psycopg
import pytest

SOCKET = os.environ["BENCH_SERVER_SOCKET"]
_names = itertools.count(1)


@pytest.fixture(scope="session")
def admin():
    template = f"tpl_{os.getpid()}"
    conn = psycopg.connect(host=SOCKET, user="postgres", dbname="postgres", autocommit=True)
    conn.execute(f"CREATE DATABASE {template}")
    with psycopg.connect(host=SOCKET, user="postgres", dbname=template, autocommit=True) as load:
        load.execute(Path(__file__).with_name("schema.sql").read_text())
    yield conn, template
    conn.execute(f"DROP DATABASE {template}")
    conn.close()


@pytest.fixture
def db_url(admin):
    conn, template = admin
    name = f"t_{os.getpid()}_{next(_names)}"
    conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    yield f"postgresql+psycopg://postgres@/{name}?host={SOCKET}"
    conn.execute(f"DROP DATABASE {name}")
"""

CASES = {
    "empty": "empty: no database (context)",
    "pgsandbox": "pgsandbox database",
    "pgsandbox-no-recycle": "pgsandbox database, recycling off (context)",
    "pytest-postgresql": "pytest-postgresql",
    "hand-prestarted": "hand-written CREATE DATABASE ... TEMPLATE, pre-started server",
}
CONTEXT = {"empty", "pgsandbox-no-recycle"}


@dataclass
class Run:
    whole_s: float
    visible_median_ms: float  # set-up + teardown of one test, median over the tests
    visible_mean_ms: float  # without the first set-up and the last teardown (the session's fixtures)
    setup_ms: float
    teardown_ms: float
    call_ms: float
    recycled: str = ""


@dataclass
class Case:
    key: str
    runner: Runner
    conftest: str
    ini: str
    args: list[str]
    env: dict[str, str]
    suite: Path
    runs: list[Run] = field(default_factory=list)
    error: str | None = None
    command: str = ""

    @property
    def label(self) -> str:
        return CASES[self.key]

    def stat(self, name: str) -> float | None:
        values = [getattr(run, name) for run in self.runs]
        return statistics.median(values) if values else None


def prepare(case: Case, tests: int, schema: str) -> None:
    case.runner.own(case.suite)
    files = {
        case.suite / "pyproject.toml": case.ini,
        case.suite / "conftest.py": RECORDER + case.conftest,
        case.suite / "test_app.py": TEST_MODULE.format(tests=tests, tables=TABLES, expected=ROWS + 3),
        case.suite / "schema.sql": schema,
    }
    if case.key.startswith("pgsandbox"):
        files[case.suite / "migrations/1_schema.sql"] = schema
    case.runner.write(files)


def run_case(case: Case, tests: int) -> Run:
    env = {**clean_env(), **case.runner.env, **case.env}
    durations = case.suite / "durations.json"
    env[DURATIONS_ENV] = str(durations)
    durations.unlink(missing_ok=True)
    command = [case.runner.python, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly", *case.args]
    if not case.command:
        case.command = f"cd {shlex.quote(str(case.suite))} && " + shown_command(
            [*command, "test_app.py"], env, ("PGSANDBOX_", "BENCH_SERVER")
        )
    out = run_timed([*command, "test_app.py"], case.suite, env, PYTEST_TIMEOUT, case.runner)
    if out.returncode != 0 or not durations.exists():
        raise BenchError(f"pytest exited {out.returncode}:\n{tail(out.output, 40)}")
    recorded: dict[str, Any] = json.loads(durations.read_text())
    phases = list(recorded["tests"].values())
    complete = [p for p in phases if {"setup", "call", "teardown"} <= p.keys() and not p.get("failed")]
    if len(complete) != tests:
        raise BenchError(f"{len(complete)} complete tests of {tests}:\n{tail(out.output, 40)}")
    visible = [(p["setup"] + p["teardown"]) * 1000 for p in phases]
    inner = sum(visible) - (phases[0]["setup"] + phases[-1]["teardown"]) * 1000
    databases = next((line for line in out.output.splitlines() if line.startswith("databases: ")), "")
    return Run(
        whole_s=out.seconds,
        visible_median_ms=statistics.median(visible),
        visible_mean_ms=inner / len(phases),
        setup_ms=statistics.median(p["setup"] * 1000 for p in phases),
        teardown_ms=statistics.median(p["teardown"] * 1000 for p in phases),
        call_ms=statistics.median(p["call"] * 1000 for p in phases),
        recycled=databases,
    )


def start_prestarted(bindir: Path, runner: Runner, base: Path) -> tuple[Path, list[str]]:
    """The pre-started server of the hand-written case (outside every timing): its socket directory and the
    command that stops it."""
    data, sock, log = runner.own(base) / "data", runner.own(base / "sock"), base / "server.log"
    initdb, start, stop = raw_server_commands(bindir, data, sock, log, fsync=False)
    for command in (initdb, start):
        out = subprocess.run(command, capture_output=True, text=True, **runner.popen_kwargs())
        if out.returncode != 0:
            raise BenchError(f"{shlex.join(command)} exited {out.returncode}: {out.stdout}{out.stderr}")
    return sock, stop


def report(
    cases: dict[str, Case], tests: int, runs: int, facts: dict[str, str], command: str, json_path: Path | None
) -> int:
    print()
    print(f"Database isolation, {tests} tests writing through their own pool, {TABLES}-table schema")
    print(f"command: {command}")
    print_facts(facts, 34)
    width = max(len(case.label) for case in cases.values()) + 2
    print()
    print(
        f"{'case (' + str(runs) + ' runs after 1 warm-up)':<{width}}{'whole (s)':>10}{'visible/test':>14}"
        f"{'mean':>8}{'setup':>8}{'teardown':>10}{'call':>8}"
    )
    rows: dict[str, dict[str, float | None]] = {}
    for case in cases.values():
        if not case.runs:
            print(f"{case.label:<{width}}  FAILED: {case.error}" if case.error else f"{case.label:<{width}}  -")
            continue
        rows[case.key] = {
            name: case.stat(name)
            for name in ("whole_s", "visible_median_ms", "visible_mean_ms", "setup_ms", "teardown_ms", "call_ms")
        }
        row = rows[case.key]
        print(
            f"{case.label:<{width}}{fmt(row['whole_s'], 2):>10}{fmt(row['visible_median_ms'], 2):>14}"
            f"{fmt(row['visible_mean_ms'], 2):>8}{fmt(row['setup_ms'], 2):>8}{fmt(row['teardown_ms'], 2):>10}"
            f"{fmt(row['call_ms'], 2):>8}"
        )
    print(
        "(whole: spawn to exit, median over runs; visible/test: set-up + teardown of one test, median over the tests"
        "\n then over runs; mean: the same, averaged, without the first set-up and the last teardown)"
    )
    for case in cases.values():
        lines = dict.fromkeys(run.recycled for run in case.runs if run.recycled)
        for line in lines:
            print(f"  {case.label}: pgsandbox's report: {line}")
    pgs, pp, hand = (rows.get(key, {}) for key in ("pgsandbox", "pytest-postgresql", "hand-prestarted"))
    ratios = {
        "pytest-postgresql / pgsandbox database (whole run)": divide(pp.get("whole_s"), pgs.get("whole_s")),
        "hand-written pre-started / pgsandbox database (whole run)": divide(hand.get("whole_s"), pgs.get("whole_s")),
        "pytest-postgresql / pgsandbox database (visible per test, mean)": divide(
            pp.get("visible_mean_ms"), pgs.get("visible_mean_ms")
        ),
        "hand-written pre-started / pgsandbox database (visible per test, mean)": divide(
            hand.get("visible_mean_ms"), pgs.get("visible_mean_ms")
        ),
    }
    visible = pgs.get("visible_mean_ms")
    targets = {"pgsandbox database: at most 5 ms visible per test (mean)": None if visible is None else visible <= 5}
    print()
    print_ratios(ratios, 72)
    print()
    print_targets(targets)
    for case in cases.values():
        if case.error:
            print(f"\nFAILED: {case.label}\n{case.error}\n  reproduce: {case.command}")
    write_json(
        json_path,
        {
            "command": command,
            "tests": tests,
            "runs": runs,
            "facts": facts,
            "cases": {
                case.key: {
                    "label": case.label,
                    **rows.get(case.key, {}),
                    "runs": [vars(run) for run in case.runs],
                    "error": case.error,
                    "command": case.command,
                }
                for case in cases.values()
            },
            "ratios": ratios,
            "targets": targets,
        },
    )
    return 1 if any(case.error for case in cases.values()) else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument("--tests", type=int, default=491, help="tests per run (default 491, the real suite's)")
    parser.add_argument("--runs", type=int, default=2, help="measured rounds (default 2)")
    parser.add_argument("--cases", help=f"comma-separated subset of: {', '.join(CASES)}")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories")
    parser.add_argument(
        "--user", default="postgres", help="as root: the unprivileged user that runs pytest-postgresql and pg_ctl"
    )
    args = parser.parse_args(argv)
    positive(parser, args, "tests", "runs")
    args.cases = chosen_cases(parser, args.cases, list(CASES))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_bench("bench/dbisolation.py", "pgsandbox-dbisolation-", parse_args(argv), argv, bench_main)


def bench_main(args: argparse.Namespace, bindir: Path, work: Path, data: Path, command: str) -> int:
    main_runner = current_runner()
    other: Runner | None = main_runner  # runs pg_ctl: pytest-postgresql and the pre-started server
    note = ""
    if os.geteuid() == 0:
        other, _, note = unprivileged_runner(args.user, work / "home")
        main_runner = same_interpreter(main_runner, other)
    schema, origin = schema_sql()
    revision = source_state()
    facts = {
        **machine_facts(bindir, main_runner, f"{pgsandbox_revision()}, {revision}"),
        "schema": f"{TABLES} tables x (3 indexes, {ROWS} rows): {origin}",
        "sqlalchemy, psycopg": f"{package_version('sqlalchemy') or '?'}, {package_version('psycopg') or '?'}",
        "load average at start": load_average(),
        "pgsandbox data": f"{data} on {filesystem(data)} (runtime dir), cache {work / 'cache'}",
    }
    if note:
        facts["note"] = note
    suites = work / "suites"
    suites.mkdir()
    pgs_ini = '[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\npg_isolation = "database"\n'
    pgs_env = pgsandbox_env(bindir, runtime=data, cache=work / "cache")
    stop: list[str] = []
    cases: dict[str, Case] = {}
    for key in args.cases:
        suite = suites / key
        if key == "empty":
            cases[key] = Case(key, main_runner, EMPTY, "", [*NO_PGSANDBOX, *NO_PYTEST_POSTGRESQL], {}, suite)
        elif key.startswith("pgsandbox"):
            ini = pgs_ini + ('pg_recycle_clones = "off"\n' if key == "pgsandbox-no-recycle" else "")
            cases[key] = Case(key, main_runner, PGSANDBOX, ini, NO_PYTEST_POSTGRESQL, pgs_env, suite)
        elif other is None:
            print(f"  SKIPPED {key}: {note or 'no user to run PostgreSQL as'}", file=sys.stderr)
        elif key == "pytest-postgresql":
            if importlib.util.find_spec("pytest_postgresql") is None:
                print("  SKIPPED pytest-postgresql: not installed", file=sys.stderr)
                continue
            basetemp = other.own(work / "pp") / "basetemp"
            pp_args = pytest_postgresql_args(bindir, other.own(work / "pp-sock"), basetemp)
            cases[key] = Case(key, other, PYTEST_POSTGRESQL, "", pp_args, {}, suite)
        elif key == "hand-prestarted":
            sock, stop = start_prestarted(bindir, other, data / "prestarted")
            facts["pre-started server"] = f"{sock.parent} on {filesystem(data)}, -F (fsync off), Unix socket"
            args_hand = [*NO_PGSANDBOX, *NO_PYTEST_POSTGRESQL]
            cases[key] = Case(key, other, HAND_PRESTARTED, "", args_hand, {SOCKET_ENV: str(sock)}, suite)
    for case in cases.values():
        prepare(case, args.tests, schema)
    roots = [work, data] if data != work else [work]
    print(f"command: {command}")
    print(f"{len(cases)} cases x {args.tests} tests, 1 warm-up + {args.runs} measured rounds ...", flush=True)
    try:
        for round_number in range(args.runs + 1):
            for case in cases.values():
                if case.error:
                    continue
                started = time.perf_counter()
                try:
                    result = run_case(case, args.tests)
                    if round_number:
                        case.runs.append(result)
                except (BenchError, OSError, subprocess.SubprocessError, ValueError) as error:
                    case.error = str(error)
                print(f"    {case.label}: {time.perf_counter() - started:.1f} s", flush=True)
            print(f"  round {round_number}/{args.runs} done" + (" (warm-up)" if not round_number else ""), flush=True)
    finally:
        if stop and other is not None:
            subprocess.run(stop, capture_output=True, **other.popen_kwargs())
        stop_stragglers(roots)
    facts["load average at end"] = load_average()
    return report(cases, args.tests, args.runs, facts, command, args.json)


if __name__ == "__main__":
    sys.exit(main())
