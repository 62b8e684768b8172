"""What the teardown guards cost a test (issue 6): one test's end and the next one's start, with and without.

Usage::

    python bench/guards.py [--bin DIR | --pg-version N] [--tests N] [--rounds N] [--json PATH]

A sandbox on a local server (the reference 50-table schema) opens and closes N transaction-isolation
databases back to back through the plain API, as pytest does between two tests; the median time of one
close + open is printed for three forms of the rollback's check query, each in its own process, interleaved
over the rounds: the guards as shipped (``pg_lock_status()``, ``pg_prepared_xact()``), the same guards through
the ``pg_locks``/``pg_prepared_xacts`` views, and no guards (the raw rollback with the escape checks alone).
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

VIEWS = (
    ", (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()), "
    "(SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database())"
)

ONE_RUN = """
import statistics, sys, time
from pathlib import Path
from pgsandbox import Sandbox, Settings
import pgsandbox.isolation.transaction as t
variant, bindir, tests = sys.argv[1], sys.argv[2], int(sys.argv[3])
if variant == "views":
    t.CHECK = t.CHECK.replace(t._HELD, {views!r})
elif variant == "none":
    t.CHECK = t.CHECK.replace(t._HELD, ", 0, 0")
settings = Settings(bin=Path(bindir), migrations=("sql:migrations",), server="local")
with Sandbox.start(settings, root=Path.cwd()) as box:
    times = []
    db = box.open("transaction", "t0")
    for i in range(tests):
        started = time.perf_counter()
        box.close(db, next_test_id=f"t{{i + 1}}")
        db = box.open("transaction", f"t{{i + 1}}")
        times.append(time.perf_counter() - started)
    box.close(db)
print(statistics.median(times[tests // 10 :]) * 1000)
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--tests", type=int, default=800, help="tests per run (default 800)")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant (default 3)")
    args = parser.parse_args(argv)
    positive(parser, args, "tests", "rounds")
    bindir = chosen_bindir(args)
    if bindir is None:
        return 2
    schema, origin = schema_sql()
    print(f"command: {command_line()}")
    print(f"  PostgreSQL: {bindir}; schema: {origin}; {args.tests} tests per run")
    results: dict[str, list[float]] = {"shipped": [], "views": [], "none": []}
    with tempfile.TemporaryDirectory(prefix="pgsandbox-guards-") as work:
        root = sandbox_project(Path(work), schema)
        env = snippet_env(root / "cache")
        code = ONE_RUN.format(views=VIEWS)
        try:
            for _ in range(args.rounds):
                for variant in results:
                    out = run_snippet(code, [variant, str(bindir), str(args.tests)], root, env)
                    results[variant].append(float(out))
        except BenchError as error:
            print(error, file=sys.stderr)
            return 1
    print("\nvariant (median of one close + open, ms; median over runs)")
    for variant, values in results.items():
        print(f"  {variant:<8} {statistics.median(values):.3f}   runs: {', '.join(f'{v:.3f}' for v in values)}")
    extra = statistics.median(results["shipped"]) - statistics.median(results["none"])
    print(f"\n  the guards cost {extra:.3f} ms per test (target: under 1 ms)")
    medians = {variant: statistics.median(values) for variant, values in results.items()}
    write_json(args.json, {"bindir": str(bindir), "runs": results, "medians_ms": medians, "guards_cost_ms": extra})
    return 0


if __name__ == "__main__":
    sys.exit(main())
