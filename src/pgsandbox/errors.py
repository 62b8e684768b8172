"""Every error a user can hit says what happened and what to do; these classes carry both."""

from __future__ import annotations

# The docs site ([project.urls] Documentation in pyproject.toml, site_url in mkdocs.yml): an error's what-to-do
# links to its kind's entry on the troubleshooting page
DOCS_URL = "https://pgsandbox.github.io/pytest-pgsandbox/"


class PgSandboxError(Exception):
    """Base class: ``str(error)`` is the whole message, already free of passwords."""

    def __init__(self, what: str, fix: str = "") -> None:
        from pgsandbox.common.redact import redact

        self.what = redact(what)
        self.fix = redact(fix)
        super().__init__(self.what + (f"\n  What to do: {self.fix}" if self.fix else ""))
        if self.fix:  # a one-line error (no fix: "see the first error") stays one line
            # a note (PEP 678), not part of str(error): tracebacks and pytest print it after the message, and
            # with_link() adds it where a message quotes the error
            self.__notes__ = [f"  See: {self.docs_url()}"]

    @classmethod
    def docs_url(cls) -> str:
        """This kind of error's entry on the docs site's troubleshooting page (a heading named after the class)."""
        return f"{DOCS_URL}troubleshooting/#{cls.__name__.lower()}"


def with_link(error: BaseException) -> str:
    """The error's message and its notes (a pgsandbox error's troubleshooting link), for a message that quotes it."""
    return "\n".join([str(error), *getattr(error, "__notes__", ())])


class ConfigError(PgSandboxError):
    """An option has a value pgsandbox cannot use."""


class BinariesNotFound(PgSandboxError):
    """No usable PostgreSQL installation, or none that satisfies the version pin."""


class ServerStartError(PgSandboxError):
    """The local server did not start."""


class ConnectError(PgSandboxError):
    """A server could not be reached or refused the credentials."""


class PrivilegeError(PgSandboxError):
    """The role lacks a privilege pgsandbox needs."""


class UnsupportedVersion(PgSandboxError):
    """The server is older than pgsandbox supports."""


class PgSandboxWarning(UserWarning):
    """Something pgsandbox worked around or found; the run goes on."""


class MissingExtra(PgSandboxError):
    """A fixture or migrator needs a library that is not installed."""

    module = ""  # the module that could not be imported
    extra = ""  # the pytest-pgsandbox extra that installs it


def causes(error: BaseException | None) -> list[BaseException]:
    """``error`` and what it wraps (SQLAlchemy's ``orig``, causes, contexts), nearest first."""
    found: list[BaseException] = []
    while error is not None and len(found) < 10:
        found.append(error)
        error = getattr(error, "orig", None) or error.__cause__ or error.__context__
    return found


def sqlstate(error: BaseException) -> str | None:
    """A database error's SQLSTATE: psycopg and asyncpg call it ``sqlstate``, psycopg2 ``pgcode``."""
    state = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
    return str(state) if state else None
