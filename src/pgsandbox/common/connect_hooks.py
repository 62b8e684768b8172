"""The client libraries' connect entry points, hooked: every connection a process makes through psycopg 3 (sync and
async), psycopg2 or asyncpg (and so SQLAlchemy and Django, which go through them) is first shown to the checks
installed here, as a :class:`Target` resolved the way libpq resolves it (DSN or URL, keyword arguments, ``PG*``
environment variables, defaults). A check refuses a connection by raising.

Two users: the template build's guard (template/guard.py: only the template being built) and the session's fence
(isolation/fence.py: only the sandbox's server). Nothing is imported for the hooks' sake: a library already
imported is patched when the first check is installed, the others once the process imports them (a
``sys.meta_path`` finder runs their module and then patches it), so that a pytest session whose tests never
touch a database does not import psycopg either. SQLAlchemy's ``do_connect`` event is
hooked too (its targets have ``via_sqlalchemy``), for dialects whose library is none of these. Everything is put
back when the last check goes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

DEFAULT_PORT = 5432
DEFAULT_SOCKET_DIR = "/var/run/postgresql"  # libpq's compiled default on Debian and most distributions' builds


@dataclass(frozen=True)
class Endpoint:
    """Where a connection goes: a host name or address and a port, or a Unix socket directory and a port."""

    host: str
    port: int

    @property
    def is_socket(self) -> bool:
        return self.host.startswith(("/", "@"))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.is_socket else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Target:
    """A connection about to be made: where (every host libpq would try, in order), to which database, as whom,
    through which library, and the library's own class for a connection that could not be made. Never a
    password."""

    endpoints: tuple[Endpoint, ...]
    dbname: str
    user: str
    library: str
    connection_error: type[Exception] = ConnectionRefusedError
    via_sqlalchemy: bool = False  # seen in SQLAlchemy's do_connect; the driver's own hook sees it again

    def describe(self) -> str:
        where = ", ".join(str(endpoint) for endpoint in self.endpoints)
        return f"database {self.dbname!r} on {where} as {self.user}"


Check = Callable[[Target], None]


@lru_cache(maxsize=1)
def os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:
        return "(the OS user)"


def _split(value: Any) -> list[str]:
    return [part.strip() for part in str(value).split(",")] if value not in (None, "") else []


def _port(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        return DEFAULT_PORT  # libpq refuses such a port itself; nothing is reached


def resolve(
    params: Mapping[str, Any], library: str = "", env: Mapping[str, str] | None = None, **fields: Any
) -> Target:
    """The target of libpq keyword ``params`` (a parsed DSN or URL plus keyword arguments), filled in as libpq
    does: ``PGHOST``/``PGHOSTADDR``/``PGPORT``/``PGDATABASE``/``PGUSER`` for what they leave out, then the
    defaults (the Unix socket directory, port 5432, the user's name as the database, the OS user). A host list
    gives one endpoint per host (``hostaddr``, when given, is the address libpq connects to)."""
    env = os.environ if env is None else env
    hosts = _split(params.get("host")) or _split(env.get("PGHOST"))
    addresses = _split(params.get("hostaddr")) or _split(env.get("PGHOSTADDR"))
    count = max(len(hosts), len(addresses), 1)
    hosts = [
        (addresses[i] if i < len(addresses) else "") or (hosts[i] if i < len(hosts) else "") or DEFAULT_SOCKET_DIR
        for i in range(count)
    ]
    ports = _split(params.get("port")) or _split(env.get("PGPORT")) or [str(DEFAULT_PORT)]
    if len(ports) == 1:
        ports = ports * len(hosts)
    endpoints = tuple(
        Endpoint(host, _port(ports[i] if i < len(ports) and ports[i] else str(DEFAULT_PORT)))
        for i, host in enumerate(hosts)
    )
    user = str(params.get("user") or env.get("PGUSER") or os_user())
    dbname = str(params.get("dbname") or env.get("PGDATABASE") or user)
    return Target(endpoints, dbname, user, library, **fields)


def conninfo_params(conninfo: str) -> dict[str, Any]:
    """A DSN or URL parsed by libpq (through psycopg); empty when it does not parse (the library then says so)."""
    return dict(_parsed(conninfo or ""))


@lru_cache(maxsize=64)
def _parsed(conninfo: str) -> dict[str, Any]:
    """Cached: an app connects with the same few DSNs again and again, and libpq's parser is most of a check's
    cost (bench/fence.py)."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        return conninfo_to_dict(conninfo)
    except Exception:
        return {}


@dataclass(frozen=True)
class Allowed:
    """An endpoint connections may reach: a host (or socket directory) and a port, or any port of it."""

    host: str
    port: int | None = None

    def __str__(self) -> str:
        return self.host if self.port is None else str(Endpoint(self.host, self.port))

    def matches(self, endpoint: Endpoint) -> bool:
        return (self.port is None or self.port == endpoint.port) and same_host(self.host, endpoint.host)


def parse_allowed(text: str) -> Allowed:
    """``host:port``, ``host`` (any port), ``[::1]:5432``, ``/run/postgresql:5432`` (a socket directory)."""
    text = text.strip()
    if not text:
        raise ValueError("expected host:port, such as 127.0.0.1:5433 or db.internal:5432")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r} is not host:port ([::1]:5432 for an IPv6 address)")
    elif text.count(":") == 1 or (text.startswith("/") and ":" in text):
        host, _, port = text.rpartition(":")
    else:
        host, port = text, ""
    if not host:
        raise ValueError(f"{text!r} names no host: expected host:port, such as 127.0.0.1:5433")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return Allowed(host, int(port) if port else None)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache(maxsize=256)
