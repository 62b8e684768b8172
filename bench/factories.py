"""What pg.insert costs next to hand-written INSERTs (issue 7): rows with three levels of required parents.

Usage::

    python bench/factories.py [--bin DIR | --pg-version N] [--rows N] [--rounds N] [--json PATH]

A local server, transaction isolation, through the plain API. The table ``l3`` references ``l2``, which
references ``l1``, which references ``l0``; every level has NOT NULL text, numeric, date and unique uuid columns.
Each round, in one process, alternating:

- ``hand-written``: for each row, four INSERTs with the values written out by the caller (the raw primitive:
  what a test would send without a factory), each returning the key the next one needs;
- ``pg.insert``: ``pg.insert("l3")`` per row, which makes the same four rows (catalog cached);
- ``pg.insert_many``: ``pg.insert_many("l3", N)``.

Printed: the median time per row (of the four rows a row of l3 needs), and the ratio to hand-written (target:
within 2x). Also: reading the catalog of the reference 50-table schema once, cold (what a cache miss costs).
"""

from __future__ import annotations

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

SCHEMA = "\n".join(
    f"create table l{level} (id bigserial primary key, name text not null, amount numeric(10,2) not null, "
    "day date not null, code uuid not null unique"
    + (f", parent_id bigint not null references l{level - 1}" if level else "")
    + ");"
    for level in range(4)
)

ONE_RUN = """
import statistics, sys, time, uuid, datetime, decimal
from pathlib import Path
from pgsandbox import Sandbox, Settings
from pgsandbox.data import catalog
bindir, rows, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
settings = Settings(bin=Path(bindir), migrations=("sql:migrations",), server="local")

def by_hand(db, n):
    conn = db.connection
    for i in range(n):
        parent = None
        for level in range(4):
            values = [f"row-{{level}}-{{i}}", decimal.Decimal("12.50"), datetime.date(2024, 1, 1), uuid.uuid4()]
            if level:
                query = (f"INSERT INTO l{{level}} (name, amount, day, code, parent_id) "
                         "VALUES (%s, %s, %s, %s, %s) RETURNING *")
                values.append(parent)
            else:
                query = "INSERT INTO l0 (name, amount, day, code) VALUES (%s, %s, %s, %s) RETURNING *"
            parent = conn.execute(query, values).fetchone()[0]

def with_insert(db, n):
    for _ in range(n):
        db.insert("l3")

def with_insert_many(db, n):
    db.insert_many("l3", n)

results = {{"hand-written": [], "pg.insert": [], "pg.insert_many": []}}
with Sandbox.start(settings, root=Path.cwd()) as box:
    for r in range(rounds):
        for name, work in (("hand-written", by_hand), ("pg.insert", with_insert), ("pg.insert_many", with_insert_many)):
            db = box.open("transaction", f"bench{{r}}-{{name}}")
            db.insert("l3")  # the catalog is read (or found in the cache) once per session
            started = time.perf_counter()
            work(db, rows)
            results[name].append((time.perf_counter() - started) / rows * 1000)
            box.close(db)
    db = box.open("transaction", "catalog")
    started = time.perf_counter()
    catalog.read(db._query_all)
    cold = (time.perf_counter() - started) * 1000
    box.close(db)
print(*(statistics.median(v) for v in results.values()), cold)
"""

BIG_SCHEMA_RUN = """
import sys, time
from pathlib import Path
from pgsandbox import Sandbox, Settings
from pgsandbox.data import catalog
settings = Settings(bin=Path(sys.argv[1]), migrations=("sql:migrations",), server="local")
with Sandbox.start(settings, root=Path.cwd()) as box:
    db = box.open("transaction", "catalog")
    started = time.perf_counter()
    found = catalog.read(db._query_all)
    print((time.perf_counter() - started) * 1000, len(found.tables))
    box.close(db)
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--rows", type=int, default=1000, help="rows of l3 per measurement (default 1000)")
    parser.add_argument("--rounds", type=int, default=5, help="measurements of each variant (default 5)")
    args = parser.parse_args(argv)
    positive(parser, args, "rows", "rounds")
    bindir = chosen_bindir(args)
    if bindir is None:
        return 2
    print(f"command: {command_line()}")
    print(f"  PostgreSQL: {bindir}; {args.rows} rows of l3 (and their parents) per measurement, {args.rounds} rounds")
    schema, origin = schema_sql()
    with tempfile.TemporaryDirectory(prefix="pgsandbox-factories-") as work:
        root = Path(work)
        env = snippet_env(root / "cache")
        chain = sandbox_project(root / "chain", SCHEMA, "1.sql")
        big = sandbox_project(root / "big", schema, "1.sql")
        try:
            out = run_snippet(ONE_RUN.format(), [str(bindir), str(args.rows), str(args.rounds)], chain, env)
            hand, single, many, cold = (float(v) for v in out.split())
            big_ms, tables = run_snippet(BIG_SCHEMA_RUN, [str(bindir)], big, env).split()
        except BenchError as error:
            print(error, file=sys.stderr)
            return 1
    print("\nvariant            per row of l3 (ms, 4 INSERTs)   ratio to hand-written")
    for name, value in (("hand-written", hand), ("pg.insert", single), ("pg.insert_many", many)):
        print(f"  {name:<16} {value:12.3f}                     {value / hand:6.2f}x")
    print(
        f"\n  reading the catalog, cold: {cold:.1f} ms for these 4 tables; {float(big_ms):.1f} ms for {tables} "
        f"tables ({origin})"
    )
    per_row = {"hand-written": hand, "pg.insert": single, "pg.insert_many": many}
    write_json(
        args.json,
        {
            "bindir": str(bindir),
            "per_row_ms": per_row,
            "ratio_to_hand_written": {name: value / hand for name, value in per_row.items()},
            "catalog_cold_ms": {"chain": cold, "reference schema": float(big_ms)},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
