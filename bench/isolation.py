"""Per-test isolation benchmark (issue 3): 200 small tests on a 50-table schema, one pytest run per case.

Usage::

    python bench/isolation.py [--runs N] [--json PATH] [--bin DIR | --pg-version N] [--cases a,b] [--keep]
                              [--user NAME]

The schema is ``../shared/bench/schema50.sql`` next to the repository when present, else the identical SQL
generated here: 50 tables ``t0``..``t49`` with 3 indexes and 200 rows each. Every case runs the same 200 tests
(one parametrized function): test ``i`` inserts a row into ``t{i % 50}`` and asserts the table holds 201 rows,
which proves the previous test's write to it is gone. Each case is a separate ``python -m pytest`` run of a
generated project, timed from spawn to exit; a conftest hook records every test's setup + call + teardown
durations (``pytest_runtest_logreport``) into a JSON file, for the median cost of one test. Cases:

* empty: the same 200 tests with no database (context: pytest's own cost per test);
* pgsandbox transaction / database: ``pg_conn`` with ``pg_migrations = ["sql:migrations"]``, warm cache
  (filled by the warm-up round: the template comes from the cached cluster, no migration runs);
* pgsandbox schema (issue 18): the same with ``pg_isolation = "schema"``: no template database, the session
  migrates a schema of its own in the server's ``postgres`` database at every run (nothing is cached);
* pgsandbox transaction, cold cache: a new empty ``PGSANDBOX_CACHE`` each run (initdb, migration, snapshot);
* pytest-postgresql: its ``postgresql`` fixture, the schema loaded into its template by ``postgresql_proc``;
  data under pytest's basetemp in the temp directory, as by default; and (context) with basetemp on /dev/shm;
* hand-written conftests (initdb + ``pg_ctl start`` in a session fixture, data on /dev/shm, ``-F``):
  one session connection with BEGIN ... ROLLBACK per test; and (context) CREATE DATABASE ... TEMPLATE per test.

Issue 4 adds "fixture only" cases per client library (``driver-pg_session``, ``driver-pg_psycopg2``,
``driver-pg_aconn``, ``driver-pg_asyncpg``, ``driver-pg_async_session``, the async ones also with a
session-scoped event loop, ``...-session-loop``, and ``driver-pg_session-database``): what each fixture costs.

Runs are interleaved (one of each case per round) after one discarded warm-up round. Root handling, the
interpreter every pytest case runs and the clean-up of stray servers are those of ``bench/harness.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
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
    minus,
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

PYTEST_TIMEOUT = 900.0
TESTS = 200
DATA_ENV = "BENCH_DATA_DIR"

# ------------------------------------------------------------------------------------------- generated files


TEST_DB = """\
import pytest


@pytest.mark.parametrize("i", range({tests}))
def test_row({fixture}, i):
    table = f"t{{i % {tables}}}"
    {fixture}.execute(f"insert into {{table}} (name, value) values (%s, %s)", (f"bench{{i}}", i))
    assert {fixture}.execute(f"select count(*) from {{table}}").fetchone()[0] == {expected}
"""

# The fixture alone: what isolation costs a test, without the test's own queries.
TEST_FIXTURE_ONLY = """\
import pytest


@pytest.mark.parametrize("i", range({tests}))
def test_row({fixture}, i):
    assert {fixture} is not None
"""

TEST_EMPTY = """\
import pytest


@pytest.mark.parametrize("i", range({tests}))
def test_row(i):
    assert True
"""

PYTEST_POSTGRESQL = """
from pathlib import Path

from pytest_postgresql import factories

SCHEMA_PATH = Path(__file__).with_name("schema.sql")
postgresql_proc = factories.postgresql_proc(load=[SCHEMA_PATH])
postgresql = factories.postgresql("postgresql_proc")
"""

HAND_SERVER = """
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

SCHEMA = Path(__file__).with_name("schema.sql").read_text()
# bench/harness.py's raw_server_commands, fsync off: the same initdb and pg_ctl every benchmark runs
COMMANDS = {commands!r}


