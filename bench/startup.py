"""Session start-up benchmark (issue 2): from launching ``python -m pytest`` to the first test's body.

Usage::

    python bench/startup.py [--runs N] [--json PATH] [--bin DIR | --pg-version N] [--user NAME]
    python bench/startup.py --overhead [--runs N] [--timeline N] [--json PATH] [--bin DIR | --pg-version N]

Each case runs a one-test suite in a fresh temporary directory. The harness notes the wall clock just
before spawning ``python -m pytest``; the test writes ``time.time()`` when its body starts (and again
once a ``select 1`` has come back). Cases:

* pgsandbox cold: ``pg_server`` with an empty ``PGSANDBOX_CACHE`` each run (initdb included);
* pgsandbox warm: ``pg_server`` with the cache filled by an earlier run;
* pgsandbox warm and pgsandbox keep-alive, one database test (``pg``, a ``select 1``): the first starts a server
  from the filled cache each run; the second runs with ``PGSANDBOX_KEEP_ALIVE=10min``, so each run attaches to
  the server the warm-up round left running (its runtime directory is outside the one the harness sweeps after
  each run; the server and its watcher are stopped at the end);
* pytest-postgresql: its ``postgresql_proc`` session fixture, on the same PostgreSQL binaries;
* raw initdb + ``pg_ctl start -w`` (then stop), no Python at all;
* for context, pytest alone with no database, for each interpreter/user used.

Runs are interleaved (one of each case per round) after one discarded warm-up round. PostgreSQL refuses
to run as root: pgsandbox handles that itself, pytest-postgresql and raw ``pg_ctl`` do not, so as root
those run as an unprivileged user (``--user``, default ``postgres``) in directories that user owns. If
that user cannot run this interpreter (a virtualenv under /root, say), every pytest case, pgsandbox's
too, runs a system interpreter of the same version with this environment's import path on PYTHONPATH,
so that all cases pay the same interpreter start-up; failing that, pytest-postgresql is skipped.
Every temporary directory is removed at the end and any server still running from them is stopped.
Besides bench/harness.py, only pgsandbox's discovery of binaries runs in this process (pytest, pgsandbox and
pytest-postgresql run in subprocesses).

``--overhead`` (issue 16) measures instead what a database costs a whole run (``time pytest``): a project's
1-database-test run (``def test_db(<fixture>): ...``) minus its 1-plain-test run (``def test_plain(): ...``), both
with the same plugins, as medians of interleaved runs after one warm-up round, for pgsandbox (cache warm),
pgsandbox with ``pg_keep_alive = 10min`` in the project's pytest.ini (the warm-up round's database run starts the
server and keeps it; every measured database run attaches to it; issue 16's goal: at most 40 ms), pytest-postgresql
(``postgresql``), and a hand-written conftest against a server already running (initdb and ``pg_ctl start`` once,
outside the timing, with the harness's commands; a psycopg connection per test, rolled back). The kept-alive
server lives in a runtime directory of the benchmark's own and is stopped at the end with ``pgsandbox clean
RUN_ID`` (run by run: a plain ``pgsandbox clean`` would stop other runs' servers too). ``--timeline N`` adds N
runs of each pgsandbox project (database and plain, not counted in the figures) with a plugin that notes the
time of pytest's hooks, of the first import of psycopg, SQLAlchemy and pgsandbox's packages and of pgsandbox's
start-up steps, and prints their medians: where the overhead goes. Every pytest runs with Python's bytecode
cache on (a ``PYTHONPYCACHEPREFIX`` of its own, filled by the warm-up round), as an installed project runs:
``PYTHONDONTWRITEBYTECODE``, set on some machines, would make every run compile pgsandbox's modules and pytest
rewrite them again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    NO_PGSANDBOX,
    NO_PYTEST_POSTGRESQL,
    TIMELINE_ENV,
    TIMELINE_PLUGIN,
    TIMELINE_PLUGIN_NAME,
    BenchError,
    Runner,
    bench_parser,
    chosen_bindir,
    clean_env,
    current_runner,
    divide,
    filesystem,
    full_command,
    machine_facts,
    pgsandbox_env,
    pgsandbox_revision,
    positive,
    print_facts,
    print_ratios,
    print_targets,
    print_timeline,
    pytest_postgresql_args,
    raw_server_commands,
    run_timed,
    same_interpreter,
    scratch,
    shown_command,
    stop_kept_alive,
    stop_stragglers,
    tail,
    timeline_of,
    unprivileged_runner,
    write_json,
)

PYTEST_TIMEOUT = 180.0
RAW_TIMEOUT = 120.0
STAMP_ENV = "BENCH_STAMP_FILE"

TEST_HEADER = """\
import os
import time

import psycopg


def _stamp(body, query):
    with open(os.environ["BENCH_STAMP_FILE"], "w") as out:
        out.write(f"{body!r} {query!r}\\n")

