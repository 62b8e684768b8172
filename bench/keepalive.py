"""What attaching to a kept-alive server costs (pg_keep_alive, issue 16), in one process: no interpreter start-up
or imports, which bench/startup.py's whole-process figures include.

Usage::

    python bench/keepalive.py [--runs N] [--json PATH] [--bin DIR | --pg-version N]

Per round, interleaved: ``LocalServer.start`` from the filled cache (no keep-alive) and its stop; the same with
``pg_keep_alive``, attaching to the server an earlier round left, and its stop (the detach); then a whole
``Sandbox`` on the kept-alive server: start (attach, the tests' login role), one database test (the session
database's clone, ``select 1``) and stop. Data in a runtime directory of its own on /dev/shm (when present);
every server it leaves is stopped at the end.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from harness import bench_parser, chosen_bindir, full_command, positive, scratch, write_json

from pgsandbox import Sandbox

ROWS = {
    "fresh": "LocalServer.start from the filled cache (no keep-alive)",
    "fresh_stop": "LocalServer.stop (fast shutdown, directory removed)",
    "attach": "LocalServer.start, attach to the kept-alive server",
    "detach": "LocalServer.stop, detach (the watcher drops what is left)",
    "sandbox_start": "Sandbox.start, attach (server + login role)",
    "sandbox_test": "one database test (session database, select 1)",
    "sandbox_stop": "Sandbox.stop, detach",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--runs", type=int, default=15, help="measured rounds (default 15)")
    args = parser.parse_args(argv)
    positive(parser, args, "runs")
    bindir = chosen_bindir(args)
    if bindir is None:
        return 2
    command = full_command("bench/keepalive.py", argv)
    with scratch("pgsandbox-bench-keepalive-") as (work, data):
        return measure(args.runs, bindir, work, data, command, args.json)
    return 130  # interrupted


T = TypeVar("T")


def one_test(sandbox: Sandbox) -> None:
    with sandbox.database() as db:
        db.fetchval("select 1")


def measure(runs: int, bindir: Path, work: Path, data: Path, command: str, json_path: Path | None) -> int:
    from pgsandbox import LocalServer, Settings
    from pgsandbox.server import keepalive

    settings = Settings(bin=bindir, cache=work / "cache", runtime_dir=data)
    kept = settings.replace(keep_alive=600.0)
    times: dict[str, list[float]] = {key: [] for key in ROWS}

    def timed(key: str, action: Callable[[], T]) -> T:
        started = time.perf_counter()
        result = action()
        times[key].append((time.perf_counter() - started) * 1000)
        return result

    LocalServer.start(settings).stop()  # the cache filled
    LocalServer.start(kept).stop()  # the server kept alive
    print(f"command: {command}")
    for round_number in range(runs + 1):
        record = round_number > 0
        fresh = LocalServer.start(settings)
        started = time.perf_counter()
        fresh.stop()
        stop_ms = (time.perf_counter() - started) * 1000
        server = LocalServer.start(kept)
        assert server.attached_kept, "the kept-alive server was not attached"
        server.stop()
        warm_up = Sandbox.start(kept)
        one_test(warm_up)
        warm_up.stop()
        if not record:
            continue
        # the same steps again, timed (the first pass warmed this process's caches)
        timed("fresh", lambda: LocalServer.start(settings)).stop()
        times["fresh_stop"].append(stop_ms)
        attached = timed("attach", lambda: LocalServer.start(kept))
        timed("detach", attached.stop)
        sandbox = timed("sandbox_start", lambda: Sandbox.start(kept))
        timed("sandbox_test", functools.partial(one_test, sandbox))
        timed("sandbox_stop", sandbox.stop)
    for left in keepalive.kept_alive([data]):
        keepalive.stop(left.run)
    print(f"\nkeep-alive attach, in one process ({runs} rounds; ms)")
    print(f"{'step':<58}{'median':>8}{'min':>8}{'max':>8}")
    for key, label in ROWS.items():
        values = times[key]
        print(f"{label:<58}{statistics.median(values):>8.1f}{min(values):>8.1f}{max(values):>8.1f}")
    write_json(
        json_path,
        {"command": command, "runs": runs, "rows": {key: {"label": ROWS[key], "ms": times[key]} for key in ROWS}},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
