"""What a connection costs over TCP loopback next to the Unix socket (issue 13): connects, round trips, tests.

Usage::

    python bench/connect.py [--bin DIR | --pg-version N] [--connects N] [--queries N] [--tests N] [--rounds N]
                            [--json PATH]

One local server listening on both its Unix socket and 127.0.0.1 (SCRAM on both, as pgsandbox sets it up):

- ``connect``: ``psycopg.connect()`` + ``close()``, N times per address, alternating socket and TCP (interleaved,
  so both see the same machine load); median, 10th and 90th percentiles;
- ``round trip``: ``SELECT 1`` on an open connection, N times per address, alternating;
- ``transaction isolation``: a sandbox (the reference 50-table schema) opens and closes N transaction-isolation
  databases back to back through the plain API, as pytest does between two tests, each test running one
  ``SELECT 1`` on its connection; once with ``pg_listen = none`` (everything on the socket: the old default) and
  once with the default (the tests' connection over TCP loopback), each run in its own process, alternating
  over the rounds; median time of one close + open + statement.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import psycopg
from harness import (
    BenchError,
    alternate,
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
from psycopg.conninfo import make_conninfo

from pgsandbox import LocalServer, Settings

ONE_RUN = """
import statistics, sys, time
from pathlib import Path
from pgsandbox import Sandbox, Settings
listen, bindir, tests = sys.argv[1], sys.argv[2], int(sys.argv[3])
settings = Settings(bin=Path(bindir), migrations=("sql:migrations",), server="local", listen=listen)
with Sandbox.start(settings, root=Path.cwd()) as box:
    times = []
    db = box.open("transaction", "t0")
    host = db.params["host"]
    for i in range(tests):
        started = time.perf_counter()
        db.connection.execute("SELECT 1")
        box.close(db, next_test_id=f"t{i + 1}")
        db = box.open("transaction", f"t{i + 1}")
        times.append(time.perf_counter() - started)
    box.close(db)
print(host, statistics.median(times[tests // 10 :]) * 1000)
"""


def percentiles(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    tenth, ninetieth = ms[len(ms) // 10], ms[len(ms) * 9 // 10]
    return f"median {statistics.median(ms):.3f} ms (p10 {tenth:.3f}, p90 {ninetieth:.3f})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--connects", type=int, default=300, help="connects per address (default 300)")
    parser.add_argument("--queries", type=int, default=3000, help="round trips per address (default 3000)")
    parser.add_argument("--tests", type=int, default=800, help="tests per isolation run (default 800; 0: skip)")
    parser.add_argument("--rounds", type=int, default=3, help="isolation runs per variant (default 3)")
    args = parser.parse_args(argv)
    positive(parser, args, "connects", "queries", "rounds")
    bindir = chosen_bindir(args)
    if bindir is None:
        return 2
    print(f"command: {command_line()}")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="pgsandbox-connect-") as work:
        root = Path(work)
        server = LocalServer.start(Settings(bin=bindir, cache=root / "cache", listen="127.0.0.1"))
        try:
            print(f"  PostgreSQL {server.version_string} ({bindir})")
            assert server.tcp is not None
            tcp = server.dsn
            socket = make_conninfo(tcp, host=str(server.run.socket_dir))
            connects = alternate(args.connects, {"socket": lambda: psycopg.connect(socket).close(),
                                                 "tcp": lambda: psycopg.connect(tcp).close()})  # fmt: skip
            for name, samples in connects.items():
                print(f"connect + close, {name:6}: {percentiles(samples)}")
            with psycopg.connect(socket) as over_socket, psycopg.connect(tcp) as over_tcp:
                trips = alternate(
                    args.queries,
                    {"socket": lambda: over_socket.execute("SELECT 1").fetchone(),
                     "tcp": lambda: over_tcp.execute("SELECT 1").fetchone()},
                )  # fmt: skip
            for name, samples in trips.items():
                print(f"SELECT 1 round trip, {name:6}: {percentiles(samples)}")
        finally:
            server.stop()
        results["connect_ms"] = {name: statistics.median(samples) * 1000 for name, samples in connects.items()}
        results["round_trip_ms"] = {name: statistics.median(samples) * 1000 for name, samples in trips.items()}
        if args.tests:
            try:
                results["transaction_isolation_ms"] = isolation(root, bindir, args.tests, args.rounds)
            except BenchError as error:
                print(error, file=sys.stderr)
                return 1
    write_json(args.json, {"bindir": str(bindir), **results})
    return 0


def isolation(root: Path, bindir: Path, tests: int, rounds: int) -> dict[str, float]:
    """Median ms of one close + open + SELECT 1 per ``pg_listen`` value."""
    schema, origin = schema_sql()
    sandbox_project(root, schema)
    env = snippet_env(root / "cache")
    results: dict[str, list[float]] = {"none": [], "127.0.0.1": []}
    hosts: dict[str, str] = {}
    for _ in range(rounds):
        for listen in results:
            host, ms = run_snippet(ONE_RUN, [listen, str(bindir), str(tests)], root, env).split()
            hosts[listen] = host
            results[listen].append(float(ms))
    print(f"transaction isolation, {tests} tests per run, {rounds} runs each ({origin}):")
    for listen, values in results.items():
        shown = ", ".join(f"{value:.3f}" for value in values)
        print(
            f"  pg_listen = {listen:9} (tests connect to {hosts[listen]}): median {statistics.median(values):.3f} ms"
            f" per close + open + SELECT 1 (runs: {shown})"
        )
    return {listen: statistics.median(values) for listen, values in results.items()}


if __name__ == "__main__":
    sys.exit(main())