"""

TEST_PGSANDBOX = (
    TEST_HEADER
    + """
def test_startup(pg_server):
    body = time.time()
    with pg_server.connect() as conn:
        conn.execute("select 1").fetchone()
    _stamp(body, time.time())
"""
)

TEST_PGSANDBOX_DATABASE = (
    TEST_HEADER
    + """
def test_startup(pg):
    body = time.time()
    pg.fetchval("select 1")
    _stamp(body, time.time())
"""
)

TEST_PYTEST_POSTGRESQL = (
    TEST_HEADER
    + """
def test_startup(postgresql_proc):
    body = time.time()
    proc = postgresql_proc
    with psycopg.connect(host=proc.host, port=proc.port, user=proc.user, password=proc.password,
                         dbname="postgres") as conn:
        conn.execute("select 1").fetchone()
    _stamp(body, time.time())
"""
)

TEST_BASELINE = (
    TEST_HEADER
    + """
def test_startup():
    body = time.time()
    _stamp(body, body)
"""
)


@dataclass
class Sample:
    body_ms: float
    query_ms: float | None
    exit_ms: float


@dataclass
class Case:
    key: str
    label: str
    context: bool = False  # a reference row, not one of the compared cases
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None
    commands: list[str] = field(default_factory=list)

    def values(self) -> list[float]:
        return [sample.body_ms for sample in self.samples]

    def median(self) -> float | None:
        return statistics.median(self.values()) if self.samples else None


@dataclass
class Bench:
    bindir: Path
    runs: int
    main: Runner
    other: Runner | None  # pytest-postgresql's runner (None: skipped)
    raw_runner: Runner | None
    work: Path  # system temp dir: suites, caches, pytest-postgresql's basetemp
    data: Path  # /dev/shm when present: pgsandbox's runtime dir and the raw cluster
    skipped: dict[str, str] = field(default_factory=dict)
    stragglers: list[str] = field(default_factory=list)

    @property
    def roots(self) -> list[Path]:
        return [self.work, self.data] if self.data != self.work else [self.work]


# --------------------------------------------------------------------------------------------- cases


@dataclass
class PytestCase:
    case: Case
    runner: Runner
    test: str
    args: list[str]
    env: dict[str, str]
    suite: Path
    fresh_cache: bool = False  # pgsandbox cold: a new empty PGSANDBOX_CACHE each run
    count: int = 0

    def prepare(self) -> None:
        self.runner.own(self.suite)
        self.runner.write({self.suite / "pytest.ini": "[pytest]\n", self.suite / "test_startup.py": self.test})

    def command(self) -> list[str]:
        return [self.runner.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *self.args, "test_startup.py"]

    def run(self, bench: Bench) -> Sample:
        self.count += 1
        env = {**clean_env(), **self.runner.env, **self.env}
        stamp = self.suite / "stamp"
        env[STAMP_ENV] = str(stamp)
        if self.fresh_cache:
            cache = bench.work / "caches" / f"cold-{self.count}"
            cache.mkdir(parents=True)
            env["PGSANDBOX_CACHE"] = str(cache)
        stamp.unlink(missing_ok=True)
        command = self.command()
        if not self.case.commands:
            self.case.commands.append(shown_command(command, env))
        try:
            out = run_timed(command, self.suite, env, PYTEST_TIMEOUT, self.runner)
        finally:
            if self.fresh_cache:
                shutil.rmtree(env["PGSANDBOX_CACHE"], ignore_errors=True)
        if out.returncode != 0 or not stamp.exists():
            raise BenchError(f"pytest exited {out.returncode}:\n{tail(out.output)}")
        body, query = (float(value) for value in stamp.read_text().split())
        return Sample((body - out.started) * 1000, (query - out.started) * 1000, out.seconds * 1000)


@dataclass
class RawCase:
    """initdb + ``pg_ctl start -w`` straight from the shell, then ``pg_ctl stop``: no Python, no pytest."""

    initdb: Case
    start: Case
    total: Case
    runner: Runner
    bindir: Path
    base: Path
    count: int = 0

    def run(self, bench: Bench) -> Sample:
        self.count += 1
        work = self.runner.own(self.base / f"raw-{self.count}")
        data, sock, log = work / "data", self.runner.own(work / "sock"), work / "server.log"
        output = work / "commands.log"
        initdb, start, stop = raw_server_commands(self.bindir, data, sock, log)
        if not self.total.commands:
            self.total.commands += [shlex.join(initdb), shlex.join(start), shlex.join(stop)]
        env = {**clean_env(), **{k: v for k, v in self.runner.env.items() if k != "PYTHONPATH"}}
        kwargs = self.runner.popen_kwargs()
        with open(output, "w") as sink:
            self.runner.chown(output)

            def call(command: list[str]) -> None:
                out = subprocess.run(
                    command,
                    cwd=work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    timeout=RAW_TIMEOUT,
                    **kwargs,
                )
                if out.returncode != 0:
                    sink.flush()
                    raise BenchError(
                        f"{shlex.join(command)} exited {out.returncode}:\n"
                        + tail(output.read_text())
                        + "\n"
                        + tail(log.read_text() if log.exists() else "")
                    )

            try:
                t0 = time.time()
                call(initdb)
                t1 = time.time()
                call(start)
                t2 = time.time()
                call(stop)
                t3 = time.time()
            finally:
                if (data / "postmaster.pid").exists():
                    subprocess.run(
                        [*stop[:-3], "immediate", "-D", str(data)],
                        cwd=work,
                        env=env,
                        capture_output=True,
                        timeout=RAW_TIMEOUT,
                        **kwargs,
                    )
                shutil.rmtree(work, ignore_errors=True)
        self.initdb.samples.append(Sample((t1 - t0) * 1000, None, (t1 - t0) * 1000))
        self.start.samples.append(Sample((t2 - t1) * 1000, None, (t2 - t1) * 1000))
        return Sample((t2 - t0) * 1000, None, (t3 - t0) * 1000)


Runnable = PytestCase | RawCase


def run_once(bench: Bench, item: Runnable, record: bool) -> None:
    case = item.total if isinstance(item, RawCase) else item.case
    if case.error is not None:
        return
    try:
        sample = item.run(bench)
        if record:
            case.samples.append(sample)
        elif isinstance(item, RawCase):  # the warm-up round is not recorded
            item.initdb.samples.clear()
            item.start.samples.clear()
    except (BenchError, OSError, subprocess.SubprocessError) as error:
        case.error = str(error)
        print(f"  {case.label}: FAILED\n{error}", file=sys.stderr)
    finally:
        left = stop_stragglers(bench.roots)
        if left:
            bench.stragglers += [f"after {case.key}: {line}" for line in left]
            print(f"  {case.label}: stopped processes left running: {'; '.join(left)}", file=sys.stderr)


# -------------------------------------------------------------------------------------------- report


def median(case: Case | None) -> float | None:
    return None if case is None else case.median()


def ratio(numerator: Case | None, denominator: Case | None) -> float | None:
    return divide(median(numerator), median(denominator))


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def report(bench: Bench, cases: dict[str, Case], facts: dict[str, str], command: str, json_path: Path | None) -> int:
    print()
    print("Session start-up: launch of `python -m pytest` -> first line of the first test's body")
    print(f"command: {command}")
    print_facts(facts, 34)
    for key, reason in bench.skipped.items():
        print(f"  SKIPPED {key}: {reason}")
    print()
    width = max(len(case.label) for case in cases.values()) + 2
    print(
        f"{'case (ms, ' + str(bench.runs) + ' runs, after 1 warm-up)':<{width}}"
        f"{'median':>8}{'min':>8}{'max':>8}{'select 1 done':>15}{'pytest exit':>13}"
    )
    for case in cases.values():
        if case.error is not None and not case.samples:
            print(f"{case.label:<{width}}  FAILED (see below)")
            continue
        if not case.samples:
            continue
        values = case.values()
        queries = [s.query_ms for s in case.samples if s.query_ms is not None]
        query = statistics.median(queries) if queries else None
        exits = statistics.median(s.exit_ms for s in case.samples)
        print(
            f"{case.label:<{width}}{fmt(case.median()):>8}{fmt(min(values)):>8}{fmt(max(values)):>8}"
            f"{fmt(query):>15}"
            f"{fmt(exits):>13}"
        )
    print(
        "(median/min/max: to the test body; 'select 1 done' and 'pytest exit': medians, same origin;"
        " raw 'pytest exit' = initdb+start+stop)"
    )
    for case in cases.values():
        if case.error is not None:
            print(f"\nFAILED after {len(case.samples)} measured run(s): {case.label}\n{case.error}")
    overhead = whole_process_overhead(cases)
    if overhead:
        print()
        print("Whole-process overhead: 'pytest exit' minus that of pytest with no database (medians)")
        for label, value in overhead.items():
            print(f"  {label:<52} {value:.0f} ms")
    warm, cold = cases.get("pgsandbox-warm"), cases.get("pgsandbox-cold")
    competitor, raw = cases.get("pytest-postgresql"), cases.get("raw")
    ratios = {
        "pytest-postgresql / pgsandbox warm": ratio(competitor, warm),
        "pytest-postgresql / pgsandbox cold": ratio(competitor, cold),
        "raw initdb+pg_ctl / pgsandbox warm": ratio(raw, warm),
    }
    print()
    print_ratios(ratios, 38)
    net = None
    w, c = median(warm), median(competitor)
    bm = median(cases.get("baseline"))
    bo = median(cases.get("baseline-other")) if "baseline-other" in cases else bm
    if w is not None and c is not None and bm is not None and bo is not None and w > bm:
        net = (c - bo) / (w - bm)
        print(
            f"  {'same, net of bare pytest start-up:':<38} {net:.2f}x  (context only: pytest-postgresql "
            f"{c - bo:.0f} ms vs pgsandbox warm {w - bm:.0f} ms above bare pytest)"
        )
    warm_ratio = ratios["pytest-postgresql / pgsandbox warm"]
    cold_ratio = ratios["pytest-postgresql / pgsandbox cold"]
    attach = overhead.get(OVERHEAD_LABELS["pgsandbox-keepalive"])
    targets: dict[str, bool | None] = {
        "warm start >= 3x faster than pytest-postgresql": None if warm_ratio is None else warm_ratio >= 3.0,
        "cold start no slower than pytest-postgresql": None if cold_ratio is None else cold_ratio >= 1.0,
        "keep-alive attach: whole-process overhead <= 40 ms (issue 16)": None if attach is None else attach <= 40,
    }
    print()
    print_targets(targets)
    print(f"  servers left running after the runs: {len(bench.stragglers) or 'none'}")
    for line in bench.stragglers:
        print(f"    {line}")
    failed = [case for case in cases.values() if case.error is not None]
    if json_path is not None:
        document = {
            "command": command,
            "runs": bench.runs,
            "facts": facts,
            "skipped": bench.skipped,
            "cases": {
                case.key: {
                    "label": case.label,
                    "context": case.context,
                    "median_ms": case.median(),
                    "min_ms": min(case.values()) if case.samples else None,
                    "max_ms": max(case.values()) if case.samples else None,
                    "samples": [vars(sample) for sample in case.samples],
                    "error": case.error,
                    "commands": case.commands,
                }
                for case in cases.values()
            },
            "ratios": ratios,
            "ratio_net_of_pytest": net,
            "whole_process_overhead_ms": overhead,
            "targets": targets,
            "stragglers": bench.stragglers,
        }
        write_json(json_path, document)
    return 1 if failed else 0


OVERHEAD_LABELS = {
    "pgsandbox-warm-db": "pgsandbox warm, one database test",
    "pgsandbox-keepalive": "pgsandbox keep-alive attach, one database test",
}


def whole_process_overhead(cases: dict[str, Case]) -> dict[str, float]:
    """Each one-database-test case's median whole-process time (to pytest's exit) over bare pytest's."""
    baseline = cases.get("baseline")
    if baseline is None or not baseline.samples:
        return {}
    bare = statistics.median(sample.exit_ms for sample in baseline.samples)
    found = {}
    for key, label in OVERHEAD_LABELS.items():
        case = cases.get(key)
        if case is not None and case.samples:
            found[label] = statistics.median(sample.exit_ms for sample in case.samples) - bare
    return found


