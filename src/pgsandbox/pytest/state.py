"""What the session keeps in pytest's stash, and the session's sandbox: started once (after collection, on first
use, or by the xdist controller), handed to the fixtures, stopped at the end. The fixtures import this module,
never the plugin."""

from __future__ import annotations

import contextlib
import gc
import inspect
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pgsandbox.common import trace
from pgsandbox.errors import PgSandboxError
from pgsandbox.settings import Settings

if TYPE_CHECKING:
    from pgsandbox.isolation.fence import Fence
    from pgsandbox.pytest.xdist import SharedSandbox
    from pgsandbox.sandbox import Database, Sandbox
    from pgsandbox.server import Server
    from pgsandbox.template.base import Migrator

SETTINGS_KEY = pytest.StashKey[Settings]()
SANDBOX_KEY: pytest.StashKey[Sandbox] = pytest.StashKey()
KEPT_KEY = pytest.StashKey[list[str]]()  # psql commands of the kept databases, for the terminal summary
DATABASE_KEY: pytest.StashKey[Database] = pytest.StashKey()
LOG_KEY: pytest.StashKey[Database] = pytest.StashKey()  # the test's database, also after its teardown
KEEP_KEY = pytest.StashKey[bool]()
ROLE_KEY = pytest.StashKey["Callable[[], None]"]()  # leaves the role the marker's role= gave the test
SQL_SHOWN_KEY = pytest.StashKey[bool]()
NEXT_KEY = pytest.StashKey["pytest.Item | None"]()
EARLY_START_KEY: pytest.StashKey[Sandbox | PgSandboxError] = pytest.StashKey()  # started after collection
BACKGROUND_KEY: pytest.StashKey[BackgroundStart] = pytest.StashKey()  # the server, starting while pytest collects
CONTROLLER_KEY: pytest.StashKey[SharedSandbox] = pytest.StashKey()
REPORT_KEY = pytest.StashKey[dict[str, Any]]()
WORKER_REPORTS_KEY = pytest.StashKey[list[dict[str, Any]]]()
EXTRA_MIGRATIONS_KEY: pytest.StashKey[list[Migrator]] = pytest.StashKey()  # first in the migrations (django.py)
FENCE_KEY: pytest.StashKey[Fence] = pytest.StashKey()  # the session's connection fence (isolation/fence.py)
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


def hook_impls(config: pytest.Config, name: str) -> list[Any]:
    """A hook's implementations in conftests and plugins, not its wrappers."""
    hook = getattr(config.hook, name)
    return [i for i in hook.get_hookimpls() if not (i.hookwrapper or getattr(i, "wrapper", False))]


def has_migrations(config: pytest.Config) -> bool:
    """Whether the session has a migration or seed (options, hooks, Django's), without importing the migrators."""
    options = settings(config)
    if options.migrations or options.seed or EXTRA_MIGRATIONS_KEY in config.stash:
        return True
    return any(hook_impls(config, name) for name in ("pytest_pgsandbox_migrate", "pytest_pgsandbox_seed"))


def hook_migrators(config: pytest.Config, name: str, inputs: tuple[str, ...]) -> list[Migrator]:
    """A conftest's ``pytest_pgsandbox_migrate``/``_seed`` as a migrator hashed by its source files."""
    impls = hook_impls(config, name)
    if not impls:
        return []
    from pgsandbox.template.python import Call, CallableMigrator

    sources = sorted({Path(inspect.getfile(impl.function)) for impl in impls})
    # in pluggy's order; each implementation gets what it names (conn, dsn, url, session), async ones too
    calls = [Call.hook(impl.function, impl.argnames) for impl in reversed(impls)]
    return [CallableMigrator(f"hook:{name}", calls, inputs, config.rootpath, sources)]


def session_migrators(config: pytest.Config) -> tuple[list[Migrator], list[Migrator]]:
    """The session's migrations and seed: the options' and the conftests' hooks."""
    from pgsandbox.template import load_migrators

    options = settings(config)
    root = config.rootpath
    migrations = [*config.stash.get(EXTRA_MIGRATIONS_KEY, [])]  # django: (pytest/django.py) comes first
    migrations += load_migrators(options.migrations, options.migrations_inputs, root)
    migrations += hook_migrators(config, "pytest_pgsandbox_migrate", options.migrations_inputs)
    seed = load_migrators(options.seed, options.migrations_inputs, root, "pg_seed")
    seed += hook_migrators(config, "pytest_pgsandbox_seed", options.migrations_inputs)
    return migrations, seed


