"""A realistic app: SQLAlchemy 2 models migrated by Alembic (env.py as ``alembic init`` writes it, sync and
async), or created by the ``sqlalchemy:`` migrator; and what the user reads when that goes wrong."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgsandbox.template import MigrationError, load_migrators

pytest.importorskip("sqlalchemy")
pytest.importorskip("alembic")

# pytester's in-process runs forget the modules a run imported, and SQLAlchemy's modules must not be
# imported twice (see conftest.py): import the ones a run would import first, here, once.
import sqlalchemy.dialects.postgresql.asyncpg
import sqlalchemy.dialects.postgresql.psycopg
import sqlalchemy.ext.asyncio  # noqa: F401
from alembic import command
from alembic.config import Config

DB = """
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass
"""

ENUMS = """
import enum


class Status(enum.Enum):
    open = "open"
    shipped = "shipped"
"""

MODELS = """
from datetime import datetime

from sqlalchemy import Enum, ForeignKey, Index, String, func
from sqlalchemy.orm import Mapped, mapped_column, relationship

from {app}.db import Base
from {app}.enums import Status


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(200), unique=True)
    orders: Mapped[list["Order"]] = relationship(back_populates="customer")


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = (Index("ix_orders_customer_status", "customer_id", "status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"))
    status: Mapped[Status] = mapped_column(Enum(Status, name="order_status"), default=Status.open)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), index=True)
    customer: Mapped[Customer] = relationship(back_populates="orders")
"""

REVISION_1 = '''
"""customers

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "customers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("email", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("email"),
    )


def downgrade() -> None:
    op.drop_table("customers")
'''

REVISION_2 = '''
"""orders

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("customer_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.Enum("open", "shipped", name="order_status"), nullable=False),
        sa.Column("created_at", sa.DateTime(), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["customer_id"], ["customers.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_orders_customer_status", "orders", ["customer_id", "status"])
    op.create_index(op.f("ix_orders_created_at"), "orders", ["created_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_orders_created_at"), table_name="orders")
    op.drop_index("ix_orders_customer_status", table_name="orders")
    op.drop_table("orders")
    sa.Enum(name="order_status").drop(op.get_bind())
'''

# What the app's own tests would check: the schema is there, with its enum and indexes.
SCHEMA_TEST = """
def test_schema(pg):
    pg.execute("insert into customers (email) values ('ada@example.com')")
    pg.execute("insert into orders (customer_id, status) select id, 'shipped' from customers")
    assert pg.fetchval("select status::text from orders") == "shipped"
    assert pg.fetchval("select enum_range(null::order_status)::text") == "{open,shipped}"
    indexes = pg.fetch("select indexname from pg_indexes where tablename = 'orders' order by 1")
    assert [row["indexname"] for row in indexes] == ["ix_orders_created_at", "ix_orders_customer_status", "orders_pkey"]
"""

# Alembic's autogenerate comparison: the migrations build exactly what the models describe.
MATCH_TEST = """
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, pool

from {app}.models import Base


def test_migrations_match_the_models(pg):
    engine = create_engine(pg.url(), poolclass=pool.NullPool)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()
"""


def write(root: Path, files: dict[str, str]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(content))


def write_app(pytester: pytest.Pytester, app: str, pg_migrations: str) -> None:
    """The app package (a name per test: in-process runs must not find another test's module) and its tests."""
    write(
        pytester.path,
        {
            "pyproject.toml": f'[tool.pytest.ini_options]\npg_migrations = ["{pg_migrations}"]\n',
            f"{app}/__init__.py": "",
            f"{app}/db.py": DB,
            f"{app}/enums.py": ENUMS,
            f"{app}/models.py": MODELS.format(app=app),
            "test_schema.py": SCHEMA_TEST,
        },
    )


def alembic_init(pytester: pytest.Pytester, app: str, template: str) -> Path:
    """``alembic init -t TEMPLATE migrations``, then the one edit its comments ask for: the models' metadata."""
    command.init(Config(str(pytester.path / "alembic.ini")), str(pytester.path / "migrations"), template=template)
    env = pytester.path / "migrations/env.py"
    source = env.read_text()
    assert source.count("\ntarget_metadata = None\n") == 1, "alembic init's env.py changed: update this test"
    env.write_text(
        source.replace(
            "\ntarget_metadata = None\n", f"\nfrom {app}.models import Base\ntarget_metadata = Base.metadata\n"
        )
    )
    write(pytester.path / "migrations/versions", {"0001_customers.py": REVISION_1, "0002_orders.py": REVISION_2})
    return env


# the env.py `alembic init` writes runs logging.config.fileConfig(alembic.ini) in the test process
CAPLOG_TEST = """
import logging

app_log = logging.getLogger("shop.service")


def test_the_apps_logs_are_still_captured(pg, caplog):
    app_log.info("order placed")
    assert "order placed" in caplog.text
"""


@pytest.mark.slow
def test_alembic_sync_env(pytester: pytest.Pytester, shared_dsn: str) -> None:
    write_app(pytester, "shop_sync", "alembic:alembic.ini")
    alembic_init(pytester, "shop_sync", "generic")
    write(pytester.path, {"test_match.py": MATCH_TEST.format(app="shop_sync"), "test_logs.py": CAPLOG_TEST})

    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "--log-level=INFO")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*(alembic:alembic.ini): cache miss*"])
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "--log-level=INFO")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*(alembic:alembic.ini): cache hit*"])

    revision = pytester.path / "migrations/versions/0002_orders.py"
    revision.write_text(
        revision.read_text().replace(
            '        sa.Column("customer_id"', '        sa.Column("note", sa.Text()),\n        sa.Column("customer_id"'
        )
    )
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "test_match.py")
    result.stdout.fnmatch_lines(["*(alembic:alembic.ini): cache miss*"])
    # the changed revision was applied: orders has a column the models lack
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*remove_column*orders*note*"])