def _real_directory(path: str) -> str:
    return os.path.realpath(path)


def same_host(a: str, b: str) -> bool:
    """Whether two host names, addresses or socket directories name one machine's server (with the port)."""
    if a == b:
        return True
    a_socket, b_socket = a.startswith("/"), b.startswith("/")
    if a_socket or b_socket:
        return a_socket and b_socket and _real_directory(a) == _real_directory(b)
    if _loopback(a) and _loopback(b):
        return True
    return bool(addresses_of(a) & addresses_of(b))


# -- the checks --------------------------------------------------------------------------------------------
class _Hooks:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.checks: list[Check] = []
        self.undo: list[Callable[[], None]] = []


_hooks = _Hooks()


def install(check: Check) -> Callable[[], None]:
    """Show every connection from now on to ``check`` (the newest check first); returns its removal."""
    with _hooks.lock:
        if not _hooks.checks:
            try:
                _patch_all()
            except BaseException:
                _unpatch_all()
                raise
        _hooks.checks.append(check)

    def remove() -> None:
        with _hooks.lock:
            if check in _hooks.checks:
                _hooks.checks.remove(check)
                if not _hooks.checks:
                    _unpatch_all()

    return remove


def _run_checks(target: Target) -> None:
    for check in reversed(_hooks.checks[:]):
        check(target)


def _checking(make_target: Callable[[], Target]) -> None:
    if _hooks.checks:
        _run_checks(make_target())


