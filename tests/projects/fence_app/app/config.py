"""The app's settings, as many apps have them: read from the environment, where the shell points at production."""

import os


def database_url() -> str:
    """Read when asked: in a test, the URL pgsandbox sets (pg_env_url = DATABASE_URL)."""
    return os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)


SETTINGS_URL = database_url()  # read once, at import: whatever the shell had
