"""``django:`` (or ``django:project.settings``): Django's ``migrate`` into the template.

The hash covers every installed app's migration files (the models' source for an app without migrations, whose
tables ``migrate --run-syncdb`` makes from the models), the settings that decide the schema (``INSTALLED_APPS``,
``MIGRATION_MODULES``, ``AUTH_USER_MODEL``, ``DEFAULT_AUTO_FIELD``, the engines) and Django's version. It
runs as the admin, so that a migration that needs a superuser (``CREATE EXTENSION``) works; the tests
connect as the session's role. :func:`point_aliases` is how every PostgreSQL alias of ``DATABASES`` is sent
to one database, for the build and for the tests.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from pgsandbox.errors import ConfigError
from pgsandbox.template.base import MigrationError, Migrator, Target, file_inputs

# libpq's own keys in a project's OPTIONS name its production server (sslmode=require, a service, a passfile):
# pgsandbox's connection parameters replace them
_SERVER_OPTIONS = frozenset(
    (
        "host",
        "hostaddr",
        "port",
        "dbname",
        "user",
        "password",
        "passfile",
        "service",
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslpassword",
        "sslcrl",
        "target_session_attrs",
        "require_auth",
    )
)
# the settings that change what `migrate` makes (the routers' allow_migrate decides which alias gets an app)
_SCHEMA_SETTINGS = ("INSTALLED_APPS", "MIGRATION_MODULES", "AUTH_USER_MODEL", "DEFAULT_AUTO_FIELD", "DATABASE_ROUTERS")


def _django_missing() -> MigrationError:
    return MigrationError(
        "pg_migrations has a django: entry, but Django is not installed.",
        "pip install django (your project's version), or remove the django: entry.",
    )


def setup_django(settings_module: str = "") -> None:
    """``django.setup()`` unless pytest-django (or the caller) did it; ``settings_module`` when given."""
    try:
        import django
        from django.conf import settings
    except ImportError:
        raise _django_missing() from None
    if settings_module:
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", settings_module)
    if not settings.configured and not os.environ.get("DJANGO_SETTINGS_MODULE"):
        raise MigrationError(
            "pg_migrations has a django: entry, but no Django settings module is known.",
            "set DJANGO_SETTINGS_MODULE (or pytest-django's --ds / DJANGO_SETTINGS_MODULE ini key), or name it: "
            "pg_migrations = django:myproject.settings.",
        )
    from django.apps import apps

    if not apps.ready:
        try:
            django.setup()
        except Exception as error:
            raise MigrationError(
                f"django.setup() failed: {type(error).__name__}: {error}",
                "fix the settings module (DJANGO_SETTINGS_MODULE) so that `manage.py check` passes.",
            ) from error


def project_driver() -> str:
    """The driver Django would use in production: psycopg2 when it is installed and psycopg 3 is there only
    because pgsandbox requires it (no other installed distribution requires it unconditionally), else psycopg 3,
    Django's own preference."""
    if importlib.util.find_spec("psycopg2") is None:
        return "psycopg"
    from packaging.requirements import InvalidRequirement, Requirement

    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name in ("pytest-pgsandbox", "psycopg", "psycopg-binary", "psycopg-c", "psycopg-pool"):
            continue
        for line in dist.requires or []:
            try:
                requirement = Requirement(line)
            except InvalidRequirement:
                continue
            conditional = requirement.marker is not None and "extra" in str(requirement.marker)
            if requirement.name.lower() in ("psycopg", "psycopg-binary", "psycopg-c") and not conditional:
                return "psycopg"
    return "psycopg2"


def use_driver(driver: str, source: str) -> None:
    """Make Django's PostgreSQL backend load with ``driver``: it takes psycopg 3 whenever it can import it, and
    pgsandbox brings psycopg 3; for psycopg2, the backend is imported while ``import psycopg`` fails."""
    if driver != "psycopg2":
        return
    if importlib.util.find_spec("psycopg2") is None:
        raise ConfigError(
            f"{source} = psycopg2, but psycopg2 is not installed.",
            "pip install psycopg2-binary (or psycopg2), or set it to psycopg.",
        )
    loaded = sys.modules.get("django.db.backends.postgresql.psycopg_any")
    if loaded is not None:
        if getattr(loaded, "is_psycopg3", False):
            raise ConfigError(
                f"{source} asks for psycopg2, but Django's PostgreSQL backend was already loaded with psycopg 3 "
                "before pgsandbox could choose (something imported it while pytest started).",
                "set it to psycopg, or find what imports django.db.backends.postgresql that early.",
            )
        return
    saved = sys.modules.get("psycopg")
    sys.modules["psycopg"] = None  # type: ignore[assignment]  # None: `import psycopg` raises ImportError
    try:
        importlib.import_module("django.db.backends.postgresql.base")
    finally:
        if saved is None:
            del sys.modules["psycopg"]
        else:
            sys.modules["psycopg"] = saved