# ---------------------------------------------------------------------------------------------- main


# ----------------------------------------------------------------------------------- whole-process overhead

PLAIN_TEST = "def test_plain():\n    ...\n"
HAND_WRITTEN_CONFTEST = """\
import psycopg
import pytest


@pytest.fixture
def db():
    with psycopg.connect(host={sock!r}, dbname="postgres", user="postgres") as conn:
        yield conn
        conn.rollback()
"""


@dataclass
class OverheadCase:
    """One tool: a project whose 1-database-test run and 1-plain-test run are timed in turn."""

    key: str
    label: str
    runner: Runner
    fixture: str
    args: list[str]
    env: dict[str, str]
    suite: Path
    conftest: str = ""
    ini: str = ""  # the project's settings (pytest.ini lines)
    plain: list[float] = field(default_factory=list)
    db: list[float] = field(default_factory=list)
    error: str | None = None
    commands: list[str] = field(default_factory=list)
    timelines: dict[str, list[dict[str, float]]] = field(default_factory=lambda: {"plain": [], "db": []})

    def prepare(self) -> None:
        files = {
            self.suite / "pytest.ini": "[pytest]\n" + self.ini,
            self.suite / "test_plain.py": PLAIN_TEST,
            self.suite / "test_db.py": f"def test_db({self.fixture}):\n    ...\n",
            self.suite / f"{TIMELINE_PLUGIN_NAME}.py": TIMELINE_PLUGIN,  # loaded by --timeline's runs only
        }
        if self.conftest:
            files[self.suite / "conftest.py"] = self.conftest
        self.runner.write(files)

    def run(self, test_file: str, pycache: Path, timeline: bool = False) -> float:
        env = {**clean_env(), **self.runner.env, **self.env, "PYTHONPYCACHEPREFIX": str(pycache)}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        plugins = ["-p", TIMELINE_PLUGIN_NAME] if timeline else []
        command = [self.runner.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *self.args, *plugins, test_file]
        if not timeline and len(self.commands) < 2:
            self.commands.append(shown_command(command, env))
        events = self.suite / "timeline.json"
        env[TIMELINE_ENV] = str(events)
        events.unlink(missing_ok=True)
        out = run_timed(command, self.suite, env, PYTEST_TIMEOUT, self.runner)
        if out.returncode != 0:
            raise BenchError(f"pytest exited {out.returncode}:\n{tail(out.output)}")
        if timeline:
            self.timelines["db" if test_file == "test_db.py" else "plain"].append(
                timeline_of(json.loads(events.read_text()), out.started, out.seconds)
            )
        return out.seconds * 1000

    def overhead(self) -> float | None:
        if not self.plain or not self.db:
            return None
        return statistics.median(self.db) - statistics.median(self.plain)

    def paired(self) -> float | None:
        pairs = [db - plain for plain, db in zip(self.plain, self.db, strict=False)]
        return statistics.median(pairs) if pairs else None


