"""An existing server: pgsandbox creates what it needs under a per-run prefix and drops only that."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgsandbox.binaries import MIN_VERSION
from pgsandbox.common.redact import Secret, redact
from pgsandbox.errors import ConfigError, ConnectError, PrivilegeError, UnsupportedVersion
from pgsandbox.server import runs
from pgsandbox.server.base import Server
from pgsandbox.server.credentials import CredentialsCommand, RenewableCredentials, refused
from pgsandbox.server.launch import log_tail
from pgsandbox.server.passfile import FILE_NAME, NO_PASSWORD, Passfile
from pgsandbox.server.roles import drop_login
from pgsandbox.server.statement_log import StatementLog
from pgsandbox.server.tags import QUIET_OPTIONS

CONNECT_TIMEOUT = 10
_UNREACHABLE = re.compile(
    r"could not connect|connection refused|could not translate host name|timeout expired|"
    r"no such file or directory|name or service not known|network is unreachable|no route to host",
    re.IGNORECASE,
)


def describe_target(conninfo: str) -> str:
    """``host=db port=5432 user=app dbname=app`` from a DSN or the libpq environment, without secrets."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "(unparsable DSN)"
    shown = {key: params[key] for key in ("host", "hostaddr", "port", "user", "dbname") if params.get(key)}
    return " ".join(f"{key}={value}" for key, value in shown.items()) or "(libpq defaults: PGHOST, PGPORT...)"


