"""What a ``pg.as_role`` block costs (issue 18): entering and leaving it on a test's open connection, in each
isolation mode, next to the same statement run without a block.

Usage::

    python bench/as_role.py [--bin DIR | --pg-version N] [--rounds N] [--json PATH]

One local server, a template with a role ``bench_app``, a table under a row-level security policy and its grant;
per mode one database, on which each round runs ``SELECT count(*)`` once as the tests' role and once inside
``with pg.as_role("bench_app", settings={"app.tenant_id": "a"})`` (the statement is then planned with the
policy). Prints the medians, in milliseconds: the block's cost is the difference. In database isolation a block
also sets and resets the login's defaults in the test's database (two admin round trips).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import bench_parser, chosen_bindir, positive, write_json

from pgsandbox import Sandbox, Settings

SCHEMA = """
DO $$ BEGIN CREATE ROLE bench_app NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
CREATE TABLE items (id serial PRIMARY KEY, tenant_id text NOT NULL);
ALTER TABLE items ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON items TO bench_app USING (tenant_id = current_setting('app.tenant_id', true));
GRANT SELECT ON items TO bench_app;
"""


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=200, help="blocks per mode (default 200)")
    args = parser.parse_args()
    positive(parser, args, "rounds")
    bindir = chosen_bindir(args)
    if bindir is None:
        return 1
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "migrations").mkdir()
        (Path(root) / "migrations" / "1.sql").write_text(SCHEMA)
        settings = Settings(bin=bindir, migrations=("sql:migrations",), sql_log="off")
        with Sandbox.start(settings, root=Path(root)) as sandbox:
            for mode in ("transaction", "database"):
                with sandbox.database(mode, "bench") as db:
                    db.fetchval("SELECT 1")  # the connection is open
                    plain, block = [], []
                    for _ in range(args.rounds):
                        started = time.perf_counter()
                        db.fetchval("SELECT count(*) FROM items")
                        plain.append(time.perf_counter() - started)
                        started = time.perf_counter()
                        with db.as_role("bench_app", settings={"app.tenant_id": "a"}):
                            db.fetchval("SELECT count(*) FROM items")
                        block.append(time.perf_counter() - started)
                    alone, inside = statistics.median(plain) * 1000, statistics.median(block) * 1000
                    results[mode] = {"statement_ms": alone, "in_block_ms": inside, "block_ms": inside - alone}
                    print(
                        f"{mode}: the statement {alone:.2f} ms, in a block {inside:.2f} ms: the block costs "
                        f"{inside - alone:.2f} ms"
                    )
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