# -- patching ----------------------------------------------------------------------------------------------
class _PatchOnImport:
    """Finds a watched library's module with the other finders and patches it once it is executed (a
    ``sys.meta_path`` finder; not an ``importlib.abc`` subclass, whose import a session start would pay)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        patch = _WATCHED.get(name)
        if patch is None:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Patching(spec.loader, patch)
        return spec


class _Patching:
    def __init__(self, loader: Any, patch: Callable[[], None]) -> None:
        self.loader = loader
        self.patch = patch

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        with _hooks.lock:
            if _hooks.checks:
                _patch_library(self.patch)

    def __getattr__(self, name: str) -> Any:  # resource readers and the like
        return getattr(self.loader, name)


def _patch_library(patch: Callable[[], None]) -> None:
    """Patch one library; one that cannot be imported whole (a test that hides it: ``sys.modules[name] = None``)
    makes no connection to check, and must not stop the session."""
    with contextlib.suppress(ImportError):
        patch()


def _patch(owner: Any, attribute: str, replacement: Any) -> None:
    original = owner.__dict__[attribute] if isinstance(owner, type) else getattr(owner, attribute)
    setattr(owner, attribute, replacement)
    _hooks.undo.append(lambda: setattr(owner, attribute, original))


def _unpatch_all() -> None:
    for undo in reversed(_hooks.undo):
        undo()
    _hooks.undo.clear()


def _patch_all() -> None:
    for name, patch in _WATCHED.items():
        if name in sys.modules:
            _patch_library(patch)
    finder = _PatchOnImport()
    sys.meta_path.insert(0, finder)
    _hooks.undo.append(lambda: sys.meta_path.remove(finder))


def _psycopg() -> None:
    psycopg = sys.modules.get("psycopg")
    if psycopg is None or not hasattr(psycopg, "Connection"):
        return

    # BaseConnection's: Connection.connect and AsyncConnection.connect call it once per host they try
    owner = next((c for c in psycopg.Connection.__mro__ if "_connect_gen" in c.__dict__), None)
    if owner is None:
        return
    original = owner.__dict__["_connect_gen"].__func__
    error = psycopg.OperationalError

    def _connect_gen(cls: Any, conninfo: str = "", *args: Any, **kwargs: Any) -> Any:
        _checking(lambda: resolve(conninfo_params(conninfo), "psycopg", connection_error=error))
        return original(cls, conninfo, *args, **kwargs)

    _patch(owner, "_connect_gen", classmethod(_connect_gen))


def _psycopg2() -> None:
    module = sys.modules.get("psycopg2")
    if module is None or not hasattr(module, "_connect"):
        return
    original = module._connect
    error = module.OperationalError

    def _connect(dsn: str, *args: Any, **kwargs: Any) -> Any:
        _checking(lambda: resolve(conninfo_params(dsn), "psycopg2", connection_error=error))
        return original(dsn, *args, **kwargs)

    _patch(module, "_connect", _connect)


def _asyncpg_target(addrs: Any, params: Any) -> Target:
    """asyncpg has resolved its arguments, environment and defaults already: its addresses are (host, port)
    pairs, or the paths of Unix sockets (``<directory>/.s.PGSQL.<port>``)."""
    endpoints = []
    for addr in addrs:
        if isinstance(addr, tuple):
            endpoints.append(Endpoint(str(addr[0]), int(addr[1])))
        else:
            directory, _, name = str(addr).rpartition("/.s.PGSQL.")
            endpoints.append(Endpoint(directory or str(addr), _port(name)))
    return Target(tuple(endpoints), str(params.database), str(params.user), "asyncpg")


def _asyncpg() -> None:
    module = sys.modules.get("asyncpg.connect_utils")
    if module is None or not hasattr(module, "_parse_connect_arguments"):
        return
    original = module._parse_connect_arguments

    def _parse_connect_arguments(**kwargs: Any) -> Any:
        addrs, params, config = original(**kwargs)
        _checking(lambda: _asyncpg_target(addrs, params))
        return addrs, params, config

    _patch(module, "_parse_connect_arguments", _parse_connect_arguments)


def _sqlalchemy() -> None:
    engine_module = sys.modules.get("sqlalchemy.engine")
    if engine_module is None:
        return
    from sqlalchemy import event

    def do_connect(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        params = conninfo_params(cargs[0]) if cargs and isinstance(cargs[0], str) else {}
        if isinstance(cparams.get("dsn"), str):
            params.update(conninfo_params(cparams["dsn"]))
        params.update({k: v for k, v in cparams.items() if k in ("host", "port", "user", "dbname") and v})
        if cparams.get("database"):
            params["dbname"] = cparams["database"]
        library = f"SQLAlchemy ({dialect.name}+{dialect.driver})"
        _checking(lambda: resolve(params, library, via_sqlalchemy=True))
        if dialect.driver == "asyncpg" and isinstance(cparams.get("options"), str):
            # libpq's options (schema isolation's search_path) in a URL an env.py turned into asyncpg's, which
            # SQLAlchemy would pass to asyncpg.connect() as an argument it does not take: asyncpg sends them in
            # the startup packet, as libpq does, as a server setting
            cparams["server_settings"] = {"options": cparams.pop("options"), **(cparams.get("server_settings") or {})}

    event.listen(engine_module.Engine, "do_connect", do_connect)
    _hooks.undo.append(lambda: event.remove(engine_module.Engine, "do_connect", do_connect))


_WATCHED: dict[str, Callable[[], None]] = {
    "psycopg": _psycopg,
    "psycopg2": _psycopg2,
    "asyncpg.connect_utils": _asyncpg,
    "sqlalchemy.engine": _sqlalchemy,
}


@lru_cache(maxsize=256)
def addresses_of(host: str) -> frozenset[str]:
    """The addresses a host name resolves to (cached: asked at most once per name and process)."""
    import socket

    try:
        return frozenset(str(info[4][0]) for info in socket.getaddrinfo(host, None))
    except OSError:
        return frozenset()
