"""Start-up checks of the options that need the machine (a name resolves, a directory exists), so that a bad
value stops the run with one message before any test, instead of a traceback at set-up or after the tests."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pgsandbox.errors import ConfigError
from pgsandbox.settings import Settings, listens_on_tcp

LISTEN_FIX = (
    "set pg_listen to an address of this machine (127.0.0.1, ::1, or * for all of them) or a name that resolves "
    "to one (localhost), or to none to use the Unix socket only."
)


def check_startup(settings: Settings, invocation_dir: Path) -> None:
    """Raise :class:`ConfigError` for the first option that cannot work on this machine."""
    check_listen(settings)
    check_report_path(settings, invocation_dir)


def check_listen(settings: Settings) -> None:
    """Every name in ``pg_listen`` resolves (the server would only say so in its log, at set-up)."""
    external = settings.server == "external" or (settings.server == "auto" and bool(settings.dsn))
    if external or not listens_on_tcp(settings.listen):
        return
    for entry in str(settings.listen).split(","):
        host = entry.strip()
        if host in ("", "*"):
            continue
        try:
            socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            raise ConfigError(
                f"{settings.source_of('listen')}: {host!r} does not resolve to an address ({reason}), so the local "
                "server could not listen on it.",
                LISTEN_FIX,
            ) from None


def report_path(settings: Settings, invocation_dir: Path) -> Path | None:
    """Where ``--pg-report=json[:PATH]`` writes the report (relative to where pytest was started)."""
    if settings.report == "json":
        return invocation_dir / "pgsandbox-report.json"
    if settings.report.startswith("json:"):
        path = Path(settings.report[5:]).expanduser()
        return path if path.is_absolute() else invocation_dir / path
    return None


def check_report_path(settings: Settings, invocation_dir: Path) -> None:
    """The report is written after the tests: a directory that is missing would fail the run only then."""
    path = report_path(settings, invocation_dir)
    if path is None:
        return
    source = settings.source_of("report")
    fix = f"create {path.parent} first, or give {source} a path in an existing, writable directory."
    if path.is_dir():
        raise ConfigError(
            f"{source}: {path} is a directory; the report is a file.", f"name a file, such as {path}/report.json."
        )
    if not path.parent.is_dir():
        raise ConfigError(f"{source}: the report's directory {path.parent} does not exist.", fix)
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"{source}: {path} is not writable.", fix)


def unmatched_inputs(settings: Settings, root: Path) -> list[str]:
    """The ``pg_migrations_inputs`` globs that match no file: most often a typo, which would leave the files
    meant out of the template's hash (a stale template when they change)."""
    from pgsandbox.common.files import files_matching  # not the template package: it imports psycopg and the server

    return [pattern for pattern in settings.migrations_inputs if not files_matching([pattern], root)]
