"""Scoped data (issue 16): rows a module's tests share made once for the module (pg_module) against once per
test (a function-scoped fixture on pg), whole pytest process; and what pg_reset_sequences costs a test.

Usage::

    python bench/scoped.py [--bin DIR | --pg-version N] [--modules N] [--tests N] [--rows N] [--rounds N]
                           [--sequence-tests N] [--part both|suite|sequences] [--json PATH]

Part 1: a generated suite on the reference schema (50 tables): ``--modules`` modules of ``--tests`` tests, each
test reading the rows a fixture made and writing one. The fixture inserts ``--rows`` rows into one table with
``executemany`` (what a factory or a seed helper does), as a module-scoped fixture on ``pg_module`` or as a
function-scoped one on ``pg``; a third variant has no fixture (what the suite costs without the data). Each
variant runs as ``python -m pytest`` with pgsandbox on a local server (cache warm: a first run built the
template), one after the other in each round; the median over rounds is printed.

Part 2: a sandbox (the reference schema, 50 sequences) opens and closes ``--sequence-tests`` transaction-isolation
databases back to back through the plain API, each test inserting one row (moving one sequence), as pytest
does between two tests; the median of one close + open with pg_reset_sequences off and on (alternating blocks of
20 tests in one process, so that both see the same load); and the same inside data a scope made
(``Sandbox.open_scope``, what ``pg_module`` does), where no transaction is opened ahead.
"""

from __future__ import annotations

import json
import statistics
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from harness import (
    BenchError,
    bench_parser,
    chosen_bindir,
    clean_env,
    command_line,
    load_average,
    pgsandbox_env,
    positive,
    run_snippet,
    run_timed,
    sandbox_project,
    schema_sql,
    scratch,
    shown_command,
    snippet_env,
    tail,
    write_json,
)

PYTEST_TIMEOUT = 900
VARIANTS = ("none", "per_test", "module")
# installed plugins the suite does not use (faker alone costs ~0.8 s of import per process): the same for every variant
UNUSED_PLUGINS = ["-p", "no:faker", "-p", "no:pytest-factoryboy", "-p", "no:pytest_postgresql", "-p", "no:anyio"]

FIXTURE = {
    "none": """
        @pytest.fixture
        def catalog():
            return None
    """,
    "per_test": """
        @pytest.fixture
        def catalog(pg):
            make_rows(pg.connection)
    """,
    "module": """
        @pytest.fixture(scope="module")
        def catalog(pg_module):
            make_rows(pg_module.connection)
    """,
}

MODULE = """
    import pytest

    ROWS = {rows}

    def make_rows(conn):
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO t0 (name, value, payload) VALUES (%s, %s, %s)",
                [(f"bench{{i}}", i % 100, "x" * 50) for i in range(ROWS)],
            )
    {fixture}
    @pytest.mark.parametrize("i", range({tests}))
    def test_reads_the_rows(pg, catalog, i):
        assert pg.fetchval("SELECT count(*) FROM t0") >= {template_rows}
        pg.execute("INSERT INTO t1 (name, value) VALUES ('written', 1)")
"""

# One process per variant (unscoped, scoped), the reset switched on and off in alternating blocks of tests, so that
# both see the same machine load; the first two tests of a block (the switch) are left out.
SEQUENCES_RUN = """
import json, statistics, sys, time
from pathlib import Path
from pgsandbox import Sandbox, Settings
variant, bindir, tests = sys.argv[1], sys.argv[2], int(sys.argv[3])
BLOCK = 20
settings = Settings(bin=Path(bindir), migrations=("sql:migrations",), server="local")
times = {False: [], True: []}
with Sandbox.start(settings, root=Path.cwd()) as box:
    scope = box.open_scope("module") if variant == "scoped" else None
    if scope is not None:
        scope.execute("INSERT INTO t0 (name, value) VALUES ('module', 1)")
    db = box.open("transaction", "t0")
    for i in range(tests):
        reset = (i // BLOCK) % 2 == 1
        db.execute("INSERT INTO t0 (name, value) VALUES ('one', 1)")
        started = time.perf_counter()
        box.close(db, next_test_id=f"t{i + 1}")
        db = box.open("transaction", f"t{i + 1}", reset_sequences=reset)
        if i % BLOCK >= 2:
            times[reset].append(time.perf_counter() - started)
    box.close(db)
    if scope is not None:
        box.close_scope(scope)
print(json.dumps([statistics.median(times[False]) * 1000, statistics.median(times[True]) * 1000]))
"""