class ExternalServer(Server):
    """A server someone else runs; ``stop()`` drops the databases this run created and nothing else."""

    kind = "external"

    @classmethod
    def attach(
        cls,
        dsn: str = "",
        source: str = "pg_dsn",
        statement_log: StatementLog | None = None,
        admin_dsn: str | None = None,
        local_run: Path | None = None,
        credentials: CredentialsCommand | None = None,
        credentials_first: bool = True,
        *,
        needs_createdb: bool = True,
    ) -> ExternalServer:
        """Connect with ``dsn`` (a URL or key=value string; empty: the libpq ``PG*`` variables) and check
        that the server is new enough and the role may create databases. ``statement_log``: the log of a
        pgsandbox local server (an xdist worker's), which the admin's own statements stay out of;
        ``admin_dsn``: the same role by another way for pgsandbox's own connections (that server's socket);
        ``local_run``: that server's run directory (its log), which makes it a :attr:`throwaway` server;
        ``credentials``: the command that gives the admin's password (credentials.py), run first (else, with
        ``credentials_first`` false, only when the password the DSN's passfile holds is refused: an xdist
        worker, which takes the controller's) and again whenever a reconnect is refused;
        ``needs_createdb``: False for schema isolation, which creates no database."""
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as error:
            raise ConnectError(
                f"{source} is not a valid connection string: {error}.",
                "use a URL (postgresql://user@host:5432/dbname) or key=value pairs (host=... dbname=...).",
            ) from None
        _check_port(str(params.get("port") or ""), source)
        if credentials is not None and params.get("password"):
            raise ConfigError(
                f"{source} holds a password and {credentials.source} gives one too: pgsandbox will not guess "
                "which one is meant.",
                f"take the password out of {source} (postgresql://user@host/db) to use the credentials command, "
                f"or unset {credentials.source}.",
            )
        run_id = runs.new_run_id()
        secrets = runs.create_secrets_dir(run_id)
        try:
            passfile = Passfile(secrets.path / FILE_NAME)
            # the DSN's password moves to the run's passfile: the DSNs this run builds and connects with name
            # the file instead (passfile.py)
            given = params.pop("password", None)
            if given:
                passfile.add(str(params.get("user") or "*"), str(given), port=_passfile_port(params))
                dsn = make_conninfo("", **{**params, "password": NO_PASSWORD, "passfile": str(passfile.path)})
                admin_dsn = admin_dsn and _without_password(admin_dsn, passfile.path)
            del given
            if "connect_timeout" not in params:
                dsn = make_conninfo(dsn, connect_timeout=CONNECT_TIMEOUT)
                admin_dsn = admin_dsn and make_conninfo(admin_dsn, connect_timeout=CONNECT_TIMEOUT)
            fetch = credentials is not None and credentials_first
            while True:
                if fetch:
                    assert credentials is not None
                    dsn, admin_dsn = _fetch(credentials, params, passfile, dsn, admin_dsn)
                try:
                    admin = _open(admin_dsn or dsn, quiet=statement_log is not None)
                    break
                except psycopg.OperationalError as error:
                    if fetch or credentials is None or not refused(error):
                        raise _connect_error(error, describe_target(admin_dsn or dsn), source, credentials) from None
                fetch = True  # the passfile's password was refused: the command's is current
        except BaseException:
            shutil.rmtree(secrets.path, ignore_errors=True)
            raise
        try:
            # a password that came from elsewhere (PGPASSWORD, ~/.pgpass, the passfile the DSN named: an xdist
            # controller's) joins this run's passfile, which every DSN of the run names from now on
            if admin.info.password:
                passfile.add(admin.info.user, Secret(admin.info.password), port=_passfile_port(params))
            passfile.remove("*")  # the DSN named no user: now the admin's line names it (before the tests' role's)
            origin = params.get("passfile")
            dsn = make_conninfo(dsn, password=NO_PASSWORD, passfile=str(passfile.path))
            admin_dsn = admin_dsn and make_conninfo(admin_dsn, password=NO_PASSWORD, passfile=str(passfile.path))
            _check(admin, needs_createdb)
            server = cls(dsn, admin.info.server_version, run_id, admin_dsn, passfile=passfile)
            server._admin_user = admin.info.user
            server.secrets = secrets
            server.origin_passfile = Path(str(origin)) if origin else None
            server.statement_log = statement_log
            server.local_run = local_run
            if credentials is not None:
                server.credentials = RenewableCredentials(
                    credentials, passfile, admin.info.user, _passfile_port(params), params
                )
        except BaseException:
            admin.close()
            shutil.rmtree(secrets.path, ignore_errors=True)
            raise
        server._admin = admin
        server._hold_run_lock(admin)
        return server

    secrets: runs.RunDir | None = None  # the run's directory, holding its passfile
    origin_passfile: Path | None = None  # the passfile the attached DSN named (an xdist controller's)
    local_run: Path | None = None  # the run directory of the pgsandbox local server attached to (xdist workers)

    @property
    def throwaway(self) -> bool:
        return self.local_run is not None

    @property
    def run_dir(self) -> Path | None:
        return self.local_run

    def log_tail(self, lines: int = 15) -> str:
        """The end of the log of the pgsandbox local server attached to (an xdist controller's), else empty."""
        return log_tail(runs.RunDir(self.local_run), lines) if self.local_run is not None else ""

    @property
    def kept_passfile(self) -> Path:
        """The passfile a kept database's psql command names: the xdist controller's, which lives as long as
        its run, else this run's."""
        return self.origin_passfile or self.passfile.path

    def keep_secrets(self) -> None:
        """Databases of this run are kept: its passfile stays (for the admin only) until ``pgsandbox clean`` or
        ``pgsandbox reap --include-kept``. An xdist worker's kept databases name the controller's passfile."""
        if self.origin_passfile is not None:
            return
        if self.login is not None:
            self.passfile.remove(self.login.user)
        if self.secrets is not None:
            runs.mark_kept(self.secrets)
            self.secrets = None

    def stop_keeping_databases(self) -> None:
        """The passfile their psql command names stays (:meth:`keep_secrets`); the rest goes (:meth:`stop`)."""
        self.keep_secrets()
        self.stop()

    def stop(self) -> None:
        """Drop every database this run created (and only those), then the role its tests used."""
        try:
            for name in list(self._created):
                self.drop_database(name)
            if self.login is not None:
                drop_login(self.admin, self.login)
        finally:
            self._close_admin()
            if self.secrets is not None:
                shutil.rmtree(self.secrets.path, ignore_errors=True)
                self.secrets = None


def _passfile_port(params: dict[str, Any]) -> str:
    """The port a passfile line names: the DSN's, or any when it names none or several (a multi-host DSN)."""
    port = str(params.get("port") or "*")
    return "*" if "," in port else port


def _without_password(conninfo: str, passfile: Path) -> str:
    params = conninfo_to_dict(conninfo)
    return make_conninfo("", **{**params, "password": NO_PASSWORD, "passfile": str(passfile)})


