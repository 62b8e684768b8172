"""Connection parameters as SQLAlchemy URLs, plain ``postgresql://`` URLs and libpq environment variables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

from pgsandbox.common.redact import Secret

DRIVERS = {
    "psycopg": "postgresql+psycopg",
    "psycopg2": "postgresql+psycopg2",
    "asyncpg": "postgresql+asyncpg",
    "pg8000": "postgresql+pg8000",
    "postgresql": "postgresql",
}


def sqlalchemy_url(params: Mapping[str, Any], driver: str = "psycopg") -> str:
    """``postgresql+DRIVER://user:password@host:port/dbname``; a socket directory goes in ``?host=``."""
    scheme = DRIVERS.get(driver, driver if "+" in driver or driver == "postgresql" else f"postgresql+{driver}")
    user = quote(str(params.get("user") or ""), safe="")
    password = params.get("password")
    auth = user + (":" + quote(str(password), safe="") if password else "")
    host = str(params.get("host") or "")
    port = str(params.get("port") or "")
    query: dict[str, str] = {}
    if host.startswith("/"):
        # a socket directory and its port both go in the query: libpq, SQLAlchemy and asyncpg all read them
        # there, while asyncpg reads an empty host before ":port" as a host name
        query["host"] = host
        if port:
            query["port"] = port
        netloc = f"{auth}@" if auth else ""
    else:
        netloc = (f"{auth}@" if auth else "") + (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
    for key in ("sslmode", "sslrootcert", "sslcert", "sslkey"):
        if params.get(key):
            query["ssl" if driver == "asyncpg" and key == "sslmode" else key] = str(params[key])
    if params.get("options") and driver != "asyncpg":
        # libpq and asyncpg read it from a plain URL's query; SQLAlchemy's asyncpg dialect would hand it to
        # asyncpg.connect() as an argument it does not take
        query["options"] = str(params["options"])
    parts = [urlencode(query)] if query else []
    if params.get("passfile"):
        # its "/" as they are: Alembic's configparser reads "%2F" as an interpolation, while libpq, asyncpg and
        # SQLAlchemy read "?passfile=/path" as it is
        parts.append("passfile=" + quote(str(params["passfile"]), safe="/"))
    dbname = quote(str(params.get("dbname") or ""), safe="")
    return f"{scheme}://{netloc}/{dbname}" + ("?" + "&".join(parts) if parts else "")


LIBPQ_ENV = {
    "host": "PGHOST",
    "port": "PGPORT",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "dbname": "PGDATABASE",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "passfile": "PGPASSFILE",
    "options": "PGOPTIONS",
}


def libpq_env(params: Mapping[str, Any]) -> dict[str, str]:
    return {name: str(params[key]) for key, name in LIBPQ_ENV.items() if params.get(key)}


class ConnectionForms:
    """One database's connection parameters (:attr:`params`, libpq keywords) in the form each client takes:

    - :attr:`dsn`: ``host=... port=... user=... dbname=... passfile=...`` (libpq, psycopg, psycopg2);
    - :attr:`database_url`: ``postgresql://user@host:port/dbname?passfile=...`` (what an app's ``DATABASE_URL``
      holds: libpq, psycopg, psycopg2, asyncpg, ``urlparse``);
    - :meth:`url`: SQLAlchemy's ``postgresql+DRIVER://...?passfile=...`` (``create_engine``, Alembic's
      ``sqlalchemy.url``);
    - :attr:`env`: ``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGDATABASE``, ``PGPASSFILE`` (psql, subprocesses).

    None holds the password: each names the run's passfile (0600), which every one of these clients reads, so
    printing one shows no secret. :meth:`reveal_password` gives it as text, for a client that reads no passfile.
    """

    @property
    def params(self) -> dict[str, Any]:
        raise NotImplementedError

    def reveal_password(self) -> Secret | None:
        """The password as text (``repr()`` shows ``'***'``), for a client that reads no passfile; None when
        the role needs none. Do not print it."""
        raise NotImplementedError

    @property
    def passfile(self) -> str:
        """The run's passfile, which every form names: for an app that takes the password out of a URL's
        user-info (``urlparse(url).password``), set ``PGPASSFILE`` to it (:attr:`env` does)."""
        return str(self.params.get("passfile") or "")

    @property
    def dsn(self) -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(**{key: str(value) for key, value in self.params.items() if value is not None})

    @property
    def database_url(self) -> str:
        """``postgresql://user@host:port/dbname?passfile=...``: libpq's URL, which asyncpg takes too (unlike
        :attr:`dsn`). The same as ``url("postgresql")``."""
        return sqlalchemy_url(self.params, "postgresql")

    def url(self, driver: str = "psycopg") -> str:
        """SQLAlchemy URL (``postgresql+psycopg://...``); ``driver`` may be psycopg2, asyncpg, pg8000, or
        ``postgresql`` for a plain URL (:attr:`database_url`)."""
        return sqlalchemy_url(self.params, driver)

    @property
    def env(self) -> dict[str, str]:
        """libpq environment variables (PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSFILE) for subprocesses."""
        return libpq_env(self.params)
