"""``manage.py test`` on pgsandbox: ``TEST_RUNNER = "pgsandbox.drivers.django.DiscoverRunner"``.

Django's own runner creates a test database and migrates it on every run. This one starts the sandbox (the
local server, or ``PGSANDBOX_DSN``'s), builds the template with ``migrate`` once per hash of the migrations
(``django:``, then whatever ``PGSANDBOX_MIGRATIONS`` adds) and points every PostgreSQL alias at the session's
own database, as the session's role. Options come from the ``PGSANDBOX_*`` variables. Django's test cases
keep their own isolation there (``TestCase``: atomic blocks rolled back; ``TransactionTestCase``: a flush).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from django.test.runner import DiscoverRunner as DjangoDiscoverRunner

from pgsandbox.errors import PgSandboxError
from pgsandbox.sandbox import Sandbox
from pgsandbox.settings import Settings
from pgsandbox.template import load_migrators
from pgsandbox.template.base import Migrator
from pgsandbox.template.django import DjangoMigrator, point_aliases, postgres_aliases


def _say(message: str) -> None:
    print(f"pgsandbox: {message}", file=sys.stderr, flush=True)


class DiscoverRunner(DjangoDiscoverRunner):  # type: ignore[misc]
    """Django's runner with pgsandbox's server, template cache and least-privilege role."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        parallel: int = getattr(self, "parallel", 1)
        if parallel > 1:  # Django would clone its own test database per process
            _say(f"--parallel {parallel} is not supported yet: the tests run in one process.")
            self.parallel = 1

    def setup_databases(self, **kwargs: Any) -> Any:
        from django.conf import settings as django_settings

        options = Settings.from_env()
        root = Path(getattr(django_settings, "BASE_DIR", None) or Path.cwd()).resolve()
        try:
            migrations: list[Migrator] = []
            if not any(spec.startswith("django:") for spec in options.migrations):
                migrations.append(DjangoMigrator("", root))
            migrations += load_migrators(options.migrations, options.migrations_inputs, root)
            sandbox = Sandbox.start(
                options, migrations=migrations, root=root, project=root.name, progress=_say if self.verbosity else None
            )
        except PgSandboxError as error:
            raise SystemExit(f"pgsandbox: {error}") from None
        try:
            restore = point_aliases(sandbox.session_login().params, postgres_aliases())
        except BaseException:
            sandbox.stop()
            raise
        return sandbox, restore

    def teardown_databases(self, old_config: Any, **kwargs: Any) -> None:
        sandbox, restore = old_config
        try:
            restore()
        finally:
            sandbox.stop()