OVERHEAD_TARGET_MS = 150.0  # issue 16: a warm pgsandbox start costs a run at most this much
KEEP_ALIVE_TARGET_MS = 40.0  # issue 16: and at most this much when the run attaches to a kept-alive server
KEEP_ALIVE = "10min"


def overhead_main(args: argparse.Namespace, bindir: Path, work: Path, data: Path, command: str, kept: Path) -> int:
    main_runner = current_runner()
    other: Runner | None = main_runner
    raw_runner: Runner | None = main_runner
    skipped: dict[str, str] = {}
    note = ""
    if os.geteuid() == 0:
        other, raw_runner, note = unprivileged_runner(args.user, work / "home")
        main_runner = same_interpreter(main_runner, other)
    if importlib.util.find_spec("pytest_postgresql") is None:
        other = None
        note = "pytest-postgresql is not installed in this environment (pip install pytest-postgresql)"
    if other is None:
        skipped["pytest-postgresql"] = note
    facts = {
        **machine_facts(bindir, main_runner, pgsandbox_revision()),
        "pgsandbox data (runtime dir)": f"{data} on {filesystem(data)}",
        "pytest-postgresql data (basetemp)": f"{work} on {filesystem(work)} (its default: the temp dir)",
        "bytecode": "cached (PYTHONPYCACHEPREFIX in the work directory, filled by the warm-up round)",
    }
    suites = work / "suites"
    pycache = main_runner.own(work / "pycache")
    pycache.chmod(0o777)  # every runner's interpreter writes its bytecode there
    cases: list[OverheadCase] = [
        OverheadCase(
            "pgsandbox-warm",
            "pgsandbox, cache warm (pg)",
            main_runner,
            "pg",
            NO_PYTEST_POSTGRESQL,
            pgsandbox_env(bindir, runtime=data, cache=work / "caches" / "warm"),
            suites / "pgsandbox",
        ),
        # the project keeps its server (pg_keep_alive): the warm-up round's database run starts it, every later
        # one attaches; it lives in a runtime directory of its own, outside what is swept after each run
        OverheadCase(
            "pgsandbox-keepalive",
            "pgsandbox, keep-alive (pg)",
            main_runner,
            "pg",
            NO_PYTEST_POSTGRESQL,
            pgsandbox_env(bindir, runtime=kept, cache=work / "caches" / "keepalive"),
            suites / "keepalive",
            ini=f"pg_keep_alive = {KEEP_ALIVE}\n",
        ),
    ]
    facts["pgsandbox keep-alive"] = f"pg_keep_alive = {KEEP_ALIVE} in pytest.ini, runtime dir {kept}"
    if other is not None:
        sock = other.own(work / "pp-sock")
        cases.append(
            OverheadCase(
                "pytest-postgresql",
                "pytest-postgresql (postgresql)",
                other,
                "postgresql",
                pytest_postgresql_args(bindir, sock, other.own(work / "pp") / "basetemp"),
                {},
                suites / "pp",
            )
        )
    server: list[str] = []
    if raw_runner is None:
        skipped["hand-written conftest"] = note
    else:
        base = raw_runner.own(work / "running")
        sock = raw_runner.own(base / "sock")
        initdb, start, stop = raw_server_commands(bindir, base / "data", sock, base / "server.log")
        env = {**clean_env(), **{k: v for k, v in raw_runner.env.items() if k != "PYTHONPATH"}}
        for step in (initdb, start):
            out = subprocess.run(
                step,
                cwd=base,
                env=env,
                capture_output=True,
                text=True,
                timeout=RAW_TIMEOUT,
                **raw_runner.popen_kwargs(),
            )
            if out.returncode != 0:
                print(f"{shlex.join(step)} failed:\n{tail(out.stdout + out.stderr)}", file=sys.stderr)
                return 1
        server = stop
        facts["already running server"] = f"{shlex.join(initdb)}; {shlex.join(start)} (once, not timed)"
        cases.append(
            OverheadCase(
                "hand-written",
                "hand-written conftest, server already running (db)",
                main_runner,
                "db",
                [*NO_PGSANDBOX, *NO_PYTEST_POSTGRESQL],
                {},
                suites / "hand",
                HAND_WRITTEN_CONFTEST.format(sock=str(sock)),
            )
        )
    for case in cases:
        case.prepare()
    print(f"command: {command}")
    print(f"{len(cases)} cases x (plain, db), 1 warm-up round + {args.runs} measured rounds, interleaved ...")
    try:
        for round_number in range(args.runs + 1):
            for case in cases:
                if case.error is not None:
                    continue
                # the order within a pair alternates, so that neither run always follows the other tool's
                order = ("plain", "db") if round_number % 2 else ("db", "plain")
                try:
                    for which in order:
                        ms = case.run(f"test_{which}.py", pycache)
                        if round_number > 0:
                            (case.plain if which == "plain" else case.db).append(ms)
                except (BenchError, OSError, subprocess.SubprocessError) as error:
                    case.error = str(error)
                    print(f"  {case.label}: FAILED\n{error}", file=sys.stderr)
                finally:  # the already running server lives elsewhere (work / "running")
                    for line in stop_stragglers([data, work / "pp"]):
                        case.error = case.error or f"left running after its runs: {line}"
            print(f"  round {round_number}/{args.runs} done" + (" (warm-up)" if round_number == 0 else ""), flush=True)
        timed_cases = [case for case in cases if case.key.startswith("pgsandbox") and case.error is None]
        for round_number in range(args.timeline):
            for case in timed_cases:
                order = ("plain", "db") if round_number % 2 else ("db", "plain")
                try:
                    for which in order:
                        case.run(f"test_{which}.py", pycache, timeline=True)
                except (BenchError, OSError, subprocess.SubprocessError, ValueError) as error:
                    print(f"  {case.label}: timeline run FAILED\n{error}", file=sys.stderr)
                finally:
                    stop_stragglers([data, work / "pp"])
            print(f"  timeline round {round_number + 1}/{args.timeline} done", flush=True)
    finally:
        if server and raw_runner is not None:
            subprocess.run(server, capture_output=True, timeout=RAW_TIMEOUT, **raw_runner.popen_kwargs())
    servers = sorted(path.name for path in kept.glob("pgsandbox-*/run-*"))
    attached = "every run after the warm-up attached to it" if len(servers) == 1 else "NOT one: runs started servers"
    facts["kept-alive servers after the runs"] = f"{len(servers)} ({', '.join(servers)}; {attached})"
    return overhead_report(args, cases, facts, skipped, command)


