from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from pgsandbox import LocalServer, Settings

pytest_plugins = ["pytester"]
collect_ignore = ["projects"]  # test projects, each run by a test of its own through pytester

# PYTHONDONTWRITEBYTECODE (set in some CI and sandbox environments) also turns off pytest's cache of rewritten
# modules, and pgsandbox's modules are rewritten (a pytest plugin's): each in-process pytester run, which forgets
# the modules it imported, and each pytest process a test starts, parsed and rewrote them all again, about a
# second of CPU per run. The suite and the processes it starts keep their bytecode in a directory of their own
# instead, which leaves the source trees and the virtualenv as they are.
if sys.dont_write_bytecode:
    sys.pycache_prefix = os.path.join(tempfile.gettempdir(), f"pgsandbox-tests-pycache-{os.geteuid()}")
    sys.dont_write_bytecode = False
    os.environ["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

# pytester's in-process runs forget the modules a run imported; SQLAlchemy breaks when imported a second
# time in one process and C extensions (psycopg2, asyncpg) crash, so import them here, once, before any run.
with contextlib.suppress(ImportError):
    import alembic.command  # noqa: F401
    import sqlalchemy
    import sqlalchemy.ext.asyncio  # noqa: F401

    import pgsandbox.drivers.sqlalchemy
with contextlib.suppress(ImportError):
    import pgsandbox.drivers.asyncpg
with contextlib.suppress(ImportError):
    import pgsandbox.drivers.psycopg2  # noqa: F401

# The same forgetting makes every in-process run import pgsandbox's core again (sandbox, templates, isolation,
# data: 40 modules, 50-80 ms of CPU a run): imported here once, they stay across the runs. Every migrator too,
# which a run imports only when a project names it.
for _module in (
    "pgsandbox.sandbox",
    "pgsandbox.sandbox.app_roles",
    "pgsandbox.isolation.changes",
    "pgsandbox.isolation.database",
    "pgsandbox.isolation.schema",
    "pgsandbox.template.schemas",
    "pgsandbox.pytest.django",
    "pgsandbox.template.alembic",
    "pgsandbox.template.django",
    "pgsandbox.template.python",
    "pgsandbox.template.sql",
    "pgsandbox.template.sqlalchemy",
    "pgsandbox.data.factory",
    "pgsandbox.drivers.factoryboy",
    "pgsandbox.drivers.running_test",
):
    with contextlib.suppress(ImportError):
        importlib.import_module(_module)


class _RememberedDistribution:
    """An installed distribution whose entry points, file list and metadata are read once."""

    CACHED = frozenset({"entry_points", "files", "metadata", "name", "version", "requires"})

    def __init__(self, dist: Any) -> None:
        self._dist = dist
        self._read: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        if name not in self.CACHED:
            return getattr(self._dist, name)
        if name not in self._read:
            self._read[name] = getattr(self._dist, name)
        return self._read[name]


def _remember_distributions() -> None:
    """Each pytest start, in-process runs included, reads every installed distribution's entry points (to load
    plugins) and the file list (RECORD) of each one with a pytest plugin (to mark its modules for assertion
    rewriting; Faker's lists 1,500 files): 60-100 ms of CPU a run. What is installed does not change while the
    suite runs, so this process reads each once, for as long as the import path stays the same (a test that puts a
    directory on sys.path sees its distributions)."""
    import importlib.metadata as metadata

    find = metadata.distributions
    found: dict[tuple[str, ...], list[_RememberedDistribution]] = {}

    def distributions(**kwargs: Any) -> Any:
        if kwargs:
            return find(**kwargs)
        key = tuple(sys.path)
        if key not in found:
            found[key] = [_RememberedDistribution(dist) for dist in find()]
        return iter(found[key])

    metadata.distributions = distributions


_remember_distributions()


def _remember_statement_ranges() -> None:
    """A failure's or an interruption's report shows the statement of each traceback entry, for which pytest parses
    the entry's whole source file and walks its syntax tree, once per report: the in-process runs report hundreds
    of tracebacks through the same files (pytest's, pluggy's, pgsandbox's), a few milliseconds each, a few seconds
    of the suite's CPU. This process keeps each file's statement lines instead (a small stand-in node carries them:
    pytest reads nothing else from the tree); the reports stay the same."""
    import ast
    import warnings

    from _pytest._code import code
    from _pytest._code import source as pytest_source

    original = getattr(code, "getstatementrange_ast", None)
    linenos = getattr(pytest_source, "_statement_linenos", None)
    if original is None or linenos is None:  # another pytest: its own way
        return
    known: dict[str, ast.AST] = {}

    def getstatementrange_ast(
        lineno: int, source: pytest_source.Source, assertion: bool = False, astnode: ast.AST | None = None
    ) -> tuple[ast.AST, int, int]:
        if astnode is None:
            content = str(source)
            astnode = known.get(content)
            if astnode is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tree = ast.parse(content, "source", "exec")
                astnode = ast.Module(body=[], type_ignores=[])
                astnode._pytest_statement_linenos = linenos(tree)  # type: ignore[attr-defined]
                if len(known) > 500:
                    known.clear()
                known[content] = astnode
        found: tuple[ast.AST, int, int] = original(lineno, source, assertion, astnode)
        return found

    setattr(code, "getstatementrange_ast", getstatementrange_ast)  # noqa: B010 (not a name pytest exports)


_remember_statement_ranges()

_CACHE: list[str] = []


# Installed pytest plugins that no project of the suite uses, left out of the pytest runs the tests start: each
# new pytest process imports every installed plugin, and these cost 1.5 s or more of CPU at every start (faker's
# data, and factory_boy pulling faker, dominate) in runpytest_subprocess, `python -m pytest` and xdist workers.
# A run that uses one loads it back with `-p NAME`.
UNUSED_PLUGINS = "-p no:pytest-factoryboy -p no:faker -p no:pytest_postgresql -p no:anyio -p no:django"


# pytest-asyncio warns at the start of each run whose project leaves its loop scope unset, as the test projects
# do (most projects do): the warning is theirs, not the suite's
QUIET_ASYNCIO = "-W ignore::pytest.PytestDeprecationWarning:pytest_asyncio.plugin"


def _without_unused_plugins(addopts: str) -> str:
    return addopts if UNUSED_PLUGINS in addopts else f"{addopts} {UNUSED_PLUGINS}".strip()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """One initdb cache for the whole test run (and the pytest runs it starts), away from ~/.cache."""
    if "PGSANDBOX_CACHE" not in os.environ:
        # on tmpfs when there is one: every server start copies a cluster out of the cache, and every template
        # build writes one into it (about 40 MB, 1,300 files), which on disk cost the suite a fifth of its CPU
        # in block I/O and copies
        memory = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        _CACHE.append(tempfile.mkdtemp(prefix="pgsandbox-test-cache-", dir=memory))
        os.environ["PGSANDBOX_CACHE"] = _CACHE[0]
    os.environ["PYTEST_ADDOPTS"] = _without_unused_plugins(os.environ.get("PYTEST_ADDOPTS", ""))
    if getattr(config.option, "maxschedchunk", False) is None:
        # pytest-xdist's load scheduling hands a worker up to a sixth of the tests left at once: near the end one
        # worker still had a queue of slow tests while the others ran out of fast ones and idled (7-11 s). Two at
        # a time, every worker takes the next test when it is free, and the fast tier, last, fills the gaps.
        config.option.maxschedchunk = 1


@pytest.fixture
def pytester(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """pytester, whose runs (in-process and subprocess) leave the unused plugins out as well: pytester itself
    clears PYTEST_ADDOPTS."""
    monkeypatch.setenv("PYTEST_ADDOPTS", f"{UNUSED_PLUGINS} {QUIET_ASYNCIO}")
    return pytester


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker more than the cores. Most tests wait on processes they start (pytest runs, servers,
    a cluster's copy), so two workers on two cores leave a core idle at times: measured on 2 cores, 94-96 s with
    three workers against 108 s with two, and 107 s with four (BENCHMARKS.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores + 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests first, so that no worker of ``-n auto`` is left with one at the end while the others
    idle: the tests that start pytest-xdist runs of their own (several processes each), then the other slow
    tests, then the fast tier, which fills the gaps. Stable: the order within each group stays."""

    def weight(item: pytest.Item) -> int:
        if item.get_closest_marker("slow") is None:
            return 2
        starts_xdist = item.path.name == "test_xdist.py" or "xdist" in getattr(item, "originalname", item.name)
        return 0 if starts_xdist else 1

    items.sort(key=weight)


def pytest_unconfigure(config: pytest.Config) -> None:
    for path in _CACHE:
        shutil.rmtree(path, ignore_errors=True)
    if _CACHE:  # the clusters copied ahead from the suite's cache, which is gone now
        from pgsandbox.server import runs, spares

        for base in runs.search_bases():
            spares.remove_orphans(runs.user_dir(base))


# The fast tier (`pytest -m "not slow"`) is the tests that start no PostgreSQL server and no process. A test
# that does is marked `slow`; these checks fail one that is not, so that the tier stays fast as tests are added.
SERVER_FIXTURES = frozenset({"pytester", "shared", "shared_dsn", "start_local"})
PROCESS_EVENTS = frozenset({"subprocess.Popen", "os.posix_spawn", "os.fork", "os.exec", "os.spawn", "os.system"})
_started_by_a_fast_test: list[str] = []
_fast_test_running = [False]


def _record_processes(event: str, args: tuple[object, ...]) -> None:
    if _fast_test_running[0] and event in PROCESS_EVENTS:
        _started_by_a_fast_test.append(f"{event} {args[:2]!r}")


sys.addaudithook(_record_processes)  # audit hooks see every process start, whichever library makes it


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _started_by_a_fast_test.clear()
    _fast_test_running[0] = item.get_closest_marker("slow") is None
    servers = sorted(SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())))
    if _fast_test_running[0] and servers:
        pytest.fail(f"{item.nodeid} uses {', '.join(servers)} but is not marked slow: add @pytest.mark.slow")


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    try:
        yield
    finally:
        _fast_test_running[0] = False
    if _started_by_a_fast_test:
        started = "; ".join(_started_by_a_fast_test)
        _started_by_a_fast_test.clear()
        pytest.fail(f"{item.nodeid} started a process ({started}) but is not marked slow: add @pytest.mark.slow")


@pytest.fixture
def cache_dir() -> Path:
    return Path(os.environ["PGSANDBOX_CACHE"])


USERS = "create table users (id serial primary key, name text unique not null);\n"
USERS_SEED = "insert into users (name) values ('ada'), ('bob');\n"


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A project with a users table holding two rows (sql:migrations). A module may define its own."""
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n')
    (pytester.path / "migrations").mkdir()
    (pytester.path / "migrations/1.sql").write_text(USERS + USERS_SEED)
    return pytester


@pytest.fixture
def machine_wide_servers() -> Iterator[None]:
    """For tests that keep servers or run `pgsandbox clean`, which stops every kept server of the machine:
    one at a time, also across pytest-xdist workers."""
    from filelock import FileLock

    from pgsandbox.server import runs

    def secrets_dirs() -> set[Path]:
        """Run directories that hold only a run's secrets (an existing server's), not a server's data."""
        found = (runs.user_dir(base) for base in runs.search_bases())
        return {path for parent in found for path in parent.glob("run-*") if not (path / "data").exists()}

    with FileLock(os.path.join(tempfile.gettempdir(), f"pgsandbox-tests-kept-servers-{os.geteuid()}.lock")):
        before = secrets_dirs()
        yield
        # a run that kept databases on an existing server leaves its passfile for `pgsandbox clean` or `reap
        # --include-kept`; an in-process run's owner (this worker) is alive, so nothing else would take it
        for path in secrets_dirs() - before:
            if runs.is_kept(runs.RunDir(path)):
                shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def private_runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A runtime directory of the test's own (short: a socket path has at most 107 bytes): the servers other
    tests start at the same moment (pytest -n) reap leftovers in the default ones, not here."""
    path = Path(tempfile.mkdtemp(prefix="pgsb-"))
    path.chmod(0o755)  # as root, the server's own account goes through it
    monkeypatch.setenv("PGSANDBOX_RUNTIME_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


StartLocal = Callable[..., LocalServer]


@pytest.fixture
def start_local(cache_dir: Path) -> Iterator[StartLocal]:
    """Start local servers with the test cache; every one is stopped at teardown."""
    started: list[LocalServer] = []

    def start(progress: Callable[[str], None] | None = None, **options: object) -> LocalServer:
        server = LocalServer.start(Settings(cache=cache_dir).replace(**options), progress)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


is_root = os.geteuid() == 0


@pytest.fixture(scope="session")
def shared() -> Iterator[LocalServer]:
    """One server for tests that attach to an existing server (``--pg-dsn``): no start-up per pytest run. Runs
    attached by a DSN do not read its statement log, so it writes none (measured: about 15% of its CPU)."""
    server = LocalServer.start(Settings(listen="127.0.0.1", sql_log="off"))
    yield server
    if server.copy_ahead is not None:  # the worker's end: no start follows to take the copy
        server.copy_ahead.abandon()
        server.copy_ahead = None
    server.stop()


@pytest.fixture(scope="session")
def shared_dsn(shared: LocalServer) -> str:
    """The shared server's superuser URL (password included: pgsandbox redacts it in every message)."""
    assert shared.tcp is not None
    return f"postgresql://postgres:{shared.reveal_password()}@127.0.0.1:{shared.tcp[1]}/postgres"