def start(
    config: pytest.Config, progress: Callable[[str], None] | None = None, background: BackgroundStart | None = None
) -> Sandbox:
    """Start the sandbox (server, templates), or on an xdist worker attach to the controller's. ``background``:
    the server started while pytest collected, taken instead of starting one."""
    from pgsandbox.sandbox import Sandbox

    options = settings(config)
    shared = getattr(config, "workerinput", {}).get(XDIST_INPUT)
    if shared is not None:  # an xdist worker: the controller starts the server and builds the templates
        from pgsandbox.pytest import xdist

        # schema isolation: each worker migrates a schema of its own
        return xdist.attach(shared, options, session_migrators(config) if options.isolation == "schema" else None)
    root = config.rootpath
    migrations, seed = session_migrators(config)
    progress = progress or progress_writer(config)
    if progress:
        progress(session_line(config))
    sandbox = Sandbox.start(
        options,
        migrations=migrations,
        seed=seed,
        root=root,
        project=root.name,
        progress=progress,
        server_start=None if background is None else lambda snapshots: background.server(snapshots, progress),
    )
    if background is not None and background.seconds is not None:
        sandbox.start_seconds = background.seconds  # the server's own start, not the wait for it
    return sandbox


class BackgroundStart:
    """The session's server, started in a thread from the moment pytest collects a first test that needs it,
    while pytest collects the rest and pgsandbox imports what the tests need; taken after collection, where the
    sandbox starts (:func:`start_early`), which then builds the templates.

    The thread starts the server only: migrations and imports stay in the main thread (CPython 3.11 can fail
    with "SystemError: AST constructor recursion depth mismatch" when two threads parse Python at once; see
    xdist.py), and everything the server's start runs is imported before the thread starts. Its progress lines
    wait for the main thread, which prints them as the sandbox's start did; its error is raised there, so that
    it reads as it did. Whatever it started is stopped at the session's end if no test took it."""

    def __init__(self, options: Settings, snapshots: list[str] | None) -> None:
        self.options = options
        self.snapshots: list[str] = snapshots or []
        self.seconds: float | None = None
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._server: Server | None = None
        self._error: BaseException | None = None
        self._taken = False
        # set once the main thread has imported what connecting to the server needs (psycopg, server/local.py)
        self._imported = threading.Event()
        # set once the snapshot keys are known (``snapshots`` None: the main thread computes them meanwhile,
        # importing the migrators); the keys choose the cluster to copy
        self._keyed = threading.Event()
        if snapshots is not None:
            self._keyed.set()
        self._cancelled = False
        from pgsandbox.isolation import fence
        from pgsandbox.server import launch, wants_external

        self.exempt = fence.exempt  # imported here: the thread imports nothing (see above)
        # a kept-alive server is attached to, not launched: that waits for the imports as a whole
        self._launch = None if wants_external(options) or options.keep_alive else launch
        self._thread = threading.Thread(target=self._run, name="pgsandbox-server-start")
        self._thread.start()

    def keyed(self, snapshots: list[str]) -> None:
        """The snapshot keys, computed by the main thread while this one prepared."""
        self.snapshots = snapshots
        self._keyed.set()

    def cancel(self) -> None:
        """The main thread could not compute the keys: the start after collection meets the error and says it;
        this thread ends without starting anything."""
        self._cancelled = True
        self._keyed.set()
        self._imported.set()
        self._thread.join()

    def imported(self) -> None:
        """The main thread has imported psycopg and the server's modules: the thread may go on to connect."""
        self._imported.set()

    def _run(self) -> None:
        started = time.perf_counter()
        waited = 0.0
        try:
            launched = None
            if self._launch is not None:  # postgres starts (subprocesses: no GIL) while the main thread imports
                prepared = self._launch.prepare(self.options, self._lines.put)
                self._keyed.wait()
                if self._cancelled:
                    return
                launched = self._launch.launch(self.options, prepared, list(self.snapshots), self._lines.put)
            before = time.perf_counter()
            self._keyed.wait()
            self._imported.wait()
            waited = time.perf_counter() - before
            if self._cancelled:
                if launched is not None:
                    launched.discard()
                return
            from pgsandbox.server import start_server  # the package, imported by the main thread already

            with self.exempt():  # from the session's connection fence: the server's address is not known yet
                self._server = start_server(self.options, self._lines.put, self.snapshots, launched=launched)
            self.seconds = time.perf_counter() - started - waited
        except BaseException as error:  # raised again in the main thread, where the start is waited for
            if not self._cancelled:
                self._error = error
        finally:
            self._lines.put(None)

    def _wait(self, progress: Callable[[str], None] | None) -> None:
        """Until the thread is done, printing its progress lines as they come."""
        while (line := self._lines.get()) is not None:
            if progress is not None:
                progress(line)
        self._lines.put(None)  # for a later wait
        self._thread.join()

    def server(self, snapshots: list[str], progress: Callable[[str], None] | None) -> Server:
        """The server, once started, for these snapshot keys; another one when they differ from the keys it was
        started with (a conftest collected later added a migration hook)."""
        from pgsandbox.server import start_server

        self._wait(progress)  # interrupted (Ctrl-C), the server is not taken: the session's end stops it
        self._taken = True
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        assert self._server is not None
        if snapshots == self.snapshots:
            return self._server
        self._server.stop()
        self.seconds = None
        return start_server(self.options, progress, snapshots)

    def discard(self) -> None:
        """At the session's end, or when no collected test needs it: wait for the thread and stop its server."""
        if self._taken:
            return
        self._taken = True
        self._wait(None)
        if self._server is not None:
            self._server.stop()


