"""The app's settings: the database comes from DATABASE_URL, whose host and port the app needs on their own."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlparse


@dataclass(frozen=True)
class Settings:
    database_url: str
    db_host: str
    db_port: int
    db_name: str
    db_user: str
    db_password: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        url = environ["DATABASE_URL"]
        parsed = urlparse(url)
        # like pydantic's PostgresDsn (host_required) or a wait-for-port loop: a URL without a host is refused
        if not parsed.hostname or not parsed.port:
            raise ValueError(
                f"DATABASE_URL must name a host and a port, got host={parsed.hostname!r} port={parsed.port!r}"
            )
        return cls(
            database_url=url,
            db_host=parsed.hostname,
            db_port=parsed.port,
            db_name=parsed.path.lstrip("/"),
            db_user=unquote(parsed.username or ""),
            db_password=unquote(parsed.password or ""),
        )