def _run(command, **paths):
    command = [part.format(**paths) for part in command]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{{command}} exited {{out.returncode}}: {{out.stdout}}{{out.stderr}}")


@pytest.fixture(scope="session")
def pg_socket():
    base = Path(tempfile.mkdtemp(prefix="run-", dir=os.environ["BENCH_DATA_DIR"]))
    paths = {{"data": base / "data", "sock": base / "sock", "log": base / "server.log"}}
    paths["sock"].mkdir()
    initdb, start, stop = COMMANDS
    _run(initdb, **paths)
    _run(start, **paths)
    try:
        yield str(paths["sock"])
    finally:
        _run(stop, **paths)
        shutil.rmtree(base, ignore_errors=True)
"""


def hand_server(bindir: Path) -> str:
    """The hand-written conftest's server: the raw primitives, paths filled in when the session starts."""
    return HAND_SERVER.format(commands=raw_server_commands(bindir, "{data}", "{sock}", "{log}", fsync=False))


HAND_ROLLBACK = """
@pytest.fixture(scope="session")
def session_conn(pg_socket):
    with psycopg.connect(host=pg_socket, user="postgres", dbname="postgres", autocommit=True) as admin:
        admin.execute("CREATE DATABASE bench")
    conn = psycopg.connect(host=pg_socket, user="postgres", dbname="bench", autocommit=True)
    conn.execute(SCHEMA)
    conn.autocommit = False
    yield conn
    conn.close()


@pytest.fixture
def db(session_conn):
    # psycopg opens the transaction (BEGIN) on the test's first statement
    yield session_conn
    session_conn.rollback()
"""

HAND_CLONE = """
_names = itertools.count(1)


@pytest.fixture(scope="session")
def admin(pg_socket):
    conn = psycopg.connect(host=pg_socket, user="postgres", dbname="postgres", autocommit=True)
    conn.execute("CREATE DATABASE tpl")
    with psycopg.connect(host=pg_socket, user="postgres", dbname="tpl", autocommit=True) as tpl:
        tpl.execute(SCHEMA)
    yield conn
    conn.close()


@pytest.fixture
def db(admin, pg_socket):
    name = f"t{{next(_names)}}"
    admin.execute(f"CREATE DATABASE {{name}} TEMPLATE tpl")
    conn = psycopg.connect(host=pg_socket, user="postgres", dbname=name)
    try:
        yield conn
    finally:
        conn.close()
        admin.execute(f"DROP DATABASE {{name}}")
"""


def test_module(fixture: str | None, body: bool = True) -> str:
    if fixture is None:
        return TEST_EMPTY.format(tests=TESTS)
    if not body:
        return TEST_FIXTURE_ONLY.format(tests=TESTS, fixture=fixture)
    return TEST_DB.format(tests=TESTS, fixture=fixture, tables=TABLES, expected=ROWS + 1)


# ------------------------------------------------------------------------------------------------ results

TEMPLATE_LINE = re.compile(
    r"^pgsandbox: (?P<layer>\w+) template (?P<hash>\w+) \((?P<labels>[^)]*)\): "
    r"cache (?P<result>hit|miss)(?:, built in (?P<seconds>[\d.]+) s)?"
)


@dataclass
class Run:
    whole_s: float
    per_test_ms: float  # median of setup + call + teardown over the tests
    mean_ms: float  # mean, without the first setup and the last teardown (session fixtures)
    setup_ms: float
    call_ms: float
    teardown_ms: float
    first_setup_s: float  # the first test's setup: the session fixtures start there
    last_teardown_s: float
    templates: list[dict[str, Any]] = field(default_factory=list)
    progress: list[str] = field(default_factory=list)