def overhead_report(
    args: argparse.Namespace,
    cases: list[OverheadCase],
    facts: dict[str, str],
    skipped: dict[str, str],
    command: str,
) -> int:
    print()
    print("Whole-process overhead of a database: `time pytest` of a 1-database-test run minus a 1-plain-test run")
    print(f"command: {command}")
    print_facts(facts, 34)
    for key, reason in skipped.items():
        print(f"  SKIPPED {key}: {reason}")
    print()
    width = max(len(case.label) for case in cases) + 2
    print(f"{f'case (ms, medians of {args.runs} runs)':<{width}}{'plain':>8}{'db':>8}{'overhead':>10}{'paired':>8}")
    for case in cases:
        if case.error is not None and not case.db:
            print(f"{case.label:<{width}}  FAILED (see below)")
            continue
        plain = statistics.median(case.plain) if case.plain else None
        db = statistics.median(case.db) if case.db else None
        print(f"{case.label:<{width}}{fmt(plain):>8}{fmt(db):>8}{fmt(case.overhead()):>10}{fmt(case.paired()):>8}")
    print("(overhead: median db - median plain; paired: median of each round's db - plain)")
    for case in cases:
        if case.error is not None:
            print(f"\nFAILED after {len(case.db)} measured run(s): {case.label}\n{case.error}")
    by_key = {case.key: case for case in cases}
    ours = by_key["pgsandbox-warm"].overhead()

    def versus(key: str) -> float | None:
        return divide(by_key[key].overhead(), ours) if key in by_key else None

    ratios = {
        "pytest-postgresql / pgsandbox warm": versus("pytest-postgresql"),
        "hand-written, running server / pgsandbox warm": versus("hand-written"),
        "pgsandbox keep-alive / pgsandbox warm": versus("pgsandbox-keepalive"),
    }
    print()
    print_ratios(ratios, 48)
    attach = by_key["pgsandbox-keepalive"].overhead()
    targets: dict[str, bool | None] = {
        f"pgsandbox warm overhead at most {OVERHEAD_TARGET_MS:.0f} ms": None
        if ours is None
        else ours <= OVERHEAD_TARGET_MS,
        f"pgsandbox keep-alive overhead at most {KEEP_ALIVE_TARGET_MS:.0f} ms": None
        if attach is None
        else attach <= KEEP_ALIVE_TARGET_MS,
    }
    print()
    print_targets(targets)
    timelines = {
        case.key: print_timeline(case.label, {"db run": case.timelines["db"], "plain": case.timelines["plain"]})
        for case in cases
        if case.timelines["db"]
    }
    if args.json is not None:
        document = {
            "command": command,
            "runs": args.runs,
            "facts": facts,
            "skipped": skipped,
            "cases": {
                case.key: {
                    "label": case.label,
                    "plain_ms": case.plain,
                    "db_ms": case.db,
                    "overhead_ms": case.overhead(),
                    "paired_ms": case.paired(),
                    "error": case.error,
                    "commands": case.commands,
                }
                for case in cases
            },
            "ratios": ratios,
            "targets": targets,
            "timelines": timelines,
        }
        write_json(args.json, document)
    return 1 if any(case.error is not None for case in cases) else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument("--runs", type=int, default=5, help="measured runs per case (default 5)")
    parser.add_argument(
        "--overhead",
        action="store_true",
        help="measure a database's whole-process overhead instead (1-database-test run minus 1-plain-test run)",
    )
    parser.add_argument(
        "--timeline",
        type=int,
        default=0,
        metavar="N",
        help="with --overhead: N more runs of each pgsandbox project with a plugin that notes the time of pytest's "
        "hooks, imports and pgsandbox's start-up steps, and print their medians (where the overhead goes)",
    )
    parser.add_argument(
        "--user", default="postgres", help="as root: the unprivileged user that runs pytest-postgresql and raw pg_ctl"
    )
    args = parser.parse_args(argv)
    positive(parser, args, "runs")
    if args.timeline < 0 or (args.timeline and not args.overhead):
        parser.error("--timeline N needs --overhead and N >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = full_command("bench/startup.py", argv)
    bindir = chosen_bindir(args)
    if bindir is None:
        return 2
    with scratch("pgsandbox-bench-") as (work, data):
        # the keep-alive case's server outlives each run: outside what the harness sweeps after every run
        kept = Path(tempfile.mkdtemp(prefix="pgsandbox-bench-keepalive-", dir=data.parent))
        kept.chmod(0o755)
        try:
            if args.overhead:
                return overhead_main(args, bindir, work, data, command, kept)
            return bench_main(args, bindir, work, data, command, kept)
        finally:
            stop_kept(kept)
    return 130  # interrupted


def stop_kept(kept: Path) -> None:
    """Stop the servers the keep-alive case left in ``kept`` with ``pgsandbox clean``; anything still running
    there afterwards (clean failed, or a watcher outlived it) is stopped too, and said."""
    try:
        for line in stop_kept_alive(current_runner(), kept):
            print(f"pgsandbox clean: {line}")
    except (BenchError, OSError, subprocess.SubprocessError) as error:
        print(f"pgsandbox clean failed: {error}", file=sys.stderr)
    left = stop_stragglers([kept])
    shutil.rmtree(kept, ignore_errors=True)
    if left:
        print(f"still running after pgsandbox clean, stopped: {'; '.join(left)}", file=sys.stderr)


def bench_main(args: argparse.Namespace, bindir: Path, work: Path, data: Path, command: str, kept: Path) -> int:
    main_runner = current_runner()
    skipped: dict[str, str] = {}
    other: Runner | None = main_runner
    raw_runner: Runner | None = main_runner
    note = ""
    have_competitor = importlib.util.find_spec("pytest_postgresql") is not None
    if os.geteuid() == 0:
        other, raw_runner, note = unprivileged_runner(args.user, work / "home")
        if other is None and have_competitor:
            skipped["pytest-postgresql"] = note
        if raw_runner is None:
            skipped["raw initdb + pg_ctl"] = note
        main_runner = same_interpreter(main_runner, other)
    if not have_competitor:
        other = None
        skipped["pytest-postgresql"] = (
            "not installed in this environment; install it with `pip install pytest-postgresql` to compare"
        )
    have_pgsandbox = importlib.util.find_spec("pgsandbox") is not None
    if not have_pgsandbox:
        skipped["pgsandbox"] = "not importable here; install it with `pip install -e .` from the repository"
    bench = Bench(bindir, args.runs, main_runner, other, raw_runner, work, data, skipped)

    facts = {
        **machine_facts(bindir, main_runner, pgsandbox_revision()),
        "pgsandbox data (runtime dir)": f"{data} on {filesystem(data)}",
        "pytest-postgresql data (basetemp)": f"{work} on {filesystem(work)} (its default: the temp dir)",
        "raw initdb + pg_ctl data": f"{data} on {filesystem(data)}",
        "pgsandbox runs as": main_runner.label
        + (" (pgsandbox runs the server as an unprivileged user itself)" if os.geteuid() == 0 else ""),
    }
    if other is not None:
        facts["pytest-postgresql runs as"] = other.label
    if raw_runner is not None:
        facts["raw initdb + pg_ctl runs as"] = raw_runner.label
    if note and other is not None:
        facts["note"] = note

    cases: dict[str, Case] = {}
    items: list[Runnable] = []

    def add(key: str, label: str, context: bool = False) -> Case:
        cases[key] = Case(key, label, context)
        return cases[key]

    suites = work / "suites"
    suites.mkdir()
    baseline = add("baseline", "pytest + import psycopg, no database (context)", True)
    bare = [*NO_PGSANDBOX, *NO_PYTEST_POSTGRESQL]
    items.append(PytestCase(baseline, main_runner, TEST_BASELINE, bare, {}, suites / "baseline"))
    if have_pgsandbox:
        pg_env = pgsandbox_env(bindir, runtime=data)
        items.append(
            PytestCase(
                add("pgsandbox-cold", "pgsandbox cold (empty cache each run)"),
                main_runner,
                TEST_PGSANDBOX,
                NO_PYTEST_POSTGRESQL,
                dict(pg_env),
                suites / "cold",
                fresh_cache=True,
            )
        )
        warm_env = {**pg_env, "PGSANDBOX_CACHE": str(work / "caches" / "warm")}
        items.append(
            PytestCase(
                add("pgsandbox-warm", "pgsandbox warm (cache filled)"),
                main_runner,
                TEST_PGSANDBOX,
                NO_PYTEST_POSTGRESQL,
                warm_env,
                suites / "warm",
            )
        )
        items.append(
            PytestCase(
                add("pgsandbox-warm-db", "pgsandbox warm, one database test (pg)"),
                main_runner,
                TEST_PGSANDBOX_DATABASE,
                NO_PYTEST_POSTGRESQL,
                warm_env,
                suites / "warm-db",
            )
        )
        items.append(
            PytestCase(
                add("pgsandbox-keepalive", "pgsandbox keep-alive attach, one database test (pg)"),
                main_runner,
                TEST_PGSANDBOX_DATABASE,
                NO_PYTEST_POSTGRESQL,
                {**warm_env, "PGSANDBOX_RUNTIME_DIR": str(kept), "PGSANDBOX_KEEP_ALIVE": "10min"},
                suites / "keepalive",
            )
        )
    if other is not None:
        sock = other.own(work / "pp-sock")
        items.append(
            PytestCase(
                add("pytest-postgresql", "pytest-postgresql postgresql_proc"),
                other,
                TEST_PYTEST_POSTGRESQL,
                pytest_postgresql_args(bindir, sock, other.own(work / "pp") / "basetemp"),
                {},
                suites / "pp",
            )
        )
        if data != work:
            shm_case = add("pytest-postgresql-shm", f"pytest-postgresql, basetemp on {data.parent} (context)", True)
            items.append(
                PytestCase(
                    shm_case,
                    other,
                    TEST_PYTEST_POSTGRESQL,
                    pytest_postgresql_args(bindir, sock, other.own(data / "pp") / "basetemp"),
                    {},
                    suites / "pp-shm",
                )
            )
        interpreter = (other.python, other.env.get("PYTHONPATH"))
        if interpreter != (main_runner.python, main_runner.env.get("PYTHONPATH")):
            other_baseline = add("baseline-other", "pytest + import psycopg, as pytest-postgresql runs it", True)
            items.append(PytestCase(other_baseline, other, TEST_BASELINE, bare, {}, suites / "baseline-other"))
    if raw_runner is not None:
        raw_initdb = add("raw-initdb", "raw initdb (no pytest)", True)
        raw_start = add("raw-start", "raw pg_ctl start -w (no pytest)", True)
        items.append(
            RawCase(
                raw_initdb,
                raw_start,
                add("raw", "raw initdb + pg_ctl start -w (no pytest)"),
                raw_runner,
                bindir,
                data / "raw",
            )
        )
        raw_runner.own(data / "raw")
    for item in items:
        if isinstance(item, PytestCase):
            item.prepare()

    print(f"command: {command}")
    print(f"{len(items)} cases, 1 warm-up round + {args.runs} measured rounds, interleaved ...")
    for round_number in range(args.runs + 1):
        for item in items:
            run_once(bench, item, record=round_number > 0)
        print(f"  round {round_number}/{args.runs} done" + (" (warm-up)" if round_number == 0 else ""), flush=True)
    return report(bench, cases, facts, command, args.json)


if __name__ == "__main__":
    sys.exit(main())