# An async env.py written for an app that runs on asyncpg and reads its URL from its settings.
ASYNCPG_ENV = """
import asyncio
import os

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from {app}.models import Base

config = context.config
target_metadata = Base.metadata
DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql+asyncpg://app@db.invalid/app")


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    # pgsandbox's template when pgsandbox runs the migrations, on the driver the app uses
    url = make_url(config.attributes.get("pgsandbox_url", DATABASE_URL)).set(drivername="postgresql+asyncpg")
    engine = create_async_engine(url, poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(do_run_migrations)
    await engine.dispose()


asyncio.run(run_async_migrations())
"""


@pytest.mark.parametrize("env", ["alembic init -t async", "asyncpg from the app's settings"])
@pytest.mark.slow
def test_alembic_async_env(pytester: pytest.Pytester, shared_dsn: str, env: str) -> None:
    """``alembic init -t async``'s env.py runs unchanged: async_engine_from_config turns pgsandbox's
    ``postgresql+psycopg://`` URL into psycopg's async dialect. An env.py that builds its own engine takes
    ``config.attributes["pgsandbox_url"]`` when it is there, and may swap the driver for asyncpg."""
    app = "shop_async" if env.startswith("alembic") else "shop_asyncpg"
    if app == "shop_asyncpg":
        pytest.importorskip("asyncpg")
    write_app(pytester, app, "alembic:alembic.ini")
    env_py = alembic_init(pytester, app, "async")
    if app == "shop_asyncpg":
        env_py.write_text(textwrap.dedent(ASYNCPG_ENV).format(app=app))
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*(alembic:alembic.ini): cache miss*"])


@pytest.mark.slow
def test_sqlalchemy_migrator(pytester: pytest.Pytester, shared_dsn: str) -> None:
    write_app(pytester, "shop_models", "sqlalchemy:shop_models.models:Base")

    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*(sqlalchemy:shop_models.models:Base): cache miss*"])
    # the second run builds the same DDL (indexes come from a set: sorted for the hash) from the same files
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.stdout.fnmatch_lines(["*(sqlalchemy:shop_models.models:Base): cache hit*"])
    # test modules are not part of the hash
    (pytester.path / "test_more.py").write_text("def test_more(pg):\n    assert pg.fetchval('select 1') == 1\n")
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*cache hit*"])

    # the module defining the models' base, changed in code only: its listeners or mixins could add DDL
    db = pytester.path / "shop_models/db.py"
    db.write_text(db.read_text() + "\n\ndef describe() -> str:\n    return 'shop'\n")
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "test_more.py")
    result.stdout.fnmatch_lines(["*(sqlalchemy:shop_models.models:Base): cache miss*"])

    # a module no mapped class lives in, read by create_all: the DDL in the hash changes
    enums = pytester.path / "shop_models/enums.py"
    enums.write_text(enums.read_text() + '    cancelled = "cancelled"\n')
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "test_more.py")
    result.stdout.fnmatch_lines(["*(sqlalchemy:shop_models.models:Base): cache miss*"])

    models = pytester.path / "shop_models/models.py"
    models.write_text(
        models.read_text().replace("    customer: Mapped", "    note: Mapped[str | None]\n    customer: Mapped")
    )
    (pytester.path / "test_note.py").write_text(
        'def test_note(pg):\n    assert pg.fetchval("select count(*) from orders where note is null") == 0\n'
    )
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "test_note.py")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*cache miss*"])


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A project imported by this process itself: its modules and sys.path entry go away afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    for name in [name for name in sys.modules if name.startswith("shop_errors")]:
        del sys.modules[name]


