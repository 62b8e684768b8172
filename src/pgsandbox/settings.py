"""The options, their sources and their precedence (CLI > env > ini > default), independent of pytest.

Each option has one entry in :data:`OPTIONS`; the pytest glue registers ``--pg-NAME`` and ini ``pg_NAME``
from it, and the environment variable is ``PGSANDBOX_NAME``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pgsandbox.errors import ConfigError

ServerKind = Literal["auto", "local", "external"]
Raw = str | Sequence[str] | bool | None


@dataclass(frozen=True)
class Option:
    name: str
    help: str
    kind: Literal["str", "list", "flag"] = "str"
    parse: Callable[[str], Any] = str
    env_separator: str = ";"

    @property
    def cli(self) -> str:
        return "--pg-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return "pg_" + self.name

    @property
    def env(self) -> str:
        return "PGSANDBOX_" + self.name.upper()


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _version(value: str) -> str:
    if not re.fullmatch(r"\d+(\.\d+)?", value):
        raise ValueError("expected a PostgreSQL version such as 16 or 16.4")
    return value


SOCKET_ONLY = ("none", "off", "no")


def _listen(value: str) -> str:
    """An address for ``listen_addresses``; ``none`` (``off``, ``no``): the Unix socket alone."""
    return "none" if value.lower() in SOCKET_ONLY else value


def listens_on_tcp(listen: str | None) -> bool:
    return bool(listen) and str(listen).lower() not in SOCKET_ONLY


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise ValueError("expected a port number from 0 (pick a free one) to 65535") from None
    if not 0 <= port <= 65535:
        raise ValueError("expected a port number from 0 (pick a free one) to 65535")
    return port


def _server_setting(value: str) -> tuple[str, str]:
    name, sep, setting = value.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", name):
        raise ValueError(f"{value!r} is not of the form name=value (for example work_mem=64MB)")
    setting = setting.strip()
    if len(setting) >= 2 and setting[0] == setting[-1] == "'":
        setting = setting[1:-1].replace("''", "'")
    return name.lower(), setting


def _extension(value: str) -> str:
    name = value.strip().strip('"')
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ValueError("expected an extension name as in CREATE EXTENSION, such as uuid-ossp or pgcrypto")
    return name


def _path(value: str) -> Path:
    return Path(value).expanduser()


def _flag(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise ValueError("expected a whole number of at least 1") from None
    if count < 1:
        raise ValueError("expected a whole number of at least 1")
    return count


def _timeout(value: str) -> float:
    """A number of seconds greater than 0."""
    try:
        seconds = float(value.strip().removesuffix("s"))
    except ValueError:
        raise ValueError("expected a number of seconds greater than 0, such as 30") from None
    if not seconds > 0:
        raise ValueError("expected a number of seconds greater than 0, such as 30")
    return seconds


def _seconds(value: str) -> float:
    if value.strip().lower() in ("never", "off"):
        return -1.0
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError("expected a number of seconds (0: at once; -1 or never: never)") from None
    if seconds < 0 and seconds != -1:
        raise ValueError("expected a number of seconds (0: at once; -1 or never: never)")
    return seconds


SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
}


def _size(value: str) -> int:
    """A size in bytes: ``500MB``, ``2GB``, ``1.5G``, a plain number of bytes; ``0``/``none``: no bound."""
    text = value.strip().lower().replace(" ", "")
    if text in ("none", "off", "unlimited"):
        return 0
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", text)
    if not match or match[2] not in SIZE_UNITS:
        raise ValueError("expected a size such as 500MB, 2GB or 1.5G (0 or none: no bound)")
    return int(float(match[1]) * SIZE_UNITS[match[2]])


def _report(value: str) -> str:
    if value in ("term", "off", "json") or (value.startswith("json:") and len(value) > 5):
        return value
    raise ValueError("expected term (the default), json, json:PATH or off")


def _duration(value: str) -> str:
    """A PostgreSQL duration for a timeout: ``30s``, ``500ms``, ``5min``, ``1h``; ``0`` turns it off."""
    text = value.strip().replace(" ", "")
    if not re.fullmatch(r"\d+(ms|s|min|h)?", text):
        raise ValueError("expected a duration such as 500ms, 30s, 5min or 1h (0: no timeout)")
    return text


DURATION_UNITS = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "h": 3600, "d": 86400}
KEEP_ALIVE_OFF = ("0", "off", "no", "none", "false")
KEEP_ALIVE_HELP = "expected a duration such as 30s, 10min or 1h (0 or off: the server stops with the run)"


def _keep_alive(value: str) -> float:
    """How long a local server outlives its run with no run attached, in seconds: ``30s``, ``10min``, ``1h``,
    ``1d``; ``0``/``off``: not at all. A unit is required, a bare number being ambiguous (seconds? minutes?)."""
    text = value.strip().lower().replace(" ", "")
    if text in KEEP_ALIVE_OFF:
        return 0.0
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", text)
    if not match:
        raise ValueError(KEEP_ALIVE_HELP)
    if not match[2]:
        raise ValueError(f"{KEEP_ALIVE_HELP}; a unit is needed: {text}s or {text}min?")
    if match[2] not in DURATION_UNITS:
        raise ValueError(f"{KEEP_ALIVE_HELP}; unknown unit {match[2]!r} (ms, s, min, h or d)")
    seconds = float(match[1]) * DURATION_UNITS[match[2]]
    if seconds < 1:
        raise ValueError(f"{KEEP_ALIVE_HELP}; at least 1s")
    return seconds


def _fence_allow(value: str) -> str:
    """``host:port`` (or a host alone: any port), checked as the fence reads it."""
    from pgsandbox.common.connect_hooks import parse_allowed

    return str(parse_allowed(value))


def _env_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise ValueError("expected the name of an environment variable, such as DATABASE_URL")
    return value


def _class_path(value: str) -> str:
    """``module:Class``, imported only when a fixture needs it (settings import nothing of the app)."""
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", value):
        raise ValueError("expected module:Class, such as sqlmodel:Session")
    return value


ISOLATIONS = ("transaction", "database", "schema")
ASYNC_DRIVERS = ("asyncpg", "psycopg")
ROLES = ("own", "createdb", "admin")
GUARDS = ("error", "warn", "off")
FENCES = ("error", "warn", "off")
CLONE_STRATEGIES = ("auto", "file_copy", "wal_log")
SQL_LOGS = ("auto", "jsonlog", "csvlog", "off")


OPTIONS: tuple[Option, ...] = (
    Option(
        "server",
        "auto (a DSN if one is configured, else a local server), local, or external",
        parse=_choice("auto", "local", "external"),
    ),
    Option("dsn", "connection string or URL of an existing server to use instead of a local one"),
    Option(
        "credentials_command",
        "a shell command that prints the password (or token) of the existing server's admin role, or JSON "
        '{"user": ..., "password": ...} ("username" and "token" too, at the top or under "data" as vault read '
        "-format=json prints it); it runs when pgsandbox attaches and again when a reconnect is refused (an "
        "expired token, a rotated password), and wins over PGPASSWORD and ~/.pgpass",
    ),
    Option(
        "credentials_timeout",
        "seconds pg_credentials_command may take before pgsandbox stops it (default 30)",
        parse=_timeout,
    ),
    Option("bin", "directory holding the PostgreSQL binaries (postgres, initdb) to use", parse=_path),
    Option("version", "PostgreSQL version to use, such as 16 or 18.6 (default: the newest found)", parse=_version),
    Option(
        "extensions",
        "extensions the migrations create (uuid-ossp, pgcrypto...): the local server uses an installation that "
        "ships them all; an existing server is checked for them",
        kind="list",
        parse=_extension,
        env_separator=",",
    ),
    Option(
        "listen",
        "TCP address the local server listens on beside its Unix socket, which the DSNs and URLs tests get name "
        "(default 127.0.0.1; none: the Unix socket only)",
        parse=_listen,
    ),
    Option("port", "TCP port with --pg-listen (default 0: a free one)", parse=_port),
    Option(
        "server_settings",
        "extra postgresql.conf settings for the local server, name=value",
        kind="list",
        parse=_server_setting,
    ),
    Option("initdb_args", "extra initdb arguments for the local server", kind="list", env_separator=" "),
    Option("cache", "cache directory (default: the user cache directory, such as ~/.cache/pgsandbox)", parse=_path),
    Option(
        "cache_max_size",
        "bound on the cache's size: the least recently used clusters are removed beyond it, never one a run is "
        "copying (default 1GB; 0 or none: no bound)",
        parse=_size,
    ),
    Option(
        "runtime_dir",
        "where local servers keep their data (default: /dev/shm when it has room, else the temporary directory)",
        parse=_path,
    ),
    Option(
        "migrations",
        "schema migrations, applied in order: sql:DIR (or a directory), alembic:PATH/alembic.ini, "
        "python:package.module:function",
        kind="list",
    ),
    Option(
        "migrations_inputs",
        "globs of files that python: migrations and hooks read, so that changing them rebuilds the template",
        kind="list",
    ),
    Option("seed", "seed data on top of the migrations, same forms as pg_migrations", kind="list"),
    Option(
        "isolation",
        "how each test gets its database: transaction (default), database, or schema (for a server where tests may "
        "not create databases: the session migrates a schema of its own in the DSN's database, each test is "
        "rolled back in it; needs only CREATE on that database)",
        parse=_choice(*ISOLATIONS),
    ),
    Option("rebuild", "rebuild the templates even when the cache has them", kind="flag", parse=_flag),
    Option(
        "keep_failed",
        "keep the database of a failed test and print how to open it with psql",
        kind="flag",
        parse=_flag,
    ),
    Option(
        "keep_alive",
        "the local server outlives the run for this idle time (30s, 10min, 1h), and the next run with the same "
        "binaries and server settings attaches to it instead of starting one (default 0 or off: it stops with the run)",
        parse=_keep_alive,
    ),
    Option(
        "clone_strategy",
        "CREATE DATABASE strategy for clones on PostgreSQL 15+: auto (file_copy), file_copy or wal_log",
        parse=_choice(*CLONE_STRATEGIES),
    ),
    Option(
        "recycle_clones",
        "database isolation on PostgreSQL 15+: auto (default: a used clone whose test only wrote rows and advanced "
        "sequences is restored and given to the next test) or off (every test gets a new clone)",
        parse=_choice("auto", "off"),
    ),
    Option("templates_keep", "how many templates per project to keep on the server (default 3)", parse=_count),
    Option(
        "gc_freeze",
        "auto (default: what the run has made when its sandbox starts, pytest's and the plugins' modules, the tests "
        "collected, psycopg and pgsandbox, is frozen for Python's garbage collector, whose full passes then skip it: "
        "50-200 ms off a short run's end) or off",
        parse=_choice("auto", "off"),
    ),
    Option(
        "role",
        "whom tests connect as: own (default: a least-privilege role of the session's own), createdb (the same, "
        "allowed to create databases) or admin",
        parse=_choice(*ROLES),
    ),
    Option(
        "reap_grace",
        "seconds after which a dead run's databases and role on a shared server are dropped by the next run "
        "(default 300; -1: never)",
        parse=_seconds,
    ),
    Option(
        "statement_timeout",
        "longest a statement of a test may run before PostgreSQL stops it (default 5min; 0: none)",
        parse=_duration,
    ),
    Option(
        "lock_timeout",
        "longest a statement of a test may wait for a lock; the failure then names who held it (default 1min)",
        parse=_duration,
    ),
    Option(
        "idle_timeout",
        "idle_in_transaction_session_timeout of the tests' connections (default 1h; 0: none)",
        parse=_duration,
    ),
    Option(
        "guard",
        "what a teardown finding (an escaped commit, a connection left open, an advisory lock or prepared "
        "transaction left behind) becomes: error (default, a test error), warn, or off",
        parse=_choice(*GUARDS),
    ),
    Option(
        "fence",
        "while the session runs, a connection through psycopg, psycopg2, asyncpg (SQLAlchemy, Django) to a server "
        "other than the sandbox's is: error (default, refused with the library's connection error), warn (a "
        "warning, and it goes ahead) or off; the libpq environment (PGHOST...) points at the sandbox unless off",
        parse=_choice(*FENCES),
    ),
    Option(
        "fence_allow",
        "servers the connection fence lets tests reach besides the sandbox: host:port (or a host: any port; a "
        "Unix socket: its directory:port)",
        kind="list",
        parse=_fence_allow,
        env_separator=",",
    ),
    Option(
        "env_url",
        "environment variables (such as DATABASE_URL) set to the test's database URL while a test that has one "
        "runs, and cleared otherwise, like PGDATABASE (with the connection fence: not when pg_fence = off)",
        kind="list",
        parse=_env_name,
        env_separator=",",
    ),
    Option(
        "data_seed",
        "what the values pg.insert makes up are seeded with, besides the test's id (default: nothing; any text "
        "changes every made-up value)",
    ),
    Option(
        "sql_log",
        "the local server's statement log, read for a failed test's SQL and pg_queries: auto (jsonlog on "
        "PostgreSQL 15+, csvlog before; the default), jsonlog, csvlog, or off",
        parse=_choice(*SQL_LOGS),
    ),
    Option("show_sql", "show the SQL every test ran in its report, not only a failed test's", kind="flag", parse=_flag),
    Option(
        "report",
        "the session report: term (the terminal summary, default), json (also pgsandbox-report.json), "
        "json:PATH, or off",
        parse=_report,
    ),
    Option(
        "reset_sequences",
        "in transaction isolation, set back after each test the sequences it moved, so that ids start at the same "
        "value in every test (sequences are not rolled back)",
        kind="flag",
        parse=_flag,
    ),
    Option(
        "async_driver",
        "driver of pg_async_engine/pg_async_session: asyncpg (default) or psycopg",
        parse=_choice(*ASYNC_DRIVERS),
    ),
    Option(
        "django",
        "with pytest-django: auto (every PostgreSQL alias of DATABASES on the sandbox, migrate into the template; "
        "Django's driver: psycopg2 when it is installed and only pgsandbox requires psycopg 3), psycopg or "
        "psycopg2 (the same, with that driver), or off (pytest-django makes its own test databases)",
        parse=_choice("auto", "psycopg", "psycopg2", "off"),
    ),
    Option(
        "session_class",
        "the Session class pg_session is made of, module:Class, such as sqlmodel:Session (default: "
        "SQLAlchemy's sqlalchemy.orm:Session)",
        parse=_class_path,
    ),
    Option(
        "async_session_class",
        "the AsyncSession class pg_async_session is made of, module:Class, such as "
        "sqlmodel.ext.asyncio.session:AsyncSession (default: SQLAlchemy's)",
        parse=_class_path,
    ),
)
BY_NAME = {option.name: option for option in OPTIONS}


@dataclass(frozen=True)
class Settings:
    """Resolved options. Build one directly, with :meth:`from_sources`, or with :meth:`from_env`."""

    server: ServerKind = "auto"
    dsn: str | None = field(default=None, repr=False)  # may hold the server's password: not in a traceback's locals
    credentials_command: str | None = field(default=None, repr=False)  # may hold a token (VAULT_TOKEN=...)
    credentials_timeout: float = 30.0
    bin: Path | None = None
    version: str | None = None
    extensions: tuple[str, ...] = ()
    listen: str | None = "127.0.0.1"  # None or "none": the Unix socket only
    port: int = 0
    server_settings: tuple[tuple[str, str], ...] = ()
    initdb_args: tuple[str, ...] = ()
    cache: Path | None = None
    cache_max_size: int = 10**9
    runtime_dir: Path | None = None
    migrations: tuple[str, ...] = ()
    migrations_inputs: tuple[str, ...] = ()
    seed: tuple[str, ...] = ()
    isolation: Literal["transaction", "database", "schema"] = "transaction"
    rebuild: bool = False
    keep_failed: bool = False
    keep_alive: float = 0.0  # seconds a local server outlives the run with no run attached; 0: it stops with the run
    clone_strategy: Literal["auto", "file_copy", "wal_log"] = "auto"
    recycle_clones: Literal["auto", "off"] = "auto"
    gc_freeze: Literal["auto", "off"] = "auto"
    templates_keep: int = 3
    role: Literal["own", "createdb", "admin"] = "own"
    reap_grace: float = 300.0
    report: str = "term"
    guard: Literal["error", "warn", "off"] = "error"
    fence: Literal["error", "warn", "off"] = "error"
    fence_allow: tuple[str, ...] = ()
    env_url: tuple[str, ...] = ()
    statement_timeout: str = "5min"
    lock_timeout: str = "1min"
    idle_timeout: str = "1h"
    data_seed: str = ""
    sql_log: Literal["auto", "jsonlog", "csvlog", "off"] = "auto"
    show_sql: bool = False
    reset_sequences: bool = False
    async_driver: Literal["asyncpg", "psycopg"] = "asyncpg"
    django: Literal["auto", "psycopg", "psycopg2", "off"] = "auto"
    session_class: str | None = None
    async_session_class: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_sources(
        cls,
        cli: Mapping[str, Raw] | None = None,
        env: Mapping[str, str] | None = None,
        ini: Mapping[str, Raw] | None = None,
    ) -> Settings:
        """Resolve every option from the first source that sets it: CLI, environment, ini, default."""
        cli = cli or {}
        env = os.environ if env is None else env
        ini = ini or {}
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for option in OPTIONS:
            for label, raw in (
                (option.cli, cli.get(option.name)),
                (option.env, _split_env(env.get(option.env), option)),
                (f"ini {option.ini}", ini.get(option.name)),
            ):
                if raw is None or raw is False or (isinstance(raw, str) and raw.strip() == "") or raw == []:
                    continue
                values[option.name] = _parse(option, raw, label)
                sources[option.name] = label
                break
        return cls(**values, sources=sources)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``PGSANDBOX_*`` variables alone: for scripts and other test runners."""
        return cls.from_sources(env=env)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def source_of(self, name: str) -> str:
        """Where an option's value came from, for messages (``--pg-bin``, ``env PGSANDBOX_BIN``...)."""
        return self.sources.get(name, BY_NAME[name].ini)


def _split_env(value: str | None, option: Option) -> Raw:
    if value is None or option.kind != "list":
        return value
    return [item for item in value.split(option.env_separator) if item.strip()]


def _parse(option: Option, raw: Raw | bool, label: str) -> Any:
    if isinstance(raw, bool):
        return raw
    items = [raw] if isinstance(raw, str) else list(raw or ())
    parsed = []
    for item in items:
        try:
            parsed.append(option.parse(item.strip()))
        except ValueError as error:
            raise ConfigError(
                f"{label}: bad value {item.strip()!r}: {error}.",
                f"fix {label}; {option.cli} takes: {option.help}.",
            ) from None
    return tuple(parsed) if option.kind == "list" else parsed[0]
