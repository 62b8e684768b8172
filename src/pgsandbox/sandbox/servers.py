"""What the sandbox asks of its server that only a local one (LocalServer, started by this run) can answer.
Every ``isinstance(server, LocalServer)`` of the sandbox is here, one small function each, so that they can
become members of ``Server`` in one place."""

from __future__ import annotations

from pathlib import Path

from pgsandbox.binaries import Installation
from pgsandbox.server import ExternalServer, LocalServer, Server
from pgsandbox.template.builds import warm_relcache


def describe_server(server: Server) -> str:
    """host:port, for messages."""
    params = server.params
    return f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"


def is_local(server: Server) -> bool:
    """Started by this run, on this machine: its settings, logs and snapshots are pgsandbox's."""
    return isinstance(server, LocalServer)


def installation(server: Server) -> Installation | None:
    """The PostgreSQL installation it runs from (None: an existing server's is unknown)."""
    return server.installation if isinstance(server, LocalServer) else None


def bindir(server: Server) -> Path | None:
    found = installation(server)
    return found.bindir if found is not None else None


def run_dir(server: Server) -> Path | None:
    """The run directory (data, socket, log) of a local server."""
    return server.run.path if isinstance(server, LocalServer) else None


def from_snapshot(server: Server) -> bool:
    """Whether it started from a cached cluster that already held the templates."""
    return isinstance(server, LocalServer) and server.snapshot is not None


def save_snapshot(server: Server, key: str, replace: bool) -> bool:
    """Save the cluster with its templates under ``key`` (a local server only: False elsewhere)."""
    if not isinstance(server, LocalServer):
        return False
    server.save_snapshot(key, replace=replace)
    return True


def warm_up(server: Server, template: str) -> None:
    """Load the template's catalog caches ahead of the first clone (a local server's own cache)."""
    if isinstance(server, LocalServer):
        warm_relcache(server, template)


def origin(server: Server) -> tuple[str, str] | None:
    """(where its binaries come from, how it started) for the session report; None for an existing server."""
    if not isinstance(server, LocalServer):
        return None
    start = "from the cached cluster" if server.snapshot is not None else "from the initdb cache"
    return server.installation.describe(), start


def exit_of(server: Server) -> tuple[str, str] | None:
    """(how a local server's process ended, the end of its log) once it exited; None while it runs, or for an
    existing server."""
    if not isinstance(server, LocalServer):
        return None
    code = server.exited
    if code is None:
        return None
    how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    return f"the local PostgreSQL server (pid {server.pid}) exited during the run ({how})", server.log_tail()


def stop_keeping_databases(server: Server) -> None:
    """Stop using a server whose kept databases outlive the run: a local one keeps running (detached), an
    existing one keeps its passfile (the kept databases' psql command names it)."""
    if isinstance(server, LocalServer):
        server.detach()
        return
    if isinstance(server, ExternalServer):
        server.keep_secrets()
    server.stop()


def leave_gone(server: Server) -> None:
    """The server went away: a local server's directory (and any process of it still exiting) is removed; for
    an existing one only the admin connection is closed."""
    if isinstance(server, LocalServer):
        server.stop()
    else:
        server._close_admin()