# An object holding the MetaData, as Flask-SQLAlchemy's db does.
HOLDER = """
from shop_errors.models import Base


class Db:
    metadata = Base.metadata


db = Db()
"""


def load_error(spec: str, root: Path) -> str:
    with pytest.raises(MigrationError) as caught:
        load_migrators([spec], [], root)
    return str(caught.value)


def test_sqlalchemy_migrator_load_errors(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(
        project,
        {
            "shop_errors/__init__.py": "",
            "shop_errors/db.py": DB + "\n\ndef get_session():\n    pass\n",
            "shop_errors/ext.py": HOLDER,
            "shop_errors/enums.py": ENUMS,
            "shop_errors/models.py": MODELS.format(app="shop_errors"),
            "shop_errors/empty.py": DB,
        },
    )
    message = load_error("sqlalchemy:shop_errors.nosuch:Base", project)
    assert "sqlalchemy:shop_errors.nosuch:Base: cannot import shop_errors.nosuch: No module named" in message
    assert "What to do: check the module path; it must be importable from pytest's rootdir" in message

    message = load_error("sqlalchemy:shop_errors.models", project)
    assert "is not of the form sqlalchemy:package.module:metadata" in message
    assert "What to do: write pg_migrations = sqlalchemy:myapp.models:Base" in message

    message = load_error("sqlalchemy:shop_errors.models:Bsae", project)
    assert "shop_errors.models has no attribute Bsae" in message
    assert "What to do: name the MetaData or the declarative base after the colon" in message

    message = load_error("sqlalchemy:shop_errors.db:get_session", project)
    assert "shop_errors.db.get_session is a function, not a MetaData, a declarative base or a registry" in message
    assert "What to do: name the MetaData your tables use (MetaData()) or the declarative base" in message

    # an object holding the MetaData, as Flask-SQLAlchemy's db does
    message = load_error("sqlalchemy:shop_errors.ext:db", project)
    assert "shop_errors.ext.db is a Db, not a MetaData, a declarative base or a registry" in message
    assert "What to do: name its MetaData: sqlalchemy:shop_errors.ext:db.metadata." in message

    message = load_error("sqlalchemy:shop_errors.models:Customer", project)
    assert "shop_errors.models.Customer is a mapped class, not a declarative base" in message
    assert "What to do: name the base class it inherits from" in message

    # a base named where it is defined, when nothing imported the models
    message = load_error("sqlalchemy:shop_errors.empty:Base", project)
    assert "shop_errors.empty.Base has no tables: importing shop_errors.empty defined none" in message
    assert "What to do: name a module that imports every model module" in message

    # these forms are accepted: the MetaData itself (dotted), the registry
    for spec in ("sqlalchemy:shop_errors.ext:db.metadata", "sqlalchemy:shop_errors.models:Base.registry"):
        (migrator,) = load_migrators([spec], [], project)
        assert {"shop_errors/db.py", "shop_errors/models.py"} <= {name for name, _ in migrator.inputs()}

    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    message = load_error("sqlalchemy:shop_errors.models:Base", project)
    assert "pg_migrations has a sqlalchemy: entry, but SQLAlchemy is not installed." in message
    assert "What to do: pip install 'pytest-pgsandbox[sqlalchemy]'" in message


@pytest.mark.slow
def test_sqlalchemy_migrator_create_all_errors(pytester: pytest.Pytester, shared_dsn: str) -> None:
    write_app(pytester, "shop_broken", "sqlalchemy:shop_broken.models:Base")
    models = pytester.path / "shop_broken/models.py"
    source = models.read_text()
    models.write_text("from sqlalchemy.dialects.postgresql import CITEXT\n" + source.replace("String(200)", "CITEXT"))
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*sqlalchemy:shop_broken.models:Base: create_all failed on table customers:",
            "*CREATE TABLE customers (",
            '*PostgreSQL: type "citext" does not exist (SQLSTATE 42704)',
            "*What to do: fix the model, or create what it needs (CREATE EXTENSION, CREATE SCHEMA, ...) in an "
            "earlier pg_migrations step such as sql:DIR*",
        ]
    )

    models.write_text(source.replace('ForeignKey("customers.id"', 'ForeignKey("customer.id"'))
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*sqlalchemy:shop_broken.models:Base: create_all failed: Foreign key associated with column "
            "'orders.customer_id' could not find table 'customer'*",
            "*What to do: check the ForeignKey target (a table name such as 'users.id', not the class name)*",
        ]
    )