def write_suite(root: Path, schema: str, variant: str, modules: int, tests: int, rows: int) -> Path:
    suite = sandbox_project(root / variant, schema)
    (suite / "pyproject.toml").write_text('[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n')
    source = textwrap.dedent(MODULE).format(
        rows=rows, fixture=textwrap.dedent(FIXTURE[variant]), tests=tests, template_rows=200
    )
    for number in range(modules):
        (suite / f"test_m{number:02}.py").write_text(source)
    return suite


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--modules", type=int, default=20, help="modules in the suite (default 20)")
    parser.add_argument("--tests", type=int, default=10, help="tests per module (default 10)")
    parser.add_argument("--rows", type=int, default=1000, help="rows the fixture inserts (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant (default 3)")
    parser.add_argument("--sequence-tests", type=int, default=800, help="tests per sequences run (default 800)")
    parser.add_argument("--part", choices=("both", "suite", "sequences"), default="both", help="what to measure")
    args = parser.parse_args(argv)
    positive(parser, args, "modules", "tests", "rows", "rounds", "sequence_tests")
    bindir = chosen_bindir(args)
    if bindir is None:
        return 2
    schema, origin = schema_sql()
    print(f"command: {command_line()}")
    print(f"  PostgreSQL: {bindir}; schema: {origin}; load average {load_average()}")
    print(f"  suite: {args.modules} modules x {args.tests} tests, the fixture inserting {args.rows} rows")
    suites: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    sequences: dict[str, list[float]] = {"off": [], "on": [], "scoped_off": [], "scoped_on": []}
    with scratch("pgsandbox-scoped-") as (work, data):
        env = {**clean_env(), **pgsandbox_env(bindir, runtime=data, cache=work / "cache")}
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", *UNUSED_PLUGINS]
        paths = {v: write_suite(work, schema, v, args.modules, args.tests, args.rows) for v in VARIANTS}
        try:
            run_timed(command, paths["none"], env, PYTEST_TIMEOUT)  # builds the template into the cache
            for _ in range(args.rounds if args.part != "sequences" else 0):
                for variant in VARIANTS:
                    out = run_timed(command, paths[variant], env, PYTEST_TIMEOUT)
                    if out.returncode != 0:
                        raise BenchError(f"pytest exited {out.returncode} ({variant}):\n{tail(out.output, 40)}")
                    suites[variant].append(out.seconds)
            project = sandbox_project(work / "sequences", schema)
            snippet = snippet_env(work / "cache")
            for _ in range(args.rounds if args.part != "suite" else 0):
                for variant in ("unscoped", "scoped"):
                    line = run_snippet(
                        SEQUENCES_RUN, [variant, str(bindir), str(args.sequence_tests)], project, snippet
                    )
                    off, on = json.loads(line)
                    prefix = "scoped_" if variant == "scoped" else ""
                    sequences[prefix + "off"].append(off)
                    sequences[prefix + "on"].append(on)
        except BenchError as error:
            print(error, file=sys.stderr)
            return 1
        shown = shown_command(command, env)
    medians = {variant: statistics.median(values) if values else 0.0 for variant, values in suites.items()}
    print(f"\nwhole pytest process, s (median of {args.rounds}; runs in brackets): {shown}")
    for variant, values in suites.items():
        print(f"  {variant:<9} {medians[variant]:6.2f}   [{', '.join(f'{v:.2f}' for v in values)}]")
    builds = {"per_test": args.modules * args.tests, "module": args.modules}
    data_cost = {v: medians[v] - medians["none"] for v in builds}
    for variant, count in builds.items():
        print(f"  the data costs {data_cost[variant]:.2f} s with {variant} ({count} builds)")
    ratio = medians["per_test"] / medians["module"] if medians["module"] else None
    print(f"  per test / module: {ratio:.2f}x the whole process" if ratio else "")
    seq = {variant: statistics.median(values) if values else 0.0 for variant, values in sequences.items()}
    print("\npg_reset_sequences: one close + open, ms (median over runs; runs in brackets)")
    for variant, values in sequences.items():
        print(f"  {variant:<10} {seq[variant]:.3f}   [{', '.join(f'{v:.3f}' for v in values)}]")
    print(f"  it costs {seq['on'] - seq['off']:.3f} ms per test (50 sequences)")
    scoped_cost = seq["scoped_on"] - seq["scoped_off"]
    print(f"  inside pg_module data (a read of the sequences at every start): {scoped_cost:.3f} ms")
    write_json(
        args.json,
        {
            "bindir": str(bindir),
            "suite_seconds": suites,
            "suite_medians": medians,
            "data_cost_seconds": data_cost,
            "sequence_ms": sequences,
            "sequence_medians_ms": seq,
            "reset_sequences_cost_ms": seq["on"] - seq["off"],
            "reset_sequences_scoped_cost_ms": seq["scoped_on"] - seq["scoped_off"],
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
