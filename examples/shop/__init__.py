"""A small bookshop backed by PostgreSQL: the example application whose tests use pgsandbox.

- ``models``: SQLAlchemy 2 models; ``migrations/`` (Alembic, ``alembic.ini``) creates their schema.
- ``service``: placing and cancelling orders, in transactions that lock the stock rows.
- ``reports``: sales figures with asyncpg, and an async SQLAlchemy query.
- ``api``: a FastAPI app over the service (``DATABASE_URL`` names the database).
- ``back_office``: an async FastAPI app (async SQLAlchemy, a session per request) for stock and deliveries.

``tests/`` shows the pgsandbox fixtures at work; ``../pytest.ini`` points pgsandbox at the migrations.
"""
