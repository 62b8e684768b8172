"""A job worker, started as its own process and configured by the environment (DATABASE_URL): it takes
pending jobs and marks them done until it is stopped."""

from __future__ import annotations

import time

from urlapp import db
from urlapp.settings import Settings


def main() -> None:
    settings = Settings.from_env()
    db.wait_for_database(settings)
    with db.connect(settings) as conn:
        conn.autocommit = True
        while True:
            conn.execute("update jobs set done_by = current_user || '@' || current_database() where done_by is null")
            time.sleep(0.01)


if __name__ == "__main__":
    main()
