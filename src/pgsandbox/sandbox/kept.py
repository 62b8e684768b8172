"""Databases kept after failed tests (keep-failed): their names, the label that tells the reaper to leave
them, the psql command that opens one, and what the session's role owns in them given back at the end."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence

import psycopg
from psycopg import sql

from pgsandbox.server import Server, roles


class KeptDatabases:
    """The databases this session keeps (``sandbox.kept``): iterate for their names."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._names: list[str] = []
        self._counter = 0  # databases kept by this process's tests: the next renamed one's number

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def __bool__(self) -> bool:
        return bool(self._names)

    def next_name(self, number: int | None = None) -> str:
        """The name a kept session database (``transaction`` isolation) gets; by default the next one's (known
        before the test's teardown, for its report)."""
        return self.server.database_name(f"failed{number or self._counter + 1}")

    def keep(self, name: str | None) -> str:
        """Count one more kept database, named ``name`` (a clone keeps its own) or :meth:`next_name`."""
        self._counter += 1
        kept_as = name or self.next_name(self._counter)
        self._names.append(kept_as)
        return kept_as

    def label(self, name: str) -> None:
        """A kept database says so in its comment: the reaper leaves it to its user."""
        label = {**json.loads(self.server.run_label), "kept": True}
        self.server.admin.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(json.dumps(label)))
        )

    def adopt(self, names: Sequence[str]) -> None:
        """Databases other processes kept on this server: a local server then keeps running."""
        self._names.extend(names)

    def psql_command(self, dbname: str) -> str:
        """A shell command that opens ``dbname`` in psql, with no password in it (it names the passfile)."""
        from pgsandbox.binaries import working_psql

        params = self.server.params
        psql = working_psql(self.server.bindir) or "psql"  # none that runs here: the user's own
        target = (
            " ".join(f"{key}={params[key]}" for key in ("host", "port", "user") if params.get(key))
            + f" dbname={dbname}"
        )
        return f"PGPASSFILE={self.server.kept_passfile} {psql} '{target}'"

    def hand_over(self) -> None:
        """At the end of the session: the databases stay, no longer tracked as the run's own; what the session's
        role owns in them goes to the admin (the role is dropped)."""
        for name in self._names:
            self.server.forget_database(name)
            if self.server.login is not None:
                with contextlib.suppress(psycopg.Error), self.server.connect(name, autocommit=True) as conn:
                    roles.give_back(conn, self.server.login)
