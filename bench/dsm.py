"""Dynamic shared memory: ``posix`` (segments in /dev/shm, left there when a server is killed with kill -9) against
``mmap`` (files in the data directory's pg_dynshmem, removed with the run), which pgsandbox uses.

Usage::

    python bench/dsm.py [--rounds N] [--rows N] [--bin DIR | --pg-version N] [--json PATH]

For each type, one local server (the run directory in the default runtime directory, /dev/shm when it has
room) and, interleaved round by round:

* a parallel query: ``count(*)`` over a table with ``debug_parallel_query`` and two workers per gather, so each
  query creates a DSM segment;
* a parallel index build (two maintenance workers, also a DSM segment each);
* the per-test path of the suite: a connection with ``BEGIN``/``ROLLBACK`` (transaction isolation) and a
  ``CREATE DATABASE ... TEMPLATE`` plus ``DROP DATABASE`` (database isolation).

Prints the median milliseconds of each.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence

import psycopg
from harness import bench_parser, chosen_bindir, positive, timed, write_json

from pgsandbox import LocalServer, Settings

TYPES = ("posix", "mmap")


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=20, help="measured rounds (default 20)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the scanned table (default 1000000)")
    args = parser.parse_args(argv)
    positive(parser, args, "rounds", "rows")
    bindir = chosen_bindir(args)
    if bindir is None:
        return 2
    servers = {
        kind: LocalServer.start(Settings(bin=bindir, server_settings=(("dynamic_shared_memory_type", kind),)))
        for kind in TYPES
    }
    results: dict[tuple[str, str], list[float]] = {}
    try:
        conns = {}
        for kind, server in servers.items():
            conn = psycopg.connect(server.admin_dsn, autocommit=True)
            assert conn.execute("show dynamic_shared_memory_type").fetchone() == (kind,)
            conn.execute(f"create table t as select g, md5(g::text) as h from generate_series(1, {args.rows}) g")
            conn.execute("vacuum analyze t")
            conn.execute("create database tpl")
            for setting in (
                "debug_parallel_query = on",
                "max_parallel_workers_per_gather = 2",
                "max_parallel_maintenance_workers = 2",
                "parallel_setup_cost = 0",
                "parallel_tuple_cost = 0",
                "min_parallel_table_scan_size = 0",
            ):
                conn.execute(f"set {setting}")
            conns[kind] = conn
        for round_number in range(args.rounds + 1):  # the first round warms up and is not counted
            for kind, server in servers.items():
                conn = conns[kind]

                def query(conn: psycopg.Connection[tuple[object, ...]] = conn) -> None:
                    conn.execute("select count(*) from t where h like 'a%'").fetchone()

                def index(conn: psycopg.Connection[tuple[object, ...]] = conn) -> None:
                    conn.execute("create index t_h on t (h)")
                    conn.execute("drop index t_h")

                def per_test(dsn: str = server.admin_dsn) -> None:
                    with psycopg.connect(dsn) as test:
                        test.execute("select 1")
                        test.rollback()

                def clone(conn: psycopg.Connection[tuple[object, ...]] = conn) -> None:
                    conn.execute("create database clone template tpl")
                    conn.execute("drop database clone")

                for name, action in (
                    ("parallel count(*)", query),
                    ("parallel create index", index),
                    ("connect + BEGIN/ROLLBACK", per_test),
                    ("clone + drop database", clone),
                ):
                    elapsed = timed(action)
                    if round_number:
                        results.setdefault((name, kind), []).append(elapsed)
        for conn in conns.values():
            conn.close()
    finally:
        for server in servers.values():
            server.stop()
    print(f"{'operation':<28}" + "".join(f"{kind + ' ms':>12}" for kind in TYPES))
    for name in dict.fromkeys(name for name, _ in results):
        print(f"{name:<28}" + "".join(f"{statistics.median(results[(name, kind)]):>12.2f}" for kind in TYPES))
    medians = {f"{name}, {kind}": statistics.median(values) for (name, kind), values in results.items()}
    write_json(args.json, {"bindir": str(bindir), "median_ms": medians})
    return 0


if __name__ == "__main__":
    sys.exit(main())
