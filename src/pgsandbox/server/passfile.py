"""The run's passfile: where every password pgsandbox uses lives, so that no DSN, URL or frame holds one.

Every DSN and URL pgsandbox builds names this file (``passfile=``; ``PGPASSFILE`` in ``env``), never a password:
libpq (psycopg, psycopg2, psql), asyncpg and SQLAlchemy's dialects all read it. A traceback of a failed connect
then shows the file's path, not its content. The file is 0600, in a directory private to the run (a local
server's run directory, or a run directory holding only the secrets when the server is someone else's), and goes
with it; a run that keeps databases for failed tests keeps it until ``pgsandbox clean`` or ``pgsandbox reap
--include-kept``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from pgsandbox.common.redact import Secret, register_secret

FILE_NAME = "pgpass"
# in a DSN next to ``passfile=``: libpq takes PGPASSWORD, when the environment has it, before any passfile; an
# explicitly empty password does not count as one, and keeps PGPASSWORD out, so the passfile is read
NO_PASSWORD = ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


class Passfile:
    """A libpq password file (``host:port:database:user:password`` lines) with one line per user."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, tuple[str, str, Secret]] = {}  # user -> (host, port, password)

    def add(self, user: str, password: str, host: str = "*", port: str = "*") -> None:
        """Record ``user``'s password (replacing an earlier one) and rewrite the file."""
        secret = Secret(password)
        register_secret(secret)
        self._entries[user] = (host, port, secret)
        self._write()

    def remove(self, user: str) -> None:
        if self._entries.pop(user, None) is not None:
            self._write()

    def password(self, user: str) -> Secret | None:
        """``user``'s password, as text whose ``repr()`` is masked; None when the file has none for it."""
        entry = self._entries.get(user)
        return entry[2] if entry else None

    def _write(self) -> None:
        # libpq and asyncpg refuse a passfile others may read: created 0600, then moved into place whole
        staging = self.path.with_name(self.path.name + ".partial")
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            for user, (host, port, password) in self._entries.items():
                file.write(":".join([_escape(host), _escape(port), "*", _escape(user), _escape(password)]) + "\n")
        staging.replace(self.path)

    def __repr__(self) -> str:
        return f"<Passfile {self.path} for {', '.join(self._entries) or 'nobody'}>"