def may_deselect(config: pytest.Config) -> bool:
    """Whether options may deselect the tests collected (-k, -m, --deselect, --lf, --sw): then a test that
    needs the sandbox, once collected, may not run, and the sandbox waits for the end of the collection."""
    option = config.option
    names = ("keyword", "markexpr", "deselect", "lf", "stepwise", "stepwise_skip")
    return any(getattr(option, name, None) for name in names)


def runs_no_tests(config: pytest.Config) -> bool:
    """A session that collects but runs nothing: --collect-only, --fixtures, --fixtures-per-test. It starts no
    server (and so prints no report)."""
    option = config.option
    return any(getattr(option, name, False) for name in ("collectonly", "showfixtures", "show_fixtures_per_test"))


def hook_names(config: pytest.Config, name: str) -> list[str]:
    """``hook pytest_pgsandbox_migrate (conftest.py)``, when a conftest implements it."""
    files = set()
    for impl in getattr(config.hook, name).get_hookimpls():
        path = Path(inspect.getfile(impl.function))
        files.add(str(path.relative_to(config.rootpath)) if path.is_relative_to(config.rootpath) else path.name)
    return [f"hook {name} ({', '.join(sorted(files))})"] if files else []


def session_line(config: pytest.Config) -> str:
    """What the session's databases are made of, said when the sandbox starts (a session without a database
    test does not say it)."""
    options = settings(config)
    extra = [migrator.label for migrator in config.stash.get(EXTRA_MIGRATIONS_KEY, [])]
    migrations = ", ".join([*extra, *options.migrations, *hook_names(config, "pytest_pgsandbox_migrate")])
    line = f"isolation {options.isolation}; migrations: {migrations or 'none in pg_migrations'}"
    seed = [*options.seed, *hook_names(config, "pytest_pgsandbox_seed")]
    return line + (f"; seed: {', '.join(seed)}" if seed else "")


def start_in_background(session: pytest.Session) -> None:
    """A collected test needs the sandbox: start its server now, in a thread, while pytest collects the rest.
    Not on an xdist worker (it attaches to the controller's), nor when options may deselect the test; and when
    preparing fails, the start after collection says why, as it did."""
    config = session.config
    if (
        BACKGROUND_KEY in config.stash
        or EARLY_START_KEY in config.stash
        or runs_no_tests(config)
        or hasattr(config, "workerinput")
        or may_deselect(config)
    ):
        return
    # everything the thread runs is imported in the main thread (see BackgroundStart): first what starts postgres
    # (no psycopg); the thread prepares (finds the binaries, clears leftovers) while this one imports the
    # migrators when there are some: their snapshot keys choose the cluster to copy
    trace.mark("sandbox: a collected test needs it")
    try:
        import pgsandbox.server.launch
    except Exception:  # the start after collection meets the same error, and says it as it always did
        return
    trace.mark("imported: the server's launch")
    options = settings(config)
    keyed = options.rebuild or not has_migrations(config)
    background = BackgroundStart(options, [] if keyed else None)
    if not keyed:
        try:
            from pgsandbox.template.builds import chain_of, snapshot_keys

            background.keyed(snapshot_keys(chain_of(*session_migrators(config)), options.rebuild))
        except BaseException as error:  # Ctrl-C too: the thread would wait for the keys, and the process for it
            background.cancel()
            if isinstance(error, Exception):  # the start after collection meets it, and says it as it always did
                return
            raise
    config.stash[BACKGROUND_KEY] = background
    try:
        # while postgres starts: what connecting to it needs, then the thread goes on
        import pgsandbox.server.external
        import pgsandbox.server.local
    except Exception:  # the thread meets the same error, raised at the start after collection
        pass
    finally:
        background.imported()
        trace.mark("imported: psycopg and the server")
    import pgsandbox.sandbox  # noqa: F401 - the rest of what a test needs, while the server starts

    trace.mark("imported: the sandbox")


