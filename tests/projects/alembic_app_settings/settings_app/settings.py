"""The app's settings, as many apps have them: the database URL from the environment, read at import."""

import os

DATABASE_URL = os.environ["APP_DATABASE_URL"]
