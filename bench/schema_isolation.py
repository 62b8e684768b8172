"""Schema isolation (issue 18) next to transaction and database isolation: the session's start (server, template or
schema, first test), one close + open between two tests, and the whole session, through the plain API.

Usage::

    python bench/schema_isolation.py [--bin DIR | --pg-version N] [--tests N] [--rounds N] [--json PATH]

The schema is the reference one (``bench/harness.py``: 50 tables of 200 rows, 3 indexes each). Each variant runs
in a process of its own (``python -c``), one after the other in each round, after a warm-up round that fills the
cache (the template clusters of transaction and database isolation). A variant starts a sandbox, runs
``--tests`` tests back to back as pytest does (test ``i`` inserts a row into ``t{i % 50}`` and counts that table's
rows, which proves the previous tests' rows are gone; between two tests ``close(db, next_test_id=...)`` then
``open(...)``), and stops it. Variants:

* transaction, database: a local server (warm cache: the template comes from the cached cluster);
* schema: a local server, ``pg_isolation = schema``: the session migrates its schema in ``postgres`` (nothing is
  cached), tests connect as the superuser (watched for databases and roles they create);
* schema, restricted role: the same on an existing server (the local one, started outside the timing) through a
  role that has only CONNECT and CREATE on one database, what a managed CI database gives.

Printed: the start (``Sandbox.start``, the first open included) and the stop, the median close + open between two
tests, the whole session (start to stop), medians over rounds.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence

from harness import (
    BenchError,
    bench_parser,
    chosen_bindir,
    command_line,
    load_average,
    pgsandbox_env,
    positive,
    run_snippet,
    sandbox_project,
    schema_sql,
    scratch,
    snippet_env,
    write_json,
)

VARIANTS = ("transaction", "database", "schema", "schema-restricted")

RUN = """
import json, secrets, statistics, sys, time
from pathlib import Path
import psycopg
from pgsandbox import Sandbox, Settings
from pgsandbox.server import LocalServer
variant, bindir, tests = sys.argv[1], sys.argv[2], int(sys.argv[3])
local = Settings(bin=Path(bindir), migrations=("sql:migrations",), server="local")
server = None
if variant == "schema-restricted":  # an existing server and a role with only CREATE on one database
    server = LocalServer.start(Settings(bin=Path(bindir), listen="127.0.0.1", sql_log="off"))
    password = secrets.token_hex(12)
    server.admin.execute(f"CREATE ROLE ci LOGIN PASSWORD '{password}'")
    server.admin.execute("CREATE DATABASE ci")
    server.admin.execute("GRANT CONNECT, CREATE ON DATABASE ci TO ci")
    settings = Settings(dsn=f"postgresql://ci:{password}@127.0.0.1:{server.tcp[1]}/ci", isolation="schema",
                        migrations=("sql:migrations",))
else:
    settings = local.replace(isolation=variant)
started = time.perf_counter()
box = Sandbox.start(settings, root=Path.cwd())
db = box.open(test_id="t0")
start = time.perf_counter() - started
between = []
for i in range(tests):
    table = f"t{i % 50}"
    db.execute(f"INSERT INTO {table} (name, value) VALUES ('one', 1)")
    assert db.fetchval(f"SELECT count(*) FROM {table}") == 201
    began = time.perf_counter()
    box.close(db, next_test_id=f"t{i + 1}")
    db = box.open(test_id=f"t{i + 1}")
    between.append(time.perf_counter() - began)
box.close(db)
stopping = time.perf_counter()
box.stop()
stop = time.perf_counter() - stopping
whole = time.perf_counter() - started
if server is not None:
    server.stop()
print(json.dumps({"start": start, "between_ms": statistics.median(between) * 1000, "stop": stop, "whole": whole}))
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--tests", type=int, default=200, help="tests per session (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")
    args = parser.parse_args(argv)
    positive(parser, args, "tests", "rounds")
    bindir = chosen_bindir(args)
    if bindir is None:
        return 2
    schema, origin = schema_sql()
    print(f"command: {command_line()}")
    print(f"  PostgreSQL: {bindir}; schema: {origin}; {args.tests} tests per session")
    print(f"  load average at start: {load_average()}")
    results: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    with scratch("pgsandbox-schema-isolation-") as (work, data):
        project = sandbox_project(work / "project", schema)
        env = {**snippet_env(work / "cache"), **pgsandbox_env(bindir, runtime=data, cache=work / "cache")}
        try:
            for round_number in range(args.rounds + 1):  # the first fills the cache
                for variant in VARIANTS:
                    line = run_snippet(RUN, [variant, str(bindir), str(args.tests)], project, env)
                    if round_number:
                        results[variant].append(json.loads(line))
        except BenchError as error:
            print(error, file=sys.stderr)
            return 1
    print(f"  load average at end: {load_average()}")
    medians = {
        variant: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for variant, runs in results.items()
    }
    print(f"\nmedians of {args.rounds} rounds     start (s)  close+open (ms)  stop (s)  whole session (s)")
    for variant, values in medians.items():
        print(
            f"  {variant:<20} {values['start']:9.2f}  {values['between_ms']:15.2f}  {values['stop']:8.2f}"
            f"  {values['whole']:17.2f}"
        )
    write_json(args.json, {"bindir": str(bindir), "tests": args.tests, "runs": results, "medians": medians})
    return 0


if __name__ == "__main__":
    sys.exit(main())
