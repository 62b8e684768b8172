"""A running server: local and throwaway, or someone else's (external).

The classes are imported on first use: the pytest plugin starts a local server's postgres from the light
modules (launch.py, clusters.py, runs.py: no psycopg) while the main thread imports psycopg."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pgsandbox.settings import Settings

if TYPE_CHECKING:
    from pgsandbox.common.progress import Progress
    from pgsandbox.server.base import Server
    from pgsandbox.server.credentials import CredentialsCommand
    from pgsandbox.server.external import ExternalServer
    from pgsandbox.server.launch import Launched
    from pgsandbox.server.local import LocalServer

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

_EXPORTS = {
    "CredentialsCommand": "pgsandbox.server.credentials",
    "ExternalServer": "pgsandbox.server.external",
    "LocalServer": "pgsandbox.server.local",
    "Progress": "pgsandbox.common.progress",
    "Server": "pgsandbox.server.base",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def wants_external(settings: Settings) -> bool:
    return settings.server == "external" or (settings.server == "auto" and bool(settings.dsn))


def credentials_command(settings: Settings) -> CredentialsCommand | None:
    """``pg_credentials_command``, when set: it gives an existing server's admin password (a local server has
    its own, and ignores it)."""
    if not settings.credentials_command:
        return None
    from pgsandbox.server.credentials import CredentialsCommand

    return CredentialsCommand(
        settings.credentials_command, settings.source_of("credentials_command"), settings.credentials_timeout
    )


def start_server(
    settings: Settings | None = None,
    progress: Progress | None = None,
    snapshots: Sequence[str] = (),
    launched: Launched | None = None,
) -> Server:
    """The server these settings ask for: attach to an existing one, or start a local one (from the first
    cached cluster snapshot of ``snapshots``, if any; ``launched``: its postgres already started from them,
    :func:`pgsandbox.server.launch.launch`)."""
    settings = settings or Settings.from_env()
    if wants_external(settings):
        from pgsandbox.server.external import ExternalServer

        return ExternalServer.attach(
            settings.dsn or "",
            settings.source_of("dsn"),
            credentials=credentials_command(settings),
            needs_createdb=settings.isolation != "schema",
        )
    from pgsandbox.server.local import LocalServer

    return LocalServer.start(settings, progress, snapshots, launched=launched)
