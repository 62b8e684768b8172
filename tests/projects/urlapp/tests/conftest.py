from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def worker(pg_login) -> Iterator[subprocess.Popen]:
    """The job worker, one process for the whole session, configured as in production: by DATABASE_URL (the
    password it would hold there is in the passfile PGPASSFILE names, which libpq reads when the app's own
    connect passes none)."""
    env = {
        **os.environ,
        "DATABASE_URL": pg_login.database_url,
        "PGPASSFILE": pg_login.passfile,
        "PYTHONPATH": str(ROOT),
    }
    process = subprocess.Popen([sys.executable, "-m", "urlapp.worker"], env=env, cwd=ROOT)
    yield process
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="session")
def reference_note(pg_login) -> int:
    """Data a session fixture writes once, as the tests' role, into the session's own database."""
    with pg_login.connect() as conn:
        return conn.execute("insert into notes (body) values ('reference') returning id").fetchone()[0]
