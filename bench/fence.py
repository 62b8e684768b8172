"""What the connection fence costs (issue 18): per connect, and at a pytest session's start.

Usage::

    python bench/fence.py [--bin DIR | --pg-version N] [--connects N] [--checks N] [--starts N] [--json PATH]

One local server (TCP on 127.0.0.1, SCRAM, as pgsandbox sets it up):

- ``connect``: ``psycopg.connect()`` + ``close()`` to the server, N times with the fence off and N times with a
  fence installed that allows the server (what every allowed connection of a test pays), alternating so that
  both see the same machine load; median, 10th and 90th percentiles, and the difference;
- ``check``: the fence's work alone, per connection, without a server: parsing the DSN (libpq's parser, through
  psycopg), resolving the target as libpq would and comparing it with the sandbox's server; the median of N,
  for an allowed and for a refused target (the refusal builds its message and its exception);
- ``start``: in N new processes that imported pgsandbox's pytest plugin, the CPU time of importing and installing
  a fence (what ``pytest_configure`` does), bytecode cached as for an installed package; CPU time, which a
  loaded machine disturbs less than the wall clock. The fence imports no client library (checked).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import psycopg
from harness import (
    alternate,
    bench_parser,
    chosen_bindir,
    command_line,
    positive,
    write_json,
)

from pgsandbox import ConnectionFenced, LocalServer, Settings
from pgsandbox.common.connect_hooks import conninfo_params, resolve
from pgsandbox.isolation.fence import Fence

FENCE_AT_START = """
import sys, time
import pgsandbox.pytest.plugin
started = time.process_time()
from pgsandbox.isolation.fence import Fence
Fence().install()
print((time.process_time() - started) * 1000)
assert "psycopg" not in sys.modules
"""


def percentiles(samples: list[float], unit: float = 1000) -> tuple[float, float, float]:
    ordered = sorted(s * unit for s in samples)
    return statistics.median(ordered), ordered[len(ordered) // 10], ordered[len(ordered) * 9 // 10]


def check_cost(server_dsn: str, target_dsn: str, count: int) -> float:
    """Microseconds of the fence's work for one connection to ``target_dsn`` (median of ``count``)."""
    fence = Fence("error").install()
    try:
        fence.allow_endpoints(resolve(conninfo_params(server_dsn)).endpoints)
        times = []
        for _ in range(count):
            started = time.perf_counter()
            with contextlib.suppress(ConnectionFenced):
                fence.check(resolve(conninfo_params(target_dsn), "psycopg", connection_error=psycopg.OperationalError))
            times.append(time.perf_counter() - started)
    finally:
        fence.remove()
    return statistics.median(times) * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--connects", type=int, default=300, help="connects per variant (default 300)")
    parser.add_argument("--checks", type=int, default=20000, help="checks per target (default 20000)")
    parser.add_argument("--starts", type=int, default=10, help="processes per start-up variant (default 10)")
    args = parser.parse_args(argv)
    positive(parser, args, "connects", "checks", "starts")
    bindir = chosen_bindir(args)
    if bindir is None:
        return 2
    print(f"command: {command_line()}")
    print(f"  PostgreSQL: {bindir}; {args.connects} connects, {args.checks} checks, {args.starts} starts per variant")
    server = LocalServer.start(Settings(bin=bindir, listen="127.0.0.1", sql_log="off"))
    try:
        dsn = server.dsn
        fence = Fence("error")

        def connect() -> None:
            psycopg.connect(dsn).close()

        def fenced_connect() -> None:
            fence.install()
            try:
                connect()
            finally:
                fence.remove()

        fence.allow_endpoints(resolve(conninfo_params(dsn)).endpoints)
        for _ in range(20):  # warm-up: the server's first backends, psycopg's first connect
            connect()
        # installing and removing the fence around each connect would measure the patching too: the fenced
        # variant keeps it installed and the unfenced one removes it, alternating by blocks of ten
        times: dict[str, list[float]] = {"no fence": [], "fence": []}
        for _ in range(max(1, args.connects // 10)):
            for name in times:
                if name == "fence":
                    fence.install()
                try:
                    times[name].extend(alternate(10, {name: connect})[name])
                finally:
                    if name == "fence":
                        fence.remove()
        other = dsn.replace(f"port={server.tcp[1] if server.tcp else 0}", "port=1")
        allowed_us = check_cost(dsn, dsn, args.checks)
        refused_us = check_cost(dsn, other, args.checks)
    finally:
        server.stop()
    connects = {name: percentiles(samples) for name, samples in times.items()}
    with tempfile.TemporaryDirectory(prefix="pgsandbox-fence-bench-") as bytecode:
        # as an installed package runs: its bytecode cached (PYTHONDONTWRITEBYTECODE would measure the compiler)
        env = {**os.environ, "PYTHONPYCACHEPREFIX": bytecode}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        command = [sys.executable, "-c", FENCE_AT_START]
        subprocess.run(command, check=True, env=env, capture_output=True)  # writes the bytecode
        start_ms = statistics.median(
            float(subprocess.run(command, check=True, env=env, capture_output=True, text=True).stdout)
            for _ in range(args.starts)
        )
    print("\nconnect + close (ms)        median     p10     p90")
    for name, (median, p10, p90) in connects.items():
        print(f"  {name:<24} {median:8.3f} {p10:7.3f} {p90:7.3f}")
    added = connects["fence"][0] - connects["no fence"][0]
    print(f"  difference of the medians: {added * 1000:+.0f} us (noise: the p10-p90 spread above)")
    print("\nthe fence's work per connect (us, median)")
    print(f"  allowed (the sandbox): {allowed_us:.1f}")
    print(f"  refused (another port; message and exception built): {refused_us:.1f}")
    print(f"\nat a session's start: importing and installing the fence, CPU ms (median): {start_ms:.2f}")
    write_json(
        args.json,
        {
            "bindir": str(bindir),
            "connect_ms": {name: values[0] for name, values in connects.items()},
            "check_us": {"allowed": allowed_us, "refused": refused_us},
            "start_ms": start_ms,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