@dataclass
class Case:
    key: str
    label: str
    context: bool
    data: str  # where the case's database files live
    runs: list[Run] = field(default_factory=list)
    error: str | None = None
    commands: list[str] = field(default_factory=list)

    def stat(self, name: str) -> float | None:
        values = [getattr(run, name) for run in self.runs]
        return statistics.median(values) if values else None

    def wholes(self) -> list[float]:
        return [run.whole_s for run in self.runs]

    def template_summary(self) -> str:
        """``hit 3/3`` or ``miss 3/3 (built in 0.52 s)`` per template layer, over the measured runs."""
        if not self.runs:
            return "-"
        parts: list[str] = []
        layers = dict.fromkeys(t["layer"] for run in self.runs for t in run.templates)
        for layer in layers:
            found = [t for run in self.runs for t in run.templates if t["layer"] == layer]
            hits = sum(1 for t in found if t["result"] == "hit")
            misses = [t for t in found if t["result"] == "miss"]
            text = f"{layer}: hit {hits}/{len(self.runs)}"
            if misses:
                built = statistics.median(float(t["seconds"] or 0) for t in misses)
                text += f", miss {len(misses)}/{len(self.runs)} (migrated in {built:.2f} s, median)"
            parts.append(text)
        return "; ".join(parts) or "no template line in the output"


@dataclass
class PytestCase:
    case: Case
    runner: Runner
    fixture: str | None  # the fixture the tests take (None: no database)
    conftest: str
    ini: str
    args: list[str]
    env: dict[str, str]
    suite: Path
    schema: str
    migrations: bool = False  # pgsandbox: the schema as migrations/1_schema.sql
    fresh_cache: Path | None = None  # pgsandbox cold: a new empty PGSANDBOX_CACHE under here each run
    body: bool = True  # False: the tests take the fixture and run no query
    count: int = 0

    def prepare(self) -> None:
        self.runner.own(self.suite)
        files = {
            self.suite / "pyproject.toml": self.ini,
            self.suite / "conftest.py": RECORDER + self.conftest,
            self.suite / "test_isolation.py": test_module(self.fixture, self.body),
        }
        if self.fixture is not None:
            files[self.suite / ("migrations/1_schema.sql" if self.migrations else "schema.sql")] = self.schema
        self.runner.write(files)

    def command(self) -> list[str]:
        return [self.runner.python, "-m", "pytest", "-p", "no:cacheprovider", *self.args, "test_isolation.py"]

    def run(self) -> Run:
        self.count += 1
        env = {**clean_env(), **self.runner.env, **self.env}
        durations = self.suite / "durations.json"
        env[DURATIONS_ENV] = str(durations)
        if self.fresh_cache is not None:
            cache = self.fresh_cache / f"cold-{self.count}"
            cache.mkdir(parents=True)
            env["PGSANDBOX_CACHE"] = str(cache)
        durations.unlink(missing_ok=True)
        command = self.command()
        if not self.case.commands:
            shown = shown_command(command, env, ("PGSANDBOX_", "BENCH_DATA"))
            self.case.commands.append(f"cd {shlex.quote(str(self.suite))} && {shown}")
        try:
            out = run_timed(command, self.suite, env, PYTEST_TIMEOUT, self.runner)
        finally:
            if self.fresh_cache is not None:
                shutil.rmtree(env["PGSANDBOX_CACHE"], ignore_errors=True)
        whole, output = out.seconds, out.output
        if out.returncode != 0 or not durations.exists():
            raise BenchError(f"pytest exited {out.returncode}:\n{tail(output, 40)}")
        return parse_run(whole, json.loads(durations.read_text()), output)


def parse_run(whole: float, recorded: dict[str, Any], output: str) -> Run:
    tests: dict[str, dict[str, float]] = recorded["tests"]
    failed = [nodeid for nodeid, phases in tests.items() if phases.get("failed")]
    complete = [phases for phases in tests.values() if {"setup", "call", "teardown"} <= phases.keys()]
    if failed or len(complete) != TESTS:
        raise BenchError(f"{len(complete)} complete tests of {TESTS}, failed: {failed[:5]}\n{tail(output, 40)}")
    order = list(tests.values())  # in run order: the first setup and the last teardown hold the session's
    totals = [(p["setup"] + p["call"] + p["teardown"]) * 1000 for p in order]
    inner = sum(totals) - (order[0]["setup"] + order[-1]["teardown"]) * 1000
    templates: list[dict[str, Any]] = []
    progress: list[str] = []
    for line in output.splitlines():
        if line.startswith("pgsandbox: "):
            progress.append(line)
        match = TEMPLATE_LINE.match(line)
        if match:
            templates.append(match.groupdict())
    return Run(
        whole_s=whole,
        per_test_ms=statistics.median(totals),
        mean_ms=inner / len(order),
        setup_ms=statistics.median(p["setup"] * 1000 for p in order),
        call_ms=statistics.median(p["call"] * 1000 for p in order),
        teardown_ms=statistics.median(p["teardown"] * 1000 for p in order),
        first_setup_s=order[0]["setup"],
        last_teardown_s=order[-1]["teardown"],
        templates=templates,
        progress=progress,
    )


