"""A server that went away during the run (a killed postmaster, a stopped or unreachable external server): told
apart from a failed query, said once in full to the first test that meets it, in one line to those after."""

from __future__ import annotations

import psycopg

from pgsandbox.errors import PgSandboxError, causes
from pgsandbox.server import Server

GONE_PROBE_SECONDS = 3  # connect_timeout of the probe that tells a server that went away from a failed query


class ServerGone(PgSandboxError):
    """The server went away during the run (a killed postmaster, a stopped or unreachable external server). The
    first test that meets it gets the whole story; the tests after it get one line pointing there."""


def connection_lost(error: BaseException) -> bool:
    """Whether ``error`` (or what it wraps) is a lost or refused connection, rather than a failed statement."""
    return any(isinstance(cause, (psycopg.OperationalError, psycopg.InterfaceError)) for cause in causes(error))


class GoneWatch:
    """Whether the sandbox's server went away: :attr:`gone` (the full story) and :attr:`gone_at` (which test
    met it first)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.gone: ServerGone | None = None
        self.gone_at = ""

    def check(self) -> None:
        """Raise the one line when the server went away earlier."""
        if self.gone is not None:
            raise ServerGone(
                f"the PostgreSQL server went away earlier in this run (see the first error, at {self.gone_at}).", ""
            )

    def meet(self, error: BaseException, test_id: str) -> ServerGone | None:
        """When ``error`` is a lost connection and the server is indeed gone: the one full message about it."""
        if isinstance(error, ServerGone):
            return error
        if not connection_lost(error):
            return None
        found = self._why_gone()
        if found is None:
            return None
        what, tail = found
        local = self.server.throwaway
        self.gone_at = test_id
        self.gone = ServerGone(
            f"{what}; {test_id} met it.\n  The server's log ends with:\n{tail}"
            if tail
            else f"{what}; {test_id} met it.",
            (
                "a local server stops only when something kills it (kill -9, the out-of-memory killer, a full "
                "disk or /dev/shm): look at its log above, then run again."
                if local
                else "check that the server is running and reachable (a restart, a failover, a network or proxy cut), "
                "then run again; a later run's reaper drops what this one created there (pg_reap_grace)."
            )
            + " Every later test that needs a database errors at once, pointing here.",
        )
        return self.gone

    def _why_gone(self) -> tuple[str, str] | None:
        """(what happened, the end of the server's log when it is on this machine), or None when the server
        still answers."""
        server = self.server
        exited = server.describe_exit()
        if exited is not None:
            return exited, server.log_tail()
        try:
            with server.connect(connect_timeout=GONE_PROBE_SECONDS):
                return None
        except psycopg.OperationalError as probe:
            reason = str(probe).strip().splitlines()[0] if str(probe).strip() else type(probe).__name__
        return (
            f"the PostgreSQL server at {server.address} stopped answering during the run ({reason})",
            server.log_tail(),  # on this machine for an xdist worker: the controller's server
        )
