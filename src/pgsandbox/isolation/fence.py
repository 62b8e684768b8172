"""The connection fence: while pgsandbox's session runs, tests and migrations reach only the sandbox's server.

A check on the client libraries' connect entry points (common/connect_hooks.py) compares every connection's
target, resolved as libpq resolves it, with the sandbox's server (its clients' address and pgsandbox's own
socket) and the endpoints ``pg_fence_allow`` names; any other is refused with an error of the library's own
connection-error class (psycopg's or psycopg2's ``OperationalError``, ``ConnectionRefusedError`` for asyncpg),
which is also a :class:`ConnectionFenced`, or let through with a :class:`PgSandboxWarning` (``pg_fence = warn``).

It also points the libpq environment at the sandbox, for what the hooks cannot see (``psql``, ``pg_dump``, an app
run as a subprocess): ``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGPASSFILE`` name the sandbox's server and the tests'
role, ``PGDATABASE`` (and each variable ``pg_env_url`` names, such as ``DATABASE_URL``) the test's database while a
test has one and nothing otherwise (libpq then asks for a database named after the role, which does not exist);
``PGHOSTADDR``, ``PGSERVICE`` and ``PGPASSWORD``, which would take precedence, are cleared. Everything is put
back when the fence is removed.

The pytest plugin installs one fence per session, from its configuration on (so that an app module that connects
at import is fenced too) to its end; :class:`~pgsandbox.Sandbox` allows its server as soon as it is started (or
attached to), before the migrations run, and its own connections while it starts one (:func:`exempt`). Fences
nest (a pytest run inside a test): the innermost decides. During a template build the guard (template/guard.py)
is stricter still: only the template being built.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from pgsandbox.common import connect_hooks
from pgsandbox.common.connect_hooks import Allowed, Endpoint, Target, parse_allowed, same_host
from pgsandbox.errors import PgSandboxError, PgSandboxWarning

SESSION_ENV = ("PGHOST", "PGPORT", "PGUSER", "PGPASSFILE")
CLEARED_ENV = ("PGDATABASE", "PGHOSTADDR", "PGSERVICE", "PGPASSWORD")


class ConnectionFenced(PgSandboxError):
    """A connection to a server other than the sandbox's, refused by the connection fence. What is raised is
    also the client library's own connection-error class (see :func:`refused_class`)."""

    target: Target | None = None
    test = ""

    def __init__(self, what: str, fix: str = "", **_library_fields: Any) -> None:
        # psycopg builds a new error of the same class from the message when several hosts were tried
        super().__init__(what, fix)


_refused_classes: dict[type[Exception], type[ConnectionFenced]] = {}


def refused_class(connection_error: type[Exception]) -> type[ConnectionFenced]:
    """:class:`ConnectionFenced` that is also the library's ``connection_error``, so that the app's own handling of
    an unreachable database applies to it."""
    if issubclass(connection_error, ConnectionFenced):
        return connection_error
    made = _refused_classes.get(connection_error)
    if made is None:
        made = type("ConnectionFenced", (ConnectionFenced, connection_error), {"__module__": __name__})
        _refused_classes[connection_error] = made
    return made


