"""What the session keeps in pytest's stash, and the session's sandbox: started once (after collection, on first
use, or by the xdist controller), handed to the fixtures, stopped at the end. The fixtures import this module,
never the plugin."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pgsandbox.errors import PgSandboxError
from pgsandbox.settings import Settings

if TYPE_CHECKING:
    from pgsandbox.pytest.xdist import SharedSandbox
    from pgsandbox.sandbox import Database, Sandbox
    from pgsandbox.template.base import Migrator

SETTINGS_KEY = pytest.StashKey[Settings]()
SANDBOX_KEY: pytest.StashKey[Sandbox] = pytest.StashKey()
KEPT_KEY = pytest.StashKey[list[str]]()  # psql commands of the kept databases, for the terminal summary
DATABASE_KEY: pytest.StashKey[Database] = pytest.StashKey()
LOG_KEY: pytest.StashKey[Database] = pytest.StashKey()  # the test's database, also after its teardown
KEEP_KEY = pytest.StashKey[bool]()
SQL_SHOWN_KEY = pytest.StashKey[bool]()
NEXT_KEY = pytest.StashKey["pytest.Item | None"]()
EARLY_START_KEY: pytest.StashKey[Sandbox | PgSandboxError] = pytest.StashKey()  # started after collection
CONTROLLER_KEY: pytest.StashKey[SharedSandbox] = pytest.StashKey()
REPORT_KEY = pytest.StashKey[dict[str, Any]]()
WORKER_REPORTS_KEY = pytest.StashKey[list[dict[str, Any]]]()
EXTRA_MIGRATIONS_KEY: pytest.StashKey[list[Migrator]] = pytest.StashKey()  # first in the migrations (django.py)
XDIST_INPUT = "pgsandbox"  # the controller's sandbox, in each worker's workerinput
XDIST_KEPT = "pgsandbox_kept"  # a worker's kept databases, in its workeroutput
XDIST_REPORT = "pgsandbox_report"  # a worker's session report, in its workeroutput


def settings(config: pytest.Config) -> Settings:
    return config.stash[SETTINGS_KEY]


def progress_writer(config: pytest.Config) -> Callable[[str], None] | None:
    """One line per long step (initdb, binary copy, template build), quiet under -q."""
    if config.get_verbosity() < 0:
        return None
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return None

    capture = config.pluginmanager.get_plugin("capturemanager")

    def write(message: str) -> None:
        # the server starts inside a fixture, where output is captured: write past the capture
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.ensure_newline()
            reporter.write_line(f"pgsandbox: {message}")

    return write


def hook_migrators(config: pytest.Config, name: str, inputs: tuple[str, ...]) -> list[Migrator]:
    """A conftest's ``pytest_pgsandbox_migrate``/``_seed`` as a migrator hashed by its source files."""
    from pgsandbox.template.python import Call, CallableMigrator

    hook = getattr(config.hook, name)
    impls = [i for i in hook.get_hookimpls() if not (i.hookwrapper or getattr(i, "wrapper", False))]
    if not impls:
        return []
    sources = sorted({Path(inspect.getfile(impl.function)) for impl in impls})
    # in pluggy's order; each implementation gets what it names (conn, dsn, url, session), async ones too
    calls = [Call.hook(impl.function, impl.argnames) for impl in reversed(impls)]
    return [CallableMigrator(f"hook:{name}", calls, inputs, config.rootpath, sources)]


def start(config: pytest.Config, progress: Callable[[str], None] | None = None) -> Sandbox:
    """Start the sandbox (server, templates), or on an xdist worker attach to the controller's."""
    from pgsandbox.sandbox import Sandbox
    from pgsandbox.template import load_migrators

    options = settings(config)
    shared = getattr(config, "workerinput", {}).get(XDIST_INPUT)
    if shared is not None:  # an xdist worker: the controller starts the server and builds the templates
        from pgsandbox.pytest import xdist

        return xdist.attach(shared, options)
    root = config.rootpath
    migrations = [*config.stash.get(EXTRA_MIGRATIONS_KEY, [])]
    migrations += load_migrators(options.migrations, options.migrations_inputs, root)
    migrations += hook_migrators(config, "pytest_pgsandbox_migrate", options.migrations_inputs)
    seed = load_migrators(options.seed, options.migrations_inputs, root, "pg_seed")
    seed += hook_migrators(config, "pytest_pgsandbox_seed", options.migrations_inputs)
    return Sandbox.start(
        options,
        migrations=migrations,
        seed=seed,
        root=root,
        project=root.name,
        progress=progress or progress_writer(config),
    )


def start_early(session: pytest.Session) -> None:
    """Start the sandbox right after collection; an error waits for the first test that needs the sandbox."""
    config = session.config
    try:
        config.stash[EARLY_START_KEY] = start(config)
    except PgSandboxError as error:
        config.stash[EARLY_START_KEY] = error


def session_sandbox(config: pytest.Config, session: pytest.Session) -> Sandbox:
    """The session's sandbox: the one started after collection, or a new one."""
    early = config.stash.get(EARLY_START_KEY, None)
    try:
        if isinstance(early, PgSandboxError):
            raise early
        sandbox = early or start(config)
    except PgSandboxError as error:
        # once: the session stops after this test, instead of every test reporting the same error
        session.shouldstop = "pgsandbox could not set up the database (see the first error)"
        raise pytest.fail.Exception(f"pgsandbox: {error}", pytrace=False) from None
    config.stash[SANDBOX_KEY] = sandbox
    return sandbox


def stop_sandbox(config: pytest.Config, sandbox: Sandbox) -> None:
    """Stop the session's sandbox, keeping its report and kept databases for the summary (an xdist worker
    hands them to its controller)."""
    commands = [sandbox.kept.psql_command(name) for name in sandbox.kept]
    config.stash[KEPT_KEY] = commands
    config.stash[REPORT_KEY] = sandbox.report()
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:  # the controller reports them (and keeps its server running for kept ones)
        workeroutput[XDIST_REPORT] = config.stash[REPORT_KEY]
        if sandbox.kept:
            workeroutput[XDIST_KEPT] = {"names": sandbox.kept.names, "commands": commands}
    sandbox.stop()


def stop_at_session_end(config: pytest.Config) -> None:
    """At the session's end: a sandbox started after collection whose tests never ran (all skipped, or
    interrupted); on an xdist controller, the sandbox the workers shared (they are all done)."""
    early = config.stash.get(EARLY_START_KEY, None)
    if early is not None and not isinstance(early, PgSandboxError):
        if REPORT_KEY not in config.stash:  # the fixture did not stop it: no test used it
            config.stash[REPORT_KEY] = early.report()
        early.stop()
    shared = config.stash.get(CONTROLLER_KEY, None)
    if shared is not None:
        sandbox = shared.outcome()
        if not isinstance(sandbox, PgSandboxError):
            from pgsandbox.sandbox.report import merge_reports

            workers: list[dict[str, Any]] = config.stash.get(WORKER_REPORTS_KEY, [])
            config.stash[REPORT_KEY] = merge_reports(sandbox.report(), workers)
        shared.stop()


def next_transaction_test(item: pytest.Item, sandbox: Sandbox) -> str | None:
    """The id of the test that runs after ``item``, if it takes a database in transaction isolation."""
    nextitem = item.stash.get(NEXT_KEY, None)
    if nextitem is None or "pg_sandbox" not in getattr(nextitem, "fixturenames", ()):
        return None
    marker = nextitem.get_closest_marker("pg")
    isolation = (marker.kwargs.get("isolation") if marker else None) or sandbox.settings.isolation
    return nextitem.nodeid if isolation == "transaction" else None