def driver_of_django() -> str:
    """The driver Django's PostgreSQL backend loaded with."""
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    return "psycopg" if is_psycopg3 else "psycopg2"


def postgres_aliases() -> list[str]:
    """The aliases of ``DATABASES`` on PostgreSQL (any backend whose vendor is postgresql: PostGIS too)."""
    from django.db import connections

    return [alias for alias in connections if connections[alias].vendor == "postgresql"]


def django_settings(params: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """libpq parameters -> the keys of one ``DATABASES`` entry; ``options``: the entry's own OPTIONS, whose
    libpq server keys give way to ``params`` (the password stays in the passfile)."""
    extra = {k: v for k, v in params.items() if k not in ("host", "port", "dbname", "user", "password")}
    kept = {k: v for k, v in options.items() if k not in _SERVER_OPTIONS}
    return {
        "HOST": params.get("host", ""),
        "PORT": str(params.get("port", "")),
        "NAME": params["dbname"],
        "USER": params.get("user", ""),
        "PASSWORD": "",
        "OPTIONS": {**kept, **extra},
    }


def point_aliases(
    params: Mapping[str, Any],
    aliases: Iterable[str],
    options: Mapping[str, Any] | None = None,
    keep: Collection[str] = (),
) -> Callable[..., None]:
    """Send each alias to the database ``params`` name (its connection closed, unless the alias is in ``keep``:
    the next query connects there); ``options``: more OPTIONS (application_name). Returns what puts the settings
    back (closing the connections but those of the aliases it is given to keep)."""
    from django.db import connections

    aliases = list(aliases)
    saved: list[tuple[dict[str, Any], dict[str, Any]]] = []
    seen: set[int] = set()
    for alias in aliases:
        connection = connections[alias]
        if alias not in keep:
            connection.close()
        entry = connection.settings_dict
        if id(entry) in seen:  # an alias that is the same dict as another (DATABASES["b"] = DATABASES["a"])
            continue
        seen.add(id(entry))
        saved.append((entry, {key: entry.get(key) for key in ("HOST", "PORT", "NAME", "USER", "PASSWORD", "OPTIONS")}))
        entry.update(django_settings(params, entry.get("OPTIONS") or {}))
        entry["OPTIONS"].update(options or {})
        test = entry.setdefault("TEST", {})
        test["NAME"] = entry["NAME"]

    def restore(keep: Collection[str] = ()) -> None:
        for alias in aliases:
            if alias not in keep:
                connections[alias].close()
        for entry, values in saved:
            entry.update(values)

    return restore


class DjangoMigrator(Migrator):
    runs_app_code = True  # RunPython and the post_migrate handlers may connect anywhere

    def __init__(self, settings_module: str, root: Path, use_migrations: bool = True) -> None:
        self.settings_module = settings_module
        self.root = root
        self.use_migrations = use_migrations
        self.label = f"django:{settings_module}" if settings_module else "django:"
        if not use_migrations:
            self.label += " (--nomigrations)"

    def _files(self) -> list[Path]:
        """Each installed app's migration files, or its models' source when it has none (or they are off)."""
        setup_django(self.settings_module)
        from django.apps import apps
        from django.db.migrations.loader import MigrationLoader

        files: set[Path] = set()
        for app in apps.get_app_configs():
            package = None
            if self.use_migrations:
                module_name, _ = MigrationLoader.migrations_module(app.label)
                if module_name is not None:
                    try:
                        package = importlib.import_module(module_name)
                    except ImportError:
                        package = None
            directories = [Path(p) for p in getattr(package, "__path__", [])]
            if directories:
                for directory in directories:
                    files.update(p for p in directory.rglob("*.py") if "__pycache__" not in p.parts)
            elif app.models_module is not None and getattr(app.models_module, "__file__", None):
                files.add(Path(app.models_module.__file__))
        return sorted(files | router_files())

    def input_paths(self) -> list[Path]:
        return self._files()

    def inputs(self) -> Iterable[tuple[str, bytes]]:
        files = self._files()
        import django
        from django.conf import settings

        schema = {name: schema_value(getattr(settings, name, None)) for name in _SCHEMA_SETTINGS}
        schema["ENGINES"] = sorted({str(entry.get("ENGINE")) for entry in settings.DATABASES.values()})
        pairs = [("django", django.get_version().encode()), ("settings", json.dumps(schema, sort_keys=True).encode())]
        # by the names the hash sees (relative to the rootdir): the project's place on disk must not reorder them
        return pairs + sorted(file_inputs(files, self.root))

    def migrate(self, target: Target) -> None:
        setup_django(self.settings_module)
        from django.conf import settings
        from django.core.management import call_command
        from django.db import DEFAULT_DB_ALIAS

        aliases = postgres_aliases()
        if DEFAULT_DB_ALIAS not in aliases:
            raise MigrationError(
                f"{self.label}: DATABASES['default'] is not a PostgreSQL database "
                f"({settings.DATABASES.get(DEFAULT_DB_ALIAS, {}).get('ENGINE')}).",
                "use django.db.backends.postgresql for the default database, or remove the django: entry.",
            )
        restore = point_aliases(conninfo_to_dict(target.dsn), aliases)
        saved_modules = settings.MIGRATION_MODULES
        if not self.use_migrations:
            settings.MIGRATION_MODULES = _NoMigrations()
        output = io.StringIO()
        unroute = migrate_for_every_alias(aliases)
        try:
            call_command(
                "migrate", database=DEFAULT_DB_ALIAS, interactive=False, run_syncdb=True, verbosity=1, stdout=output
            )
        except Exception as error:
            # migrate says "  Applying app.0002_x..." and then "OK" on the same line once it is done
            applying = [line.strip() for line in output.getvalue().splitlines() if "Applying " in line]
            failed = applying[-1] if applying and not applying[-1].endswith("OK") else ""
            where = f" in {failed.removeprefix('Applying ').removesuffix('...')}" if failed else ""
            raise MigrationError(
                f"{self.label}: `manage.py migrate` failed{where}: {type(error).__name__}: {error}".rstrip(),
                f"fix {'that migration' if where else 'the failing migration'} and run again (`manage.py migrate` "
                "on an empty database shows the same); the template was not kept.",
            ) from error
        finally:
            unroute()
            settings.MIGRATION_MODULES = saved_modules
            restore()

    def unchanged(self, target: Target) -> None:
        raise MigrationError(
            f"{self.label}: `manage.py migrate` finished, but the template {target.dbname} is unchanged (not even "
            "a django_migrations table): the migrations ran somewhere else.",
            "check for code that connects by itself (a database router, a custom backend) during migrate.",
        )


def migrate_for_every_alias(aliases: list[str]) -> Callable[[], None]:
    """Every PostgreSQL alias points at the test's one database, so the template holds what ``migrate`` makes
    for each of them: while it runs on ``default``, an app (a model, a RunPython) is migrated when the routers'
    ``allow_migrate`` lets any of the aliases have it. (One ``migrate --database`` per alias would not do: the
    first records every migration as applied, also those it skipped, and the next ones would skip them.)
    Returns what puts the router back."""
    from django.db import router

    routed = router.allow_migrate
    own = vars(router).get("allow_migrate")  # set on the instance already (by a test, say): put back as it was

    def allow_migrate(db: str, app_label: str, **hints: Any) -> bool:
        return any(routed(alias, app_label, **hints) for alias in aliases)

    router.allow_migrate = allow_migrate

    def unroute() -> None:
        if own is None:
            del router.allow_migrate  # the class's method again
        else:
            router.allow_migrate = own

    return unroute


def router_files() -> set[Path]:
    """The source of each class of ``DATABASE_ROUTERS``: what ``allow_migrate`` says decides the template."""
    from django.conf import settings

    files: set[Path] = set()
    for entry in getattr(settings, "DATABASE_ROUTERS", None) or []:
        module_name = entry.rpartition(".")[0] if isinstance(entry, str) else type(entry).__module__
        try:
            module = sys.modules.get(module_name) or (importlib.util.find_spec(module_name) if module_name else None)
        except (ImportError, ValueError):
            module = None  # Django says so itself when it loads the routers
        origin = getattr(module, "__file__", None) or getattr(module, "origin", None)
        if origin and Path(origin).is_file():
            files.add(Path(origin))
    return files


class _NoMigrations:
    """``MIGRATION_MODULES`` with every app's migrations off (``--nomigrations``): tables from the models."""

    def __contains__(self, item: str) -> bool:
        return True

    def __getitem__(self, item: str) -> None:
        return None


def schema_value(value: Any) -> Any:
    """A setting as JSON can hold it: lists, dicts and text."""
    if isinstance(value, Mapping):
        return {str(k): schema_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [schema_value(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return f"<{type(value).__qualname__}>"  # not its repr(): an address would change the hash on every run
