"""Migrations, as the app runs them at start-up: alembic.ini's sqlalchemy.url is %(DB_URL)s."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

INI = Path(__file__).resolve().parent.parent / "alembic.ini"


def upgrade(url: str) -> None:
    command.upgrade(Config(str(INI), config_args={"DB_URL": url}), "head")
