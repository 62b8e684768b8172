"""A lending library's settings, as production has them: the database comes from DATABASE_URL."""

import os
from urllib.parse import unquote, urlsplit

SECRET_KEY = "example-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
ROOT_URLCONF = "library.urls"
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.postgres",
    "catalog",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]


def _database(url: str) -> dict:
    """What dj-database-url does, in a few lines: the production server, with TLS."""
    parts = urlsplit(url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parts.path.lstrip("/"),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
        "OPTIONS": {"sslmode": "require"},
    }


DATABASES = {"default": _database(os.environ.get("DATABASE_URL", "postgresql://library@db.internal:5432/library"))}
# reports read from a replica: at import time a copy of the default's settings
DATABASES["replica"] = {**DATABASES["default"], "OPTIONS": dict(DATABASES["default"]["OPTIONS"])}

# `python manage.py test` on pgsandbox too: its server, the template cache, the session's role
TEST_RUNNER = "pgsandbox.drivers.django.DiscoverRunner"
