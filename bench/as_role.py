"""What a ``pg.as_role`` block costs (issue 18): enter and leave it on a test's connection, in each isolation
mode, against the same statement without a block. Prints milliseconds per block (median of the rounds).

    PYTHONPATH=src python bench/as_role.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from pgsandbox import Sandbox, Settings

ROUNDS = 200
SCHEMA = """
DO $$ BEGIN CREATE ROLE bench_app NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
CREATE TABLE items (id serial PRIMARY KEY, tenant_id text NOT NULL);
ALTER TABLE items ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant ON items TO bench_app USING (tenant_id = current_setting('app.tenant_id', true));
GRANT SELECT ON items TO bench_app;
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "migrations").mkdir()
        (Path(root) / "migrations" / "1.sql").write_text(SCHEMA)
        settings = Settings(migrations=("sql:migrations",), sql_log="off")
        with Sandbox.start(settings, root=Path(root)) as sandbox:
            for mode in ("transaction", "database"):
                with sandbox.database(mode, "bench") as db:
                    db.fetchval("SELECT 1")  # the connection is open
                    plain, block = [], []
                    for _ in range(ROUNDS):
                        started = time.perf_counter()
                        db.fetchval("SELECT count(*) FROM items")
                        plain.append(time.perf_counter() - started)
                        started = time.perf_counter()
                        with db.as_role("bench_app", settings={"app.tenant_id": "a"}):
                            db.fetchval("SELECT count(*) FROM items")
                        block.append(time.perf_counter() - started)
                    extra = (statistics.median(block) - statistics.median(plain)) * 1000
                    print(
                        f"{mode}: the statement {statistics.median(plain) * 1000:.2f} ms, in a block "
                        f"{statistics.median(block) * 1000:.2f} ms: the block costs {extra:.2f} ms"
                    )


if __name__ == "__main__":
    main()