def start_early(session: pytest.Session) -> None:
    """Start the sandbox right after collection; an error waits for the first test that needs the sandbox."""
    config = session.config
    trace.mark("sandbox: starting after collection")
    try:
        config.stash[EARLY_START_KEY] = start(config, background=config.stash.get(BACKGROUND_KEY, None))
    except PgSandboxError as error:
        config.stash[EARLY_START_KEY] = error
    trace.mark("sandbox: started")
    freeze_for_the_collector(settings(config))


def freeze_for_the_collector(options: Settings) -> None:
    """What the run has made by now (pytest, its plugins and the tests collected, psycopg, the sandbox: some
    100,000 objects, most alive until the process ends) leaves the garbage collector's generations: each full
    collection walked them all, pytest's at its end and the interpreter's at its exit included (50-200 ms of a short
    run). Once per process: a process that runs pytest many times (pytester) would otherwise also freeze, each
    time, the garbage its earlier runs left. ``pg_gc_freeze = off`` keeps Python's default."""
    if options.gc_freeze == "auto" and gc.get_freeze_count() == 0:
        gc.freeze()


def discard_background_start(config: pytest.Config) -> None:
    """The server started while pytest collected, when no test took it."""
    background = config.stash.get(BACKGROUND_KEY, None)
    if background is not None:
        background.discard()


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
    trace.mark("sandbox: stopping")
    sandbox.stop()
    trace.mark("sandbox: stopped")


def stop_at_session_end(config: pytest.Config) -> None:
    """At the session's end: a sandbox started after collection whose tests never ran (all skipped, or
    interrupted), or a server started while pytest collected that none took; on an xdist controller, the sandbox
    the workers shared (they are all done)."""
    discard_background_start(config)
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
    return nextitem.nodeid if isolation in ("transaction", "schema") else None


# -- the connection fence (isolation/fence.py) ---------------------------------------------------------------
def install_fence(config: pytest.Config) -> None:
    """From the session's configuration on, so that an app module that connects at import is fenced too; the
    sandbox's server is allowed once it starts (an existing server's DSN at once: it is known)."""
    options = settings(config)
    if options.fence == "off":
        return
    from pgsandbox.isolation import fence

    session_fence = fence.Fence(options.fence, options.fence_allow, options.env_url).install()
    config.stash[FENCE_KEY] = session_fence
    if options.dsn and options.server != "local" and not hasattr(config, "workerinput"):
        fence.allow_server([options.dsn])


def remove_fence(config: pytest.Config) -> None:
    session_fence = config.stash.get(FENCE_KEY, None)
    if session_fence is not None:
        session_fence.remove()
        del config.stash[FENCE_KEY]


def fence_enter_test(item: pytest.Item) -> None:
    """The fence names the running test, with its marker's ``fence`` and ``fence_allow``."""
    session_fence = item.config.stash.get(FENCE_KEY, None)
    if session_fence is None:
        return
    from pgsandbox.pytest.markers import fence_options

    mode, allow = fence_options(item)
    session_fence.enter_test(item.nodeid, mode, allow)


def fence_leave_test(item: pytest.Item) -> None:
    session_fence = item.config.stash.get(FENCE_KEY, None)
    if session_fence is not None:
        session_fence.leave_test()


def fence_env_at_test(config: pytest.Config, db: Database) -> None:
    """While a test has its database, the libpq environment (and ``pg_env_url``'s variables) names it."""
    session_fence = config.stash.get(FENCE_KEY, None)
    if session_fence is not None:
        session_fence.point_env(db.params, db.database_url)


def fence_env_at_session(config: pytest.Config) -> None:
    session_fence = config.stash.get(FENCE_KEY, None)
    if session_fence is not None:
        session_fence.point_env_at_session()
