"""An env.py that takes its URL from the app's settings and ignores sqlalchemy.url: in a test run it migrates
the database the settings name, not pgsandbox's template (unless pgsandbox refuses the connection)."""

from alembic import context
from settings_app.settings import DATABASE_URL
from sqlalchemy import create_engine, pool

engine = create_engine(DATABASE_URL, poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
