"""Connection parameters as SQLAlchemy URLs and libpq environment variables."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

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
    dbname = quote(str(params.get("dbname") or ""), safe="")
    return f"{scheme}://{netloc}/{dbname}" + ("?" + urlencode(query) if query else "")


LIBPQ_ENV = {
    "host": "PGHOST",
    "port": "PGPORT",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "dbname": "PGDATABASE",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "passfile": "PGPASSFILE",
}


def libpq_env(params: Mapping[str, Any]) -> dict[str, str]:
    return {name: str(params[key]) for key, name in LIBPQ_ENV.items() if params.get(key)}
