"""Checks the database at import, as some apps' start-up code does."""

from sqlalchemy import text

from app.db import engine

with engine.connect() as conn:
    conn.execute(text("select 1"))