def run_once(roots: Sequence[Path], item: PytestCase, record: bool, stragglers: list[str]) -> None:
    case = item.case
    if case.error is not None:
        return
    try:
        result = item.run()
        if record:
            case.runs.append(result)
    except (BenchError, OSError, subprocess.SubprocessError, ValueError) as error:
        case.error = str(error)
        print(f"  {case.label}: FAILED\n{error}", file=sys.stderr)
    finally:
        left = stop_stragglers(roots)
        if left:
            stragglers += [f"after {case.key}: {line}" for line in left]
            print(f"  {case.label}: stopped processes left running: {'; '.join(left)}", file=sys.stderr)


# -------------------------------------------------------------------------------------------------- report


def report(
    runs: int,
    cases: dict[str, Case],
    facts: dict[str, str],
    skipped: dict[str, str],
    stragglers: list[str],
    command: str,
    json_path: Path | None,
) -> int:
    print()
    print(f"Per-test isolation: {TESTS} tests on a {TABLES}-table schema, one pytest run per case")
    print(f"command: {command}")
    print_facts(facts, 36)
    for key, reason in skipped.items():
        print(f"  SKIPPED {key}: {reason}")
    for case in cases.values():
        print(f"  data of {case.key + ':':<28} {case.data}")
    empty = cases.get("empty")
    tx = cases.get("pgsandbox-transaction")
    base_ms = empty.stat("per_test_ms") if empty else None
    tx_whole, tx_net = (tx.stat("whole_s"), minus(tx.stat("per_test_ms"), base_ms)) if tx else (None, None)

    print()
    width = max(len(case.label) for case in cases.values()) + 2
    head = (
        f"{'case (' + str(runs) + ' runs after 1 warm-up)':<{width}}"
        f"{'whole run (s)':>14}{'min':>7}{'max':>7}{'per test (ms)':>15}{'over empty':>12}"
        f"{'whole/pgs-tx':>14}{'net/pgs-tx':>12}{'1st setup (s)':>15}"
    )
    print(head)
    rows: dict[str, dict[str, float | None]] = {}
    for case in cases.values():
        if not case.runs:
            print(f"{case.label:<{width}}  FAILED (see below)" if case.error else f"{case.label:<{width}}  -")
            continue
        whole, per = case.stat("whole_s"), case.stat("per_test_ms")
        net = minus(per, base_ms) if case.key != "empty" else None
        rows[case.key] = {
            "whole_s": whole,
            "whole_min_s": min(case.wholes()),
            "whole_max_s": max(case.wholes()),
            "per_test_ms": per,
            "per_test_over_empty_ms": net,
            "whole_vs_pgsandbox_transaction": divide(whole, tx_whole),
            "net_vs_pgsandbox_transaction": divide(net, tx_net) if case.key != "empty" else None,
        }
        row = rows[case.key]
        print(
            f"{case.label:<{width}}{fmt(whole, 2):>14}{fmt(row['whole_min_s'], 2):>7}{fmt(row['whole_max_s'], 2):>7}"
            f"{fmt(per, 2):>15}{fmt(net, 2):>12}"
            f"{fmt(row['whole_vs_pgsandbox_transaction'], 2) + 'x':>14}"
            f"{(fmt(row['net_vs_pgsandbox_transaction'], 1) + 'x') if net is not None else '-':>12}"
            f"{fmt(case.stat('first_setup_s'), 2):>15}"
        )
    print(
        "(whole run: spawn to exit, median/min/max; per test: median of setup+call+teardown over the tests, then"
        " the median over runs;\n over empty: minus the empty case's; whole/pgs-tx and net/pgs-tx: whole run and"
        " per-test-over-empty against pgsandbox transaction's)"
    )
    print()
    print(f"{'per-test phases, medians (ms)':<{width}}{'setup':>9}{'call':>9}{'teardown':>10}{'mean':>9}")
    for case in cases.values():
        if case.runs:
            print(
                f"{case.label:<{width}}{fmt(case.stat('setup_ms'), 2):>9}{fmt(case.stat('call_ms'), 2):>9}"
                f"{fmt(case.stat('teardown_ms'), 2):>10}{fmt(case.stat('mean_ms'), 2):>9}"
            )
    print("(mean: all tests' time without the first setup and the last teardown, divided by the number of tests)")

    print()
    print("pgsandbox templates (measured runs):")
    for case in cases.values():
        if case.key.startswith("pgsandbox") and case.runs:
            print(f"  {case.label + ':':<{width}} {case.template_summary()}")
            lines = dict.fromkeys(line for run in case.runs for line in run.progress)
            for line in list(lines)[:6]:
                print(f"      {line}")
    for case in cases.values():
        if case.error is not None:
            print(f"\nFAILED after {len(case.runs)} measured run(s): {case.label}\n{case.error}")
            for line in case.commands:
                print(f"  reproduce: {line}")

    pp = cases.get("pytest-postgresql")
    pp_shm = cases.get("pytest-postgresql-shm")
    db = cases.get("pgsandbox-database")
    tx_empty = cases.get("pgsandbox-transaction-empty")
    db_empty = cases.get("pgsandbox-database-empty")
    pp_whole = pp.stat("whole_s") if pp else None
    pp_shm_whole = pp_shm.stat("whole_s") if pp_shm else None
    db_whole = db.stat("whole_s") if db else None
    db_net = minus(db.stat("per_test_ms"), base_ms) if db else None
    # the targets' "adds ... per test over an empty test": the fixture with no query in the test, minus no fixture
    tx_adds = minus(tx_empty.stat("per_test_ms"), base_ms) if tx_empty else None
    db_adds = minus(db_empty.stat("per_test_ms"), base_ms) if db_empty else None
    ratios: dict[str, float | None] = {
        "pytest-postgresql / pgsandbox transaction (whole run)": divide(pp_whole, tx_whole),
        "pytest-postgresql / pgsandbox database (whole run)": divide(pp_whole, db_whole),
        "pytest-postgresql on /dev/shm / pgsandbox transaction (whole run)": divide(pp_shm_whole, tx_whole),
        "pytest-postgresql on /dev/shm / pgsandbox database (whole run)": divide(pp_shm_whole, db_whole),
    }
    per_test = {
        "pgsandbox transaction, per test over empty (ms)": tx_net,
        "pgsandbox database, per test over empty (ms)": db_net,
        "pgsandbox transaction adds, fixture only over empty (ms)": tx_adds,
        "pgsandbox database adds, fixture only over empty (ms)": db_adds,
    }
    vs_tx, vs_db = divide(pp_whole, tx_whole), divide(pp_whole, db_whole)
    targets: dict[str, bool | None] = {
        "pytest-postgresql / pgsandbox transaction >= 10x": None if vs_tx is None else vs_tx >= 10,
        # issue 16: 10x and 4x, whole process (issue 3 asked 3x of database isolation)
        "pytest-postgresql / pgsandbox database >= 4x": None if vs_db is None else vs_db >= 4,
        "pgsandbox transaction adds < 1 ms per test (fixture only)": None if tx_adds is None else tx_adds < 1,
        "pgsandbox database adds < 10 ms per test (fixture only)": None if db_adds is None else db_adds < 10,
    }
    print()
    print_ratios(ratios, 58)
    for name, ms in per_test.items():
        print(f"  {name + ':':<58} {fmt(ms, 2)}")
    for case in cases.values():
        if case.key.startswith("pgsandbox") and case.runs:
            print(f"  {'migrations, ' + case.label + ':':<58} {case.template_summary()}")
    print()
    print_targets(targets)
    print(f"  servers left running after the runs: {len(stragglers) or 'none'}")
    for line in stragglers:
        print(f"    {line}")
    failed = [case for case in cases.values() if case.error is not None]
    if json_path is not None:
        document = {
            "command": command,
            "runs": runs,
            "tests": TESTS,
            "facts": facts,
            "skipped": skipped,
            "cases": {
                case.key: {
                    "label": case.label,
                    "context": case.context,
                    "data": case.data,
                    **rows.get(case.key, {}),
                    "templates": case.template_summary() if case.key.startswith("pgsandbox") else None,
                    "runs": [vars(run) for run in case.runs],
                    "error": case.error,
                    "commands": case.commands,
                }
                for case in cases.values()
            },
            "ratios": ratios,
            "per_test_over_empty_ms": per_test,
            "targets": targets,
            "stragglers": stragglers,
        }
        write_json(json_path, document)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------- main

