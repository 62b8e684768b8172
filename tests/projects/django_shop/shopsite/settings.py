"""A shop whose ledger lives in a database of its own in production: DATABASE_URL and LEDGER_URL, and a router
that migrates the ledger app on the ``ledger`` alias only."""

import os
from urllib.parse import unquote, urlsplit

SECRET_KEY = "test-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = ["shop", "ledger"]


def _database(url: str) -> dict:
    parts = urlsplit(url)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parts.path.lstrip("/"),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
    }


DATABASES = {
    "default": _database(os.environ.get("DATABASE_URL", "postgresql://shop@db.internal:5432/shop")),
    "ledger": _database(os.environ.get("LEDGER_URL", "postgresql://shop@ledger.internal:5432/ledger")),
}
DATABASE_ROUTERS = ["shopsite.routers.LedgerRouter"]
