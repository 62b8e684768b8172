"""What every server offers, local or external: its version, a DSN, connections, databases."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgsandbox.binaries import Installation
from pgsandbox.common.redact import Secret, redact
from pgsandbox.errors import ConfigError
from pgsandbox.server.admin import lock_id
from pgsandbox.server.credentials import RenewableCredentials, refused
from pgsandbox.server.passfile import Passfile
from pgsandbox.server.roles import Login, take_over
from pgsandbox.server.statement_log import StatementLog
from pgsandbox.server.tags import QUIET_OPTIONS

MAX_IDENTIFIER = 63


class Server(ABC):
    """A running PostgreSQL server that pgsandbox may create databases on.

    ``dsn`` names the run's passfile (passfile.py), which holds the passwords: no DSN, URL or parameter
    pgsandbox hands out holds one. :meth:`reveal_password` gives a password as text, for the rare client that
    reads no passfile.
    """

    kind: str

    def __init__(
        self,
        conninfo: str,
        version_num: int,
        run_id: str,
        admin_conninfo: str | None = None,
        *,
        passfile: Passfile,
    ) -> None:
        # both name ``passfile`` and hold no password (passfile.py)
        self._conninfo = conninfo
        # pgsandbox's own connections as the admin: a local server's Unix socket (a connect costs less than
        # over TCP loopback, see bench/connect.py); what clients get (dsn, params) is ``conninfo``
        self._admin_conninfo = admin_conninfo or conninfo
        self.passfile = passfile
        self.version_num = version_num
        self.run_id = run_id
        self.prefix = f"pgsandbox_{run_id}_"
        self._created: list[str] = []
        self._admin: psycopg.Connection[Any] | None = None
        self._counter = 0
        # the role tests connect as (roles.py); None: the admin's, as with pg_role = admin
        self.login: Login | None = None
        # whether the templates' objects were handed over to pgsandbox_owner (roles.py): each database made
        # for the tests then gives them to the role the tests connect as (see take_over)
        self.handed_over = False
        self.started = time.time()
        self.counts = {"created": 0, "dropped": 0}  # databases, for the session report
        # the local server's log of every statement (statement_log.py); pgsandbox's own connections stay out of it
        self.statement_log: StatementLog | None = None
        # settings of every database created for tests when they connect as the admin (no role to hold them)
        self.database_settings: dict[str, str] = {}
        # pg_credentials_command (an existing server's): run again when an admin connect is refused
        self.credentials: RenewableCredentials | None = None
        # schema isolation (template/schemas.py): (database, libpq options) that every test connection to that
        # database gets: the search_path on the session's schema, the tests' timeouts
        self.test_options: tuple[str, str] | None = None

    # -- facts -------------------------------------------------------------------------------------
    @property
    def version(self) -> tuple[int, int]:
        """(major, minor), from the server itself."""
        return self.version_num // 10000, self.version_num % 10000

    @property
    def version_string(self) -> str:
        return "{}.{}".format(*self.version)

    @property
    def params(self) -> dict[str, Any]:
        """The connection parameters of the admin DSN (host, port, user, dbname, passfile...)."""
        return conninfo_to_dict(self._conninfo)

    @property
    def dsn(self) -> str:
        """Admin DSN: its password is in the passfile it names (``passfile=``), not in the DSN."""
        return self._conninfo

    @property
    def user(self) -> str:
        """The admin role (the one :attr:`dsn` names, or the one libpq's defaults gave)."""
        return str(self.params.get("user") or self._admin_user)

    _admin_user = ""  # the admin's name when the DSN names none (ExternalServer.attach)

    @property
    def kept_passfile(self) -> Path:
        """The passfile that lives as long as this run's kept databases (the psql command of one names it)."""
        return self.passfile.path

    def reveal_password(self) -> Secret | None:
        """The admin's password as text, for a client that reads no passfile (``repr()`` shows ``'***'``);
        None when it needs none."""
        return self.passfile.password(self.user)

    def login_password(self) -> Secret | None:
        """The password of the role tests connect as (:attr:`login`, or the admin)."""
        if self.login is None:
            return self.reveal_password()
        return self.login.password

    @property
    def dsn_redacted(self) -> str:
        return redact(self._conninfo)

    def dsn_for(self, dbname: str) -> str:
        return make_conninfo(self._conninfo, dbname=dbname)

    @property
    def admin_dsn(self) -> str:
        """The DSN of pgsandbox's own admin connections (:meth:`connect`, :attr:`admin`): on a local server its
        Unix socket, which only processes of this machine and user reach; else :attr:`dsn`. Never print it."""
        return self._admin_conninfo

    def login_dsn_for(self, dbname: str) -> str:
        """The DSN tests use: the login role's (:attr:`login`), or the admin's when there is none."""
        if self.login is None:
            return make_conninfo(self._conninfo, dbname=dbname, **self.path_options(dbname))
        return make_conninfo(self._conninfo, dbname=dbname, user=self.login.user, **self.path_options(dbname))

    def path_options(self, dbname: str | None) -> dict[str, str]:
        """libpq's ``options`` that point a connection to ``dbname`` at the session's schema (schema isolation),
        else nothing."""
        if self.test_options is None or self.test_options[0] != dbname:
            return {}
        return {"options": self.test_options[1]}

    @property
    def login_params(self) -> dict[str, Any]:
        """The connection parameters tests use (see :meth:`login_dsn_for`), without a database name."""
        params = self.params
        if self.login is not None:
            params.update(user=self.login.user)
        return params

    def log_in(self, login: Login) -> None:
        """Tests connect as ``login`` from now on; its password goes to the passfile."""
        self.passfile.add(login.user, login.password)
        self.login = login

    def __repr__(self) -> str:
        return f"<{type(self).__name__} PostgreSQL {self.version_string} {self.dsn_redacted}>"

    @property
    def address(self) -> str:
        """``host:port`` of :attr:`dsn`, for messages (libpq's defaults when it names none)."""
        params = self.params
        return f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"

    # -- what kind of server: ask these, not the class ------------------------------------------------
    owns_cluster = False
    """This process started the server (a local server): it alone uses it, may restart it (save_snapshot),
    and stops it; nobody else's runs left anything on it."""

    # the binaries the server runs from, when this process started it (None: someone else's server)
    installation: Installation | None = None

    @property
    def throwaway(self) -> bool:
        """A server of this run: this process's local server, or the one an xdist controller started for its
        workers. Nobody else creates databases, roles or tablespaces on it."""
        return self.owns_cluster

    @property
    def bindir(self) -> Path | None:
        """Where the server's own programs are (psql of the same version), when pgsandbox started it."""
        return self.installation.bindir if self.installation is not None else None

    @property
    def run_dir(self) -> Path | None:
        """The run directory (data, socket, log) of the server, when pgsandbox started it on this machine."""
        return None

    @property
    def origin(self) -> str:
        """What runs the server, for the session report."""
        return f"PostgreSQL {self.version_string} on an existing server ({self.address})"

    @property
    def how_started(self) -> str:
        """How this session got the server, for the session report."""
        return "attached"

    @property
    def snapshot_hit(self) -> bool:
        """The server started from a cached cluster that holds the templates already built (no migration ran)."""
        return False

    can_save_snapshot = False  # save_snapshot() keeps the cluster with its templates for the next run

    @property
    def drops_databases_later(self) -> bool:
        """The run's databases are dropped after it without its waiting (pg_keep_alive's watcher): skip their
        drops."""
        return False

    def save_snapshot(self, key: str, replace: bool = False) -> Path:
        """Keep the cluster, with the templates built in it, for the next run (see :attr:`can_save_snapshot`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot save a snapshot of someone else's cluster")

    @property
    def exited(self) -> int | None:
        """The server process's exit status when this process knows it ended (negative: the signal that killed
        it); None while it runs, or when this process cannot tell."""
        return None

    def describe_exit(self) -> str | None:
        """What happened to a server whose end this process saw (:attr:`exited`), else None."""
        return None

    def log_tail(self, lines: int = 15) -> str:
        """The end of the server's log (indented), when it is on this machine; else empty."""
        return ""

    # -- connections -------------------------------------------------------------------------------
    def connect(self, dbname: str | None = None, *, logged: bool = False, **kwargs: Any) -> psycopg.Connection[Any]:
        """A new psycopg connection as the admin role, to ``dbname`` (default: the admin database). Its
        statements stay out of the statement log unless ``logged`` (a test's ``pg_admin``). With a credentials
        command (credentials.py), a refused connect runs it again and is retried once."""
        conninfo = make_conninfo(self._admin_conninfo, dbname=dbname) if dbname else self._admin_conninfo
        if self.statement_log is not None and not logged:
            kwargs.setdefault("options", QUIET_OPTIONS)
        path = self.path_options(dbname).get("options")
        if path:
            kwargs["options"] = f"{kwargs['options']} {path}" if kwargs.get("options") else path
        credentials = self.credentials
        if credentials is None:
            return psycopg.connect(conninfo, **kwargs)
        seen = credentials.generation
        try:
            return psycopg.connect(conninfo, **kwargs)
        except psycopg.OperationalError as error:
            if not refused(error):
                raise
        # the token expired or the password was rotated: the credentials command gives the current one
        credentials.renew(seen)
        try:
            return psycopg.connect(conninfo, **kwargs)
        except psycopg.OperationalError as error:
            if not refused(error):
                raise
            failure = credentials.refused(error, self.address)
        raise failure

    @property
    def admin(self) -> psycopg.Connection[Any]:
        """One autocommit connection kept open for administration: new connections cost milliseconds. It
        holds the run's lock (see :meth:`_hold_run_lock`)."""
        if self._admin is None or self._admin.closed:
            self._admin = self.connect(autocommit=True)
            self._hold_run_lock(self._admin)
        return self._admin

    def _hold_run_lock(self, conn: psycopg.Connection[Any]) -> None:
        """A session-level advisory lock for the run's lifetime: while it is held, nobody reaps what the run
        created (reaper.py); when the run dies, the server releases it with the connection."""
        conn.execute("SELECT pg_advisory_lock(%s)", [lock_id(self.run_id, "run")])

    @property
    def run_label(self) -> str:
        """What every database (and role) of this run says about it in its comment: run, start, host, pid."""
        return json.dumps(
            {
                "pgsandbox_run": self.run_id,
                "started": int(self.started),
                "host": socket.gethostname(),
                "pid": os.getpid(),
            }
        )

    # -- databases ---------------------------------------------------------------------------------
    @property
    def databases(self) -> tuple[str, ...]:
        """The databases this object created and has not dropped yet."""
        return tuple(self._created)

    def create_database(
        self, name: str | None = None, *, template: str | None = None, clause: sql.Composable | None = None
    ) -> str:
        """Create a database named with this run's prefix; return its full name.

        ``name`` is the part after the prefix (default: a counter); ``clause`` is appended to the
        ``CREATE DATABASE`` statement (a clone strategy, for example).
        """
        full = self.database_name(name)
        for statement in self.creation(full, template, clause):
            self.admin.execute(statement)
            if full not in self._created:
                self._created.append(full)
                self.counts["created"] += 1
        return full

    def creation(
        self, full: str, template: str | None = None, clause: sql.Composable | None = None
    ) -> list[sql.Composed]:
        """The statements that create database ``full`` for the tests (each in its own transaction): owned by
        the tests' role, which alone (with superusers) may connect to it."""
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(full))
        if template:
            query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        if clause is None and self.throwaway and self.version >= (15, 0):
            # a server of this run runs with fsync off, where FILE_COPY's checkpoints cost little: 9 ms a copy
            # of a small template against 23-30 ms for WAL_LOG (PostgreSQL 15's default), which writes every
            # page to the WAL (templates, the session's databases, scoped data; the clone pool measures its own)
            clause = sql.SQL(" STRATEGY FILE_COPY")
        if clause is not None:
            query += clause
        label = sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(full), sql.Literal(self.run_label))
        if self.login is None:
            for name, value in self.database_settings.items():
                label += sql.SQL("; ALTER DATABASE {} SET {} = {}").format(
                    sql.Identifier(full), sql.Identifier(name), sql.Literal(value)
                )
            return [query, label]
        query += sql.SQL(" OWNER {}").format(sql.Identifier(self.login.user))
        # one round trip: only its owner (and superusers) may connect, and it says which run made it
        revoke = sql.SQL("REVOKE CONNECT ON DATABASE {} FROM PUBLIC; ").format(sql.Identifier(full))
        return [query, revoke + label]

    def take_over(self, conn: psycopg.Connection[Any]) -> None:
        """On a database just cloned for the tests (``conn``: the role they connect as, on it): make that role
        the owner of the template's objects, so that what the tests create has the same owner."""
        if self.handed_over:
            take_over(conn)

    def database_name(self, name: str | None = None) -> str:
        """The full name ``create_database(name)`` would use."""
        if name is None:
            self._counter += 1
            name = f"db{self._counter}"
        if not re.fullmatch(r"[a-z0-9_]+", name):
            raise ConfigError(
                f"database name {name!r} may hold only lower-case letters, digits and underscores.",
                "pick a simple name: pgsandbox adds its run prefix to it.",
            )
        full = self.prefix + name
        if len(full) > MAX_IDENTIFIER:
            raise ConfigError(
                f"database name {full!r} is longer than PostgreSQL's {MAX_IDENTIFIER} characters.",
                f"use a name of at most {MAX_IDENTIFIER - len(self.prefix)} characters.",
            )
        return full

    def adopt_database(self, name: str) -> None:
        """Record a database of this run created elsewhere (a clone pool's thread), so it may be dropped."""
        if not name.startswith(self.prefix):
            raise ConfigError(f"{name!r} is not named with this run's prefix {self.prefix!r}.", "")
        self._created.append(name)

    def forget_database(self, name: str) -> None:
        """Leave a database in place when this object stops (a kept database of a failed test)."""
        if name in self._created:
            self._created.remove(name)

    def rename_database(self, name: str, new_name: str) -> None:
        """Rename a database this object created to another name with its prefix (nobody may be connected)."""
        if name not in self._created or not new_name.startswith(self.prefix):
            raise ConfigError(f"pgsandbox did not create database {name!r}, so it will not rename it.", "")
        self.admin.execute(
            sql.SQL("ALTER DATABASE {} RENAME TO {}").format(sql.Identifier(name), sql.Identifier(new_name))
        )
        self._created[self._created.index(name)] = new_name

    def drop_database(self, name: str) -> None:
        """Drop a database this object created (connections to it are terminated)."""
        if name not in self._created:
            raise ConfigError(
                f"pgsandbox did not create database {name!r}, so it will not drop it.",
                "drop only names create_database() returned: pgsandbox never drops what it did not create.",
            )
        self.admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        self._created.remove(name)
        self.counts["dropped"] += 1

    # -- lifecycle ---------------------------------------------------------------------------------
    @abstractmethod
    def stop(self) -> None:
        """Release everything this object created or started. Safe to call twice."""

    def stop_keeping_databases(self) -> None:
        """Stop, but leave the databases :meth:`forget_database` took out of this object's hands usable after
        this process (kept databases of failed tests) and what their psql command names."""
        self.stop()

    def abandon(self) -> None:
        """The server went away: release what this process holds without asking the server anything."""
        self._close_admin()

    def _close_admin(self) -> None:
        if self._admin is not None and not self._admin.closed:
            self._admin.close()
        self._admin = None

    def __enter__(self) -> Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