class Fence:
    """One session's fence (see the module). ``mode``: error, warn or off; ``allow``: ``pg_fence_allow``;
    ``env_urls``: the variables that get the test's database URL (``pg_env_url``)."""

    def __init__(self, mode: str = "error", allow: Iterable[str] = (), env_urls: Sequence[str] = ()) -> None:
        self.mode = mode
        self.allowed = [parse_allowed(text) for text in allow]
        self.env_urls = tuple(env_urls)
        self.sandbox: list[Endpoint] = []  # the sandbox's server, as its clients and pgsandbox itself reach it
        self.test = ""  # the running test's id
        self.test_mode: str | None = None  # @pytest.mark.pg(fence=...)
        self.test_allowed: list[Allowed] = []  # @pytest.mark.pg(fence_allow=...)
        self._exempt = threading.local()
        self._remove: Any = None
        self._saved_env: dict[str, str | None] | None = None
        self._session_params: dict[str, Any] = {}

    # -- lifetime ------------------------------------------------------------------------------------------
    def install(self) -> Fence:
        self._remove = connect_hooks.install(self.check)
        _active.append(self)
        return self

    def remove(self) -> None:
        if self in _active:
            _active.remove(self)
        if self._remove is not None:
            self._remove()
            self._remove = None
        self._restore_env()

    def allow_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        self.sandbox.extend(endpoint for endpoint in endpoints if endpoint not in self.sandbox)

    @contextlib.contextmanager
    def exempt(self) -> Iterator[None]:
        """pgsandbox's own connections while it starts or attaches to a server (in this thread only): the server
        is the sandbox's, but its address is not known before."""
        before = getattr(self._exempt, "on", False)
        self._exempt.on = True
        try:
            yield
        finally:
            self._exempt.on = before

    def enter_test(self, test: str, mode: str | None = None, allow: Iterable[str] = ()) -> None:
        self.test, self.test_mode, self.test_allowed = test, mode, [parse_allowed(text) for text in allow]

    def leave_test(self) -> None:
        self.test, self.test_mode, self.test_allowed = "", None, []

    # -- the check -----------------------------------------------------------------------------------------
    def allows(self, endpoint: Endpoint) -> bool:
        if endpoint in self.sandbox:
            return True
        return any(ours.port == endpoint.port and same_host(ours.host, endpoint.host) for ours in self.sandbox) or any(
            allowed.matches(endpoint) for allowed in (*self.allowed, *self.test_allowed)
        )

    def check(self, target: Target) -> None:
        if target.via_sqlalchemy or not _active or _active[-1] is not self or getattr(self._exempt, "on", False):
            return  # SQLAlchemy's dialects for psycopg, psycopg2 and asyncpg reach the drivers' own hooks
        mode = self.test_mode or self.mode
        if mode == "off":
            return
        refused = [endpoint for endpoint in target.endpoints if not self.allows(endpoint)]
        if not refused:
            return
        what, fix = self.explain(target, refused)
        if mode == "warn":
            warnings.warn(PgSandboxWarning(f"{what}\n  What to do: {fix}"), stacklevel=4)
            return
        error = refused_class(target.connection_error)(what, fix)
        error.target, error.test = target, self.test
        raise error

    def explain(self, target: Target, refused: Sequence[Endpoint]) -> tuple[str, str]:
        who = (
            f"the test {self.test}"
            if self.test
            else "code running outside any test (an import while pytest collected, a session fixture, a migration)"
        )
        sandbox = ", ".join(str(endpoint) for endpoint in self.sandbox) or "not started yet"
        what = (
            f"pgsandbox's connection fence refused a connection through {target.library} to {target.describe()}, "
            f"made by {who}. While pgsandbox's session runs, tests and migrations may reach only the sandbox's "
            f"server ({sandbox}), so that no test changes a real database."
        )
        endpoint = str(refused[0])
        fix = (
            "if it was meant for the sandbox, connect where pgsandbox points (pg.dsn, pg.url(), pg.env, or the "
            "PGHOST/PGPORT/PGDATABASE environment it sets while a test runs). If this test must reach that server, "
            f"allow it: pg_fence_allow = {endpoint} (ini; --pg-fence-allow {endpoint}, env "
            f"PGSANDBOX_FENCE_ALLOW), or for one test @pytest.mark.pg(fence_allow=[{endpoint!r}]); "
            "pg_fence = warn lets such connections through with a warning, pg_fence = off turns the fence off."
        )
        return what, fix

    # -- the libpq environment -----------------------------------------------------------------------------
    def point_env(self, params: Mapping[str, Any], database_url: str | None = None) -> None:
        """Point the libpq environment at ``params`` (libpq keywords: the sandbox's server and the tests' role);
        with ``database_url``, at the test's database too. The first call saves what was there."""
        if self.mode == "off":
            return
        names = (*SESSION_ENV, *CLEARED_ENV, *self.env_urls)
        if self._saved_env is None:
            self._saved_env = {name: os.environ.get(name) for name in names}
        values = {
            "PGHOST": params.get("host"),
            "PGPORT": params.get("port"),
            "PGUSER": params.get("user"),
            "PGPASSFILE": params.get("passfile"),
        }
        if database_url is None:
            self._session_params = dict(params)
        else:
            values["PGDATABASE"] = params.get("dbname")
            values.update(dict.fromkeys(self.env_urls, database_url))
        for name in names:
            value = values.get(name)
            if value:
                os.environ[name] = str(value)
            else:
                os.environ.pop(name, None)

    def point_env_at_session(self) -> None:
        """After a test's database: the sandbox's server again, no database."""
        if self._saved_env is not None:
            self.point_env(self._session_params)

    def _restore_env(self) -> None:
        if self._saved_env is None:
            return
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env = None


_active: list[Fence] = []


def active() -> Fence | None:
    """The innermost fence installed, if any."""
    return _active[-1] if _active else None


def exempt() -> contextlib.AbstractContextManager[None]:
    fence = active()
    return fence.exempt() if fence is not None else contextlib.nullcontext()


def allow_server(dsns: Iterable[str]) -> None:
    """The sandbox's server (its DSNs: the clients' and pgsandbox's own) may be reached from now on."""
    fence = active()
    if fence is not None:
        fence.allow_endpoints(
            e for dsn in dsns for e in connect_hooks.resolve(connect_hooks.conninfo_params(dsn)).endpoints
        )
