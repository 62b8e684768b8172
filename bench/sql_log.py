"""What the statement log costs (issue 6): per statement, per test, and when a test fails or counts queries.

Usage::

    python bench/sql_log.py [--bin DIR | --pg-version N] [--tests N] [--statements N] [--rounds N] [--json PATH]

A sandbox on a local server (the reference 50-table schema) runs N transaction-isolation tests back to back
through the plain API, as pytest does; each test runs S statements on its connection (a parameterised
``SELECT`` by primary key, through psycopg's extended protocol, which the server logs as three lines: parse,
bind, execute). Each variant runs in its own process, interleaved over the rounds:

- ``off``: ``pg_sql_log = off``, the server logs nothing (the raw PostgreSQL primitive: the same statements);
- ``jsonlog`` and ``csvlog``: every statement logged, nothing read (a passing test);
- ``jsonlog+read``: as a failing test, the test's SQL read back from the log after each test
  (``Sandbox.diagnostics.sql_of``, what the failure report does).

Printed: the median time of one test (its statements, its close and the next one's open), the ratio to ``off``,
and the cost per statement; then the median cost of one ``pg_queries`` block (two marks) with nothing in it.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from harness import (
    BenchError,
    bench_parser,
    chosen_bindir,
    command_line,
    positive,
    run_snippet,
    sandbox_project,
    schema_sql,
    snippet_env,
    write_json,
)

ONE_RUN = """
import statistics, sys, time
from pathlib import Path
from pgsandbox import Sandbox, Settings
from pgsandbox.sandbox.queries import Queries
variant, bindir, tests, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
log = variant.split("+")[0]
settings = Settings(bin=Path(bindir), migrations=("sql:migrations",), server="local", sql_log=log)
with Sandbox.start(settings, root=Path.cwd()) as box:
    times, reads = [], []
    db = box.open("transaction", "t0")
    for i in range(tests):
        started = time.perf_counter()
        conn = db.connection
        for n in range(count):
            conn.execute("SELECT id FROM t1 WHERE id = %s", [n])
        if variant.endswith("+read"):
            read = time.perf_counter()
            found, _, _ = box.diagnostics.sql_of(db)
            assert len([s for s in found if s.counted]) == count, [s.sql for s in found]
            reads.append(time.perf_counter() - read)
        box.close(db, next_test_id=f"t{{i + 1}}")
        db = box.open("transaction", f"t{{i + 1}}")
        times.append(time.perf_counter() - started)
    blocks = []
    if log != "off":
        queries = Queries(box, db)
        for _ in range(200):
            started = time.perf_counter()
            with queries():
                pass
            blocks.append(time.perf_counter() - started)
    box.close(db)
skip = tests // 10
print(statistics.median(times[skip:]) * 1000, statistics.median(reads[skip:]) * 1000 if reads else 0.0,
      statistics.median(blocks) * 1000 if blocks else 0.0)
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--tests", type=int, default=400, help="tests per run (default 400)")
    parser.add_argument("--statements", type=int, default=10, help="statements per test (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant (default 3)")
    args = parser.parse_args(argv)
    positive(parser, args, "tests", "statements", "rounds")
    bindir = chosen_bindir(args)
    if bindir is None:
        return 2
    schema, origin = schema_sql()
    print(f"command: {command_line()}")
    print(f"  PostgreSQL: {bindir}; schema: {origin}; {args.tests} tests of {args.statements} statements per run")
    variants = ["off", "jsonlog", "csvlog", "jsonlog+read"]
    results: dict[str, list[tuple[float, float, float]]] = {variant: [] for variant in variants}
    with tempfile.TemporaryDirectory(prefix="pgsandbox-sql-log-") as work:
        root = sandbox_project(Path(work), schema)
        env = snippet_env(root / "cache")
        try:
            for _ in range(args.rounds):
                for variant in variants:
                    out = run_snippet(
                        ONE_RUN.format(), [variant, str(bindir), str(args.tests), str(args.statements)], root, env
                    )
                    test, read, block = (float(v) for v in out.split())
                    results[variant].append((test, read, block))
        except BenchError as error:
            print(error, file=sys.stderr)
            return 1
    off = statistics.median(r[0] for r in results["off"])
    print("\nvariant        one test (ms)  ratio to off  per statement (ms)   runs")
    for variant, runs in results.items():
        test = statistics.median(r[0] for r in runs)
        per_statement = (test - off) / args.statements
        print(
            f"  {variant:<13} {test:10.3f}  {test / off:10.2f}x  {per_statement:+14.4f}      "
            f"{', '.join(f'{r[0]:.3f}' for r in runs)}"
        )
    read = statistics.median(r[1] for r in results["jsonlog+read"])
    block = statistics.median(r[2] for r in results["jsonlog"])
    print(f"\n  reading a test's SQL back (a failed test's report): {read:.3f} ms")
    print(f"  one empty pg_queries block (two marks in the log): {block:.3f} ms")
    tests = {variant: statistics.median(r[0] for r in runs) for variant, runs in results.items()}
    write_json(
        args.json,
        {
            "bindir": str(bindir),
            "one_test_ms": tests,
            "ratio_to_off": {variant: test / off for variant, test in tests.items()},
            "read_back_ms": read,
            "empty_queries_block_ms": block,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