CASES = {
    "empty": "empty: no database (context)",
    "pgsandbox-transaction": "pgsandbox transaction",
    "pgsandbox-database": "pgsandbox database",
    "pgsandbox-database-no-recycle": "pgsandbox database, recycling off (context, issue 16)",
    "pgsandbox-schema": "pgsandbox schema (issue 18: the session migrates its schema)",
    "pgsandbox-cold": "pgsandbox transaction, cold cache",
    "pgsandbox-transaction-empty": "pgsandbox transaction, fixture only (no query)",
    "pgsandbox-database-empty": "pgsandbox database, fixture only (no query)",
    "pytest-postgresql": "pytest-postgresql",
    "pytest-postgresql-shm": "pytest-postgresql, basetemp on /dev/shm (context)",
    "hand-rollback": "hand-written BEGIN/ROLLBACK",
    "hand-clone": "hand-written clone per test (context)",
    "hand-rollback-empty": "hand-written BEGIN/ROLLBACK, fixture only (context)",
}
# Issue 4: what each client library's fixture adds to a test (fixture only, transaction isolation).
DRIVER_FIXTURES = ("pg_session", "pg_psycopg2", "pg_aconn", "pg_asyncpg", "pg_async_session")
CASES.update({f"driver-{name}": f"pgsandbox transaction, {name} only" for name in DRIVER_FIXTURES})
CASES["driver-pg_session-database"] = "pgsandbox database, pg_session only"
ASYNC_FIXTURES = ("pg_aconn", "pg_asyncpg", "pg_async_session")
CASES.update(
    {f"driver-{name}-session-loop": f"pgsandbox transaction, {name} only, session loop" for name in ASYNC_FIXTURES}
)
CONTEXT = {"empty", "pytest-postgresql-shm", "hand-clone", "hand-rollback-empty", "pgsandbox-database-no-recycle"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument("--runs", type=int, default=3, help="measured rounds (default 3)")
    parser.add_argument("--cases", help=f"comma-separated subset of: {', '.join(CASES)}")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories (printed at the end)")
    parser.add_argument(
        "--user", default="postgres", help="as root: the unprivileged user that runs pytest-postgresql and pg_ctl"
    )
    args = parser.parse_args(argv)
    positive(parser, args, "runs")
    args.cases = chosen_cases(parser, args.cases, list(CASES))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_bench("bench/isolation.py", "pgsandbox-isolation-", parse_args(argv), argv, bench_main)


def bench_main(args: argparse.Namespace, bindir: Path, work: Path, data: Path, command: str) -> int:
    main_runner = current_runner()
    other: Runner | None = main_runner  # runs pg_ctl: pytest-postgresql and the hand-written conftests
    skipped: dict[str, str] = {}
    note = ""
    have_competitor = importlib.util.find_spec("pytest_postgresql") is not None
    if os.geteuid() == 0:
        other, _, note = unprivileged_runner(args.user, work / "home")
        main_runner = same_interpreter(main_runner, other)
    have_pgsandbox = importlib.util.find_spec("pgsandbox") is not None
    schema, schema_origin = schema_sql()

    revision = source_state()
    facts = {
        **machine_facts(bindir, main_runner, f"{pgsandbox_revision()}, {revision}"),
        "schema": f"{TABLES} tables x (3 indexes, {ROWS} rows): {schema_origin}",
        "psycopg": package_version("psycopg") or "?",
        "load average at start": load_average(),
        "pgsandbox cache": f"{work / 'caches'} on {filesystem(work)}",
        "empty, pgsandbox run as": main_runner.label
        + (" (pgsandbox runs the server as an unprivileged user itself)" if os.geteuid() == 0 else ""),
    }
    if other is not None:
        facts["pytest-postgresql, hand-written run as"] = other.label
    if note:
        facts["note"] = note

    suites = work / "suites"
    suites.mkdir()
    on_data = f"{data} on {filesystem(data)}"
    on_work = f"{work} on {filesystem(work)}"
    plain_ini = "[tool.pytest.ini_options]\n"
    pgs_ini = '[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n'
    bare = [*NO_PGSANDBOX, *NO_PYTEST_POSTGRESQL]
    pg_env = pgsandbox_env(bindir, runtime=data)
    pg_args = NO_PYTEST_POSTGRESQL
    warm_cache = pgsandbox_env(bindir, runtime=data, cache=work / "caches" / "warm")
    specs: dict[str, tuple[Runner | None, str, Any]] = {}

    def spec(key: str, runner: Runner | None, data_where: str, **kwargs: Any) -> None:
        specs[key] = (runner, data_where, kwargs)

    pgs_runner = main_runner if have_pgsandbox else None
    pp_runner = other if have_competitor else None
    spec(
        "empty",
        main_runner,
        "none",
        fixture=None,
        conftest="",
        ini=plain_ini,
        args=[*NO_PGSANDBOX, *NO_PYTEST_POSTGRESQL],
    )
    pgs = {"fixture": "pg_conn", "conftest": "", "args": pg_args, "migrations": True}
    spec("pgsandbox-transaction", pgs_runner, f"{on_data} (runtime dir)", ini=pgs_ini, env=warm_cache, **pgs)
    spec(
        "pgsandbox-database",
        pgs_runner,
        f"{on_data} (runtime dir)",
        ini=pgs_ini + 'pg_isolation = "database"\n',
        env=warm_cache,
        **pgs,
    )
    spec(
        "pgsandbox-database-no-recycle",
        pgs_runner,
        f"{on_data} (runtime dir)",
        ini=pgs_ini + 'pg_isolation = "database"\npg_recycle_clones = "off"\n',
        env=warm_cache,
        **pgs,
    )
    spec(
        "pgsandbox-schema",
        pgs_runner,
        f"{on_data} (runtime dir)",
        ini=pgs_ini + 'pg_isolation = "schema"\n',
        env=warm_cache,
        **pgs,
    )
    for key, isolation in (
        ("pgsandbox-transaction-empty", ""),
        ("pgsandbox-database-empty", 'pg_isolation = "database"\n'),
    ):
        spec(key, pgs_runner, f"{on_data} (runtime dir)", ini=pgs_ini + isolation, env=warm_cache, body=False, **pgs)
    async_ini = 'asyncio_mode = "auto"\nasyncio_default_fixture_loop_scope = "function"\n'
    for name in DRIVER_FIXTURES:
        spec(
            f"driver-{name}",
            pgs_runner,
            f"{on_data} (runtime dir)",
            ini=pgs_ini + async_ini,
            env=warm_cache,
            body=False,
            **{**pgs, "fixture": name},
        )
    session_loop = (
        'asyncio_mode = "auto"\nasyncio_default_fixture_loop_scope = "session"\n'
        'asyncio_default_test_loop_scope = "session"\n'
    )
    for name in ASYNC_FIXTURES:
        spec(
            f"driver-{name}-session-loop",
            pgs_runner,
            f"{on_data} (runtime dir)",
            ini=pgs_ini + session_loop,
            env=warm_cache,
            body=False,
            **{**pgs, "fixture": name},
        )
    spec(
        "driver-pg_session-database",
        pgs_runner,
        f"{on_data} (runtime dir)",
        ini=pgs_ini + 'pg_isolation = "database"\n',
        env=warm_cache,
        body=False,
        **{**pgs, "fixture": "pg_session"},
    )
    spec(
        "pgsandbox-cold",
        pgs_runner,
        f"{on_data} (runtime dir); cache {work / 'caches'}, new each run",
        ini=pgs_ini,
        env=pg_env,
        fresh_cache=work / "caches",
        **pgs,
    )
    if pp_runner is not None:
        sock = pp_runner.own(work / "pp-sock")
        pp = {"fixture": "postgresql", "conftest": PYTEST_POSTGRESQL, "ini": plain_ini}
        basetemp = pp_runner.own(work / "pp") / "basetemp"
        spec(
            "pytest-postgresql",
            pp_runner,
            f"{on_work} (--basetemp={basetemp})",
            args=pytest_postgresql_args(bindir, sock, basetemp),
            **pp,
        )
        shm_basetemp = pp_runner.own(data / "pp") / "basetemp"
        spec(
            "pytest-postgresql-shm",
            pp_runner if data != work else None,
            f"{on_data} (--basetemp={shm_basetemp})",
            args=pytest_postgresql_args(bindir, sock, shm_basetemp),
            **pp,
        )
    hand_data = f"{on_data}, server started with -F (fsync off), Unix socket only"
    for key, fixtures, body in (
        ("hand-rollback", HAND_ROLLBACK, True),
        ("hand-clone", HAND_CLONE, True),
        ("hand-rollback-empty", HAND_ROLLBACK, False),
    ):
        directory = other.own(data / key) if other is not None else data / key
        spec(
            key,
            other,
            hand_data,
            fixture="db",
            conftest=hand_server(bindir) + fixtures.format(),
            ini=plain_ini,
            args=bare,
            env={DATA_ENV: str(directory)},
            body=body,
        )

    cases: dict[str, Case] = {}
    items: list[PytestCase] = []
    for key in args.cases:
        if key not in specs or specs[key][0] is None:
            if key.startswith("pgsandbox"):
                skipped[key] = "pgsandbox is not importable here: `pip install -e .` from the repository"
            elif key.startswith("pytest-postgresql") and not have_competitor:
                skipped[key] = "pytest-postgresql is not installed: `pip install pytest-postgresql`"
            elif key == "pytest-postgresql-shm":
                skipped[key] = "no writable /dev/shm"
            else:
                skipped[key] = note or "no user to run PostgreSQL as"
            continue
        runner, data_where, kwargs = specs[key]
        assert runner is not None
        case = Case(key, CASES[key], key in CONTEXT, data_where)
        cases[key] = case
        items.append(
            PytestCase(
                case,
                runner,
                kwargs["fixture"],
                kwargs["conftest"],
                kwargs["ini"],
                kwargs["args"],
                kwargs.get("env", {}),
                suites / key,
                schema,
                migrations=kwargs.get("migrations", False),
                fresh_cache=kwargs.get("fresh_cache"),
                body=kwargs.get("body", True),
            )
        )
    if not items:
        print("no case to run", file=sys.stderr)
        return 2
    for item in items:
        item.prepare()

    roots = [work, data] if data != work else [work]
    stragglers: list[str] = []
    print(f"command: {command}")
    print(f"{len(items)} cases, 1 warm-up round + {args.runs} measured rounds, interleaved ...", flush=True)
    for round_number in range(args.runs + 1):
        for item in items:
            started = time.perf_counter()
            run_once(roots, item, round_number > 0, stragglers)
            print(f"    {item.case.label}: {time.perf_counter() - started:.1f} s", flush=True)
        print(f"  round {round_number}/{args.runs} done" + (" (warm-up)" if round_number == 0 else ""), flush=True)
    facts["load average at end"] = load_average()
    after = source_state()
    if after != revision:
        facts["WARNING"] = f"src/ changed during the runs: {revision} at start, {after} at the end"
    return report(args.runs, cases, facts, skipped, stragglers, command, args.json)


if __name__ == "__main__":
    sys.exit(main())
