"""A running server: local and throwaway, or someone else's (external)."""

from __future__ import annotations

from collections.abc import Sequence

from pgsandbox.common.progress import Progress
from pgsandbox.server.base import Server
from pgsandbox.server.credentials import CredentialsCommand
from pgsandbox.server.external import ExternalServer
from pgsandbox.server.local import LocalServer
from pgsandbox.settings import Settings

__all__ = [
    "CredentialsCommand",
    "ExternalServer",
    "LocalServer",
    "Progress",
    "Server",
    "credentials_command",
    "start_server",
    "wants_external",
]


def wants_external(settings: Settings) -> bool:
    return settings.server == "external" or (settings.server == "auto" and bool(settings.dsn))


def credentials_command(settings: Settings) -> CredentialsCommand | None:
    """``pg_credentials_command``, when set: it gives an existing server's admin password (a local server has
    its own, and ignores it)."""
    if not settings.credentials_command:
        return None
    return CredentialsCommand(
        settings.credentials_command, settings.source_of("credentials_command"), settings.credentials_timeout
    )


def start_server(
    settings: Settings | None = None, progress: Progress | None = None, snapshots: Sequence[str] = ()
) -> Server:
    """The server these settings ask for: attach to an existing one, or start a local one (from the first
    cached cluster snapshot of ``snapshots``, if any)."""
    settings = settings or Settings.from_env()
    if wants_external(settings):
        return ExternalServer.attach(
            settings.dsn or "",
            settings.source_of("dsn"),
            credentials=credentials_command(settings),
            needs_createdb=settings.isolation != "schema",
        )
    return LocalServer.start(settings, progress, snapshots)
