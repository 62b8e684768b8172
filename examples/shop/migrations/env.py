"""Alembic environment for the bookshop: online and offline (``--sql``) migrations of ``Base.metadata``."""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from shop.models import Base
from sqlalchemy import engine_from_config, pool

config = context.config
running_under_pgsandbox = "pgsandbox_url" in config.attributes

# The alembic.ini logging set-up is for the command line: inside pytest it would replace pytest's handlers.
if config.config_file_name is not None and not running_under_pgsandbox:
    fileConfig(config.config_file_name)

# Production passes the database in DATABASE_URL. pgsandbox sets sqlalchemy.url to its template, and that must
# win: otherwise a DATABASE_URL left in a developer's shell would be migrated by the tests.
if not running_under_pgsandbox and os.environ.get("DATABASE_URL"):
    config.set_main_option("sqlalchemy.url", os.environ["DATABASE_URL"].replace("%", "%%"))

target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = engine_from_config(
        config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
