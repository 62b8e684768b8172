import pytest


@pytest.fixture
def app_conn():
    """The app's engine, made from the settings read at import."""
    from app.db import engine

    with engine.connect() as conn:
        yield conn