def _check_port(port: str, source: str) -> None:
    """libpq reports a port that is not a number as a failure to resolve the host: say what it is."""
    where = source
    if not port:
        port, where = os.environ.get("PGPORT", ""), "PGPORT"
    for entry in port.split(","):
        if entry.strip() and not (entry.strip().isdigit() and 1 <= int(entry) <= 65535):
            raise ConnectError(
                f"the port {entry.strip()!r} in {where} is not a port number.",
                f"give a port from 1 to 65535 in {where} (postgresql://user@host:5432/dbname), or leave it out "
                "for 5432.",
            )


def _fetch(
    credentials: CredentialsCommand, params: dict[str, Any], passfile: Passfile, dsn: str, admin_dsn: str | None
) -> tuple[str, str | None]:
    """Run the credentials command; its password goes to the passfile, and its user (when it names one: Vault's
    dynamic users) into ``params``; return the DSNs to connect with, which name the passfile."""
    given = credentials.run(params)
    if given.user:
        params["user"] = given.user
    passfile.add(str(params.get("user") or "*"), given.password, port=_passfile_port(params))
    del given
    user = {"user": params["user"]} if params.get("user") else {}
    dsn = make_conninfo(dsn, password=NO_PASSWORD, passfile=str(passfile.path), **user)
    admin_dsn = admin_dsn and make_conninfo(admin_dsn, password=NO_PASSWORD, passfile=str(passfile.path), **user)
    return dsn, admin_dsn


def _open(dsn: str, quiet: bool = False) -> psycopg.Connection[Any]:
    extra: dict[str, Any] = {"options": QUIET_OPTIONS} if quiet else {}  # else PGOPTIONS applies
    return psycopg.connect(dsn, autocommit=True, **extra)


def _connect_error(
    error: psycopg.OperationalError, target: str, source: str, credentials: CredentialsCommand | None = None
) -> ConnectError:
    """What a failed first connect to the server means, and what to do."""
    message = redact(str(error).strip())
    if refused(error):
        if credentials is not None:
            return ConnectError(
                f"the PostgreSQL server at {target} refused the password that the credentials command "
                f"`{credentials.shown}` ({credentials.source}) gave: {message}",
                "check that the command gives the current password (or token) of the role the DSN names, or prints "
                'JSON {"user": ..., "password": ...} naming its role: run it in a terminal and connect with psql.',
            )
        return ConnectError(
            f"the PostgreSQL server at {target} refused the password: {message}",
            f"give the right password in {source} (postgresql://user:PASSWORD@host/db), "
            "in PGPASSWORD, or in ~/.pgpass; or a command that prints it in pg_credentials_command.",
        )
    if _UNREACHABLE.search(message):
        return ConnectError(
            f"pgsandbox could not reach the PostgreSQL server at {target}: {message}",
            f"check that the server is running and that the host and port in {source} (or PGHOST, "
            "PGPORT) are right; or unset them to let pgsandbox start a local server.",
        )
    return ConnectError(
        f"pgsandbox could not connect to the PostgreSQL server at {target}: {message}",
        f"check {source} and the libpq variables (PGHOST, PGPORT, PGUSER, PGDATABASE).",
    )


def _check(admin: psycopg.Connection[Any], needs_createdb: bool = True) -> None:
    version = admin.info.server_version
    check_version(version)
    row = admin.execute(
        "SELECT current_user, rolsuper, rolcreatedb FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    assert row is not None
    user, superuser, createdb = row
    if needs_createdb and not (superuser or createdb):
        raise PrivilegeError(
            f"role {user!r} lacks the CREATEDB privilege, which pgsandbox needs to create test databases.",
            f"as a superuser run: ALTER ROLE {user} CREATEDB; or connect as a role that has it; or, where tests may "
            "not create databases, use schema isolation (pg_isolation = schema), which needs only CREATE on the "
            "DSN's database.",
        )


def check_version(version_num: int, minimum: tuple[int, ...] = MIN_VERSION) -> None:
    major, minor = version_num // 10000, version_num % 10000
    if (major, minor) < minimum:
        raise UnsupportedVersion(
            f"the PostgreSQL server runs version {major}.{minor}; pgsandbox needs "
            f"{'.'.join(map(str, minimum))} or newer.",
            "upgrade the server, or unset the DSN to let pgsandbox start a local, current one.",
        )
