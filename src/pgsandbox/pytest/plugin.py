"""pytest glue: options, ini keys, the ``pg`` marker, hooks, progress lines and reports.
Fixtures live in fixtures.py; everything else is in the core, which works without pytest."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pgsandbox.common.redact import redact
from pgsandbox.errors import ConfigError, PgSandboxError, PgSandboxWarning, causes, sqlstate
from pgsandbox.settings import OPTIONS, Settings

if TYPE_CHECKING:
    from pgsandbox.pytest.xdist import SharedSandbox
    from pgsandbox.sandbox import Database, Sandbox
    from pgsandbox.server.statements import Statement
    from pgsandbox.template.base import Migrator

pytest_plugins = ["pgsandbox.pytest.fixtures"]

__all__ = ["DATABASE_KEY", "KEEP_KEY", "SETTINGS_KEY", "PgSandboxWarning"]

SETTINGS_KEY = pytest.StashKey[Settings]()
SANDBOX_KEY: pytest.StashKey[Sandbox] = pytest.StashKey()
KEPT_KEY = pytest.StashKey[list[str]]()
DATABASE_KEY: pytest.StashKey[Database] = pytest.StashKey()
LOG_KEY: pytest.StashKey[Database] = pytest.StashKey()  # the test's database, also after its teardown
KEEP_KEY = pytest.StashKey[bool]()
SQL_SHOWN_KEY = pytest.StashKey[bool]()
NEXT_KEY = pytest.StashKey["pytest.Item | None"]()
EARLY_KEY: pytest.StashKey[Sandbox | PgSandboxError] = pytest.StashKey()
CONTROLLER_KEY: pytest.StashKey[SharedSandbox] = pytest.StashKey()
XDIST_INPUT = "pgsandbox"  # the controller's sandbox, in each worker's workerinput
XDIST_OUTPUT = "pgsandbox_kept"  # a worker's kept databases, in its workeroutput
XDIST_REPORT = "pgsandbox_report"  # a worker's session report, in its workeroutput
REPORT_KEY = pytest.StashKey[dict[str, Any]]()
WORKER_REPORTS_KEY = pytest.StashKey[list[dict[str, Any]]]()


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pgsandbox.pytest import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pgsandbox", "pgsandbox: a PostgreSQL database for every test")
    for option in OPTIONS:
        env = f" [env {option.env}, ini {option.ini}]"
        if option.kind == "list":
            group.addoption(
                option.cli,
                action="append",
                dest=f"pg_{option.name}",
                default=None,
                metavar="VALUE",
                help=option.help + " (repeatable)" + env,
            )
            parser.addini(option.ini, option.help, type="linelist", default=[])
        elif option.kind == "flag":
            group.addoption(
                option.cli, action="store_true", dest=f"pg_{option.name}", default=None, help=option.help + env
            )
            parser.addini(option.ini, option.help, default="")
        else:
            group.addoption(option.cli, dest=f"pg_{option.name}", default=None, help=option.help + env)
            parser.addini(option.ini, option.help, default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pg(isolation=..., keep_failed=..., async_driver=..., guard=..., session_class=..., "
        "async_session_class=...): per-test pgsandbox options, for a test, "
        "class or module "
        "(they take precedence over the command line)",
    )
    try:
        config.stash[SETTINGS_KEY] = Settings.from_sources(
            cli={o.name: config.getoption(f"pg_{o.name}") for o in OPTIONS},
            env=os.environ,
            ini={o.name: config.getini(o.ini) for o in OPTIONS},
        )
        from pgsandbox.pytest.checks import check_startup, unmatched_inputs

        worker = hasattr(config, "workerinput")  # an xdist worker: its controller checked and warned already
        if not worker:
            check_startup(config.stash[SETTINGS_KEY], config.invocation_params.dir)
    except ConfigError as error:
        raise pytest.UsageError(f"pgsandbox: {error}") from None
    for pattern in [] if worker else unmatched_inputs(config.stash[SETTINGS_KEY], config.rootpath):
        warning = PgSandboxWarning(
            f"pg_migrations_inputs: {pattern!r} matches no file under {config.rootpath}, so no file of it is in "
            "the template's hash. Fix the glob (relative to the rootdir) if it is meant to match something."
        )
        try:
            config.issue_config_time_warning(warning, stacklevel=2)
        except PgSandboxWarning:  # -W error: a usage error, not pytest's INTERNALERROR
            raise pytest.UsageError(f"pgsandbox: {warning}") from None
    chars = config.option.reportchars or ""
    if config.stash[SETTINGS_KEY].show_sql and not {"P", "A"} & set(chars):
        config.option.reportchars = chars + "P"  # a passed test's report sections are shown with -rP


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


# -- the session's sandbox ---------------------------------------------------------------------------------
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


def hook_names(config: pytest.Config, name: str) -> list[str]:
    """``hook pytest_pgsandbox_migrate (conftest.py)`` for the header, when a conftest implements it."""
    files = set()
    for impl in getattr(config.hook, name).get_hookimpls():
        path = Path(inspect.getfile(impl.function))
        files.add(str(path.relative_to(config.rootpath)) if path.is_relative_to(config.rootpath) else path.name)
    return [f"hook {name} ({', '.join(sorted(files))})"] if files else []


def _start(config: pytest.Config, progress: Callable[[str], None] | None = None) -> Sandbox:
    from pgsandbox.sandbox import Sandbox
    from pgsandbox.template import load_migrators

    options = settings(config)
    shared = getattr(config, "workerinput", {}).get(XDIST_INPUT)
    if shared is not None:  # an xdist worker: the controller starts the server and builds the templates
        from pgsandbox.pytest import xdist

        return xdist.attach(shared, options)
    root = config.rootpath
    migrations = load_migrators(options.migrations, options.migrations_inputs, root)
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


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the sandbox right after collection when a collected test needs it, so that its lines (server,
    templates: hit or miss, build time) come with the session's header, before the first test."""
    config = session.config
    if config.option.collectonly or not any("pg_sandbox" in getattr(i, "fixturenames", ()) for i in session.items):
        return
    try:
        config.stash[EARLY_KEY] = _start(config)
    except PgSandboxError as error:
        config.stash[EARLY_KEY] = error  # reported by the first test that needs the sandbox


def start_sandbox(config: pytest.Config, session: pytest.Session) -> Sandbox:
    """The session's sandbox: the one started after collection, or a new one."""
    early = config.stash.get(EARLY_KEY, None)
    try:
        if isinstance(early, PgSandboxError):
            raise early
        sandbox = early or _start(config)
    except PgSandboxError as error:
        # once: the session stops after this test, instead of every test reporting the same error
        session.shouldstop = "pgsandbox could not set up the database (see the first error)"
        raise pytest.fail.Exception(f"pgsandbox: {error}", pytrace=False) from None
    config.stash[SANDBOX_KEY] = sandbox
    return sandbox


def stop_sandbox(config: pytest.Config, sandbox: Sandbox) -> None:
    commands = [sandbox.kept.psql_command(name) for name in sandbox.kept]
    config.stash[KEPT_KEY] = commands
    config.stash[REPORT_KEY] = sandbox.report()
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:  # the controller reports them (and keeps its server running for kept ones)
        workeroutput[XDIST_REPORT] = config.stash[REPORT_KEY]
        if sandbox.kept:
            workeroutput[XDIST_OUTPUT] = {"names": sandbox.kept.names, "commands": commands}
    sandbox.stop()


@pytest.hookimpl(trylast=True)  # after pytest's own session teardown, where the fixture stops it normally
def pytest_sessionfinish(session: pytest.Session) -> None:
    """A sandbox started after collection whose tests never ran (all skipped, or interrupted); on an xdist
    controller, the sandbox the workers shared (they are all done)."""
    config = session.config
    early = config.stash.get(EARLY_KEY, None)
    if early is not None and not isinstance(early, PgSandboxError):
        if REPORT_KEY not in config.stash:  # the fixture did not stop it: no test used it
            config.stash[REPORT_KEY] = early.report()
        early.stop()
    shared = config.stash.get(CONTROLLER_KEY, None)
    if shared is not None:
        sandbox = shared.wait()
        if not isinstance(sandbox, PgSandboxError):
            from pgsandbox.sandbox.report import merge_reports

            workers: list[dict[str, Any]] = config.stash.get(WORKER_REPORTS_KEY, [])
            config.stash[REPORT_KEY] = merge_reports(sandbox.report(), workers)
        shared.stop()


# -- pytest-xdist: one server and one template build for all workers ------------------------------------------
@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """On the xdist controller, as it sets up a worker: start the sandbox once (server, templates), and tell
    each worker where to find it; each creates its own role and databases on it."""
    from pgsandbox.pytest.xdist import SharedSandbox

    config = node.config
    if config.option.collectonly:
        return  # --collect-only: the workers run nothing that needs a database
    shared = config.stash.get(CONTROLLER_KEY, None)
    if shared is None:
        shared = SharedSandbox(lambda say: _start(config, say))
        config.stash[CONTROLLER_KEY] = shared
    node.workerinput[XDIST_INPUT] = shared.worker_input


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """The first worker has collected: print the sandbox's start-up lines once, after xdist's own."""
    config = node.config
    shared = config.stash.get(CONTROLLER_KEY, None)
    if shared is None or config.stash.get(SANDBOX_KEY, None) is not None:
        return
    result = shared.wait()
    if not isinstance(result, PgSandboxError):
        config.stash[SANDBOX_KEY] = result
    write = progress_writer(config)
    if write is not None:
        for line in shared.lines:
            write(line)
    shared.lines.clear()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """A worker is done: what it did goes into the session report; the databases it kept for failed tests
    are listed, and keep the server running."""
    report = getattr(node, "workeroutput", {}).get(XDIST_REPORT)
    if report is not None:
        node.config.stash[WORKER_REPORTS_KEY] = [*node.config.stash.get(WORKER_REPORTS_KEY, []), report]
    kept = getattr(node, "workeroutput", {}).get(XDIST_OUTPUT)
    shared = node.config.stash.get(CONTROLLER_KEY, None)
    if not kept or shared is None:
        return
    sandbox = shared.wait()
    if isinstance(sandbox, PgSandboxError):
        return
    sandbox.kept.adopt(kept["names"])
    node.config.stash[KEPT_KEY] = [*node.config.stash.get(KEPT_KEY, []), *kept["commands"]]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    item.stash[NEXT_KEY] = nextitem  # lets a test's teardown open the next test's transaction


def next_transaction_test(item: pytest.Item, sandbox: Sandbox) -> str | None:
    """The id of the test that runs after ``item``, if it takes a database in transaction isolation."""
    nextitem = item.stash.get(NEXT_KEY, None)
    if nextitem is None or "pg_sandbox" not in getattr(nextitem, "fixturenames", ()):
        return None
    marker = nextitem.get_closest_marker("pg")
    isolation = (marker.kwargs.get("isolation") if marker else None) or sandbox.settings.isolation
    return nextitem.nodeid if isolation == "transaction" else None


def redact_report(report: pytest.TestReport) -> None:
    """The second line of defence (the first: no DSN, URL or parameter pgsandbox hands out holds a password):
    a known secret that reached a report anyway, through a library's frame (asyncpg reads a passfile into its
    connection parameters) or the test's own print, is masked before the terminal, junitxml or any other
    plugin sees it."""
    report.sections = [(title, redact(content)) for title, content in report.sections]
    if isinstance(report.longrepr, str):
        report.longrepr = redact(report.longrepr)
    elif report.longrepr is not None and not isinstance(report.longrepr, tuple):
        _redact_repr(report.longrepr, 0)


def _redact_repr(node: Any, depth: int) -> Any:
    """Mask secrets in the strings of pytest's failure representation (entries, locals, arguments, messages)."""
    if isinstance(node, str):
        return redact(node)
    if isinstance(node, list):
        node[:] = [_redact_repr(item, depth + 1) for item in node]
        return node
    if isinstance(node, tuple):
        return tuple(_redact_repr(item, depth + 1) for item in node)
    if depth < 12 and type(node).__module__.startswith("_pytest.") and hasattr(node, "__dict__"):
        for name, value in list(vars(node).items()):
            object.__setattr__(node, name, _redact_repr(value, depth + 1))
    return node


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    redact_report(report)
    sandbox = item.config.stash.get(SANDBOX_KEY, None)
    db = item.stash.get(LOG_KEY, None)
    if db is None or sandbox is None or sandbox.stopped:  # the last test's teardown comes after the session's
        return report
    if sandbox.gone is not None:  # no log to read; the first test that met it says so in full
        return report
    show_sql = settings(item.config).show_sql and report.when == "call"
    found: list[Statement] | None = None
    shown = item.stash.get(SQL_SHOWN_KEY, False)  # a teardown error after a failure: the SQL is there already
    if (report.failed and not shown) or show_sql:
        item.stash[SQL_SHOWN_KEY] = True
        import psycopg

        from pgsandbox.server.statements import StatementLogError

        try:
            found, _, complete = sandbox.diagnostics.sql_of(db)
        except StatementLogError as unavailable:
            if show_sql or sandbox.server.statement_log is not None:  # a log that should have answered: say why
                report.sections.append(("pgsandbox: SQL", f"pgsandbox: {unavailable}"))
        except psycopg.Error as unreadable:
            from pgsandbox.sandbox.gone import connection_lost

            if not connection_lost(unreadable):  # else the server is gone: the teardown says so, in full
                report.sections.append(("pgsandbox: SQL", f"pgsandbox could not read the statement log: {unreadable}"))
        if found is not None:
            report.sections.append((f"pgsandbox: SQL of {report.when}", sql_section(found, complete)))
    if report.failed and db._rows is not None and db._rows.made:
        report.sections.append(
            (
                "pgsandbox: data",
                f"pg.insert made {db._rows.made} row(s) of this test from the seed {db.seed!r}: the same seed makes "
                "the same values on every run (pg_data_seed, set or not, is part of it).",
            )
        )
    if report.when != "call" or not report.failed or item.stash.get(DATABASE_KEY, None) is None:
        return report
    from pgsandbox.pytest.fixtures import marker_options

    error = call.excinfo.value if call.excinfo else None
    deadlock = deadlock_of(error)
    if deadlock is not None:
        # the server's log has each process's statement, which the client's error leaves out
        logged = next((s.detail for s in found or () if s.error.startswith("ERROR 40P01")), None)
        report.sections.append(("pgsandbox: deadlock", sandbox.diagnostics.describe_deadlock(logged or deadlock)))
    stopped = timeout_of(error)
    if stopped:
        from pgsandbox.server.statements import lock_waits

        waits = lock_waits(found or [])
        holders = sandbox.diagnostics.lock_holders(db.name)
        report.sections.append(
            (
                f"pgsandbox: {stopped}",
                ("".join(f"{wait}\n" for wait in waits) + "\n" if waits else "")
                + "sessions in a transaction on the test's database when it failed, with the locks they held (the "
                "session whose statement was stopped may be among them):\n"
                + ("\n".join(f"    {holder}" for holder in holders) or "    none left")
                + "\n(pg_lock_timeout, pg_statement_timeout: how long a statement may wait or run)",
            )
        )
    keep = marker_options(item).get("keep_failed", settings(item.config).keep_failed)
    if keep:
        item.stash[KEEP_KEY] = True
        db.keep = True  # driver fixtures commit instead of rolling back, for the kept database
        name = db.name if db.isolation == "database" else sandbox.kept.next_name()
        report.sections.append(
            (
                "pgsandbox: kept database",
                f"the database of this test is kept as {name}; open it with:\n"
                f"    {sandbox.kept.psql_command(name)}\n"
                "(the password is in that passfile, readable only by you, which goes with the kept database: "
                "`pgsandbox clean` stops a kept local server and removes both; on an existing server, "
                "`pgsandbox reap --include-kept` drops the database and removes the file)",
            )
        )
    return report


def sql_section(found: list[Statement], complete: bool) -> str:
    from pgsandbox.server import statements

    return (
        statements.report(found, complete=complete)
        + "\n(from the server's statement log: parameters as the server saw them, known secrets masked)"
    )


TIMEOUTS = {"55P03": "a statement waited too long for a lock", "57014": "a statement was stopped (a timeout)"}


def deadlock_of(error: BaseException | None) -> str | None:
    """PostgreSQL's detail of a deadlock (both processes, what each waited for, their statements), if ``error``
    is one. psycopg and psycopg2 carry it in ``diag``, asyncpg in ``detail``."""
    for cause in causes(error):
        if sqlstate(cause) == "40P01":
            diag = getattr(cause, "diag", None)
            return str(getattr(diag, "message_detail", None) or getattr(cause, "detail", None) or "")
    return None


def timeout_of(error: BaseException | None) -> str | None:
    """What stopped a statement, if ``error`` (or what it wraps: SQLAlchemy's ``orig``, a cause) is a lock or
    statement timeout, by SQLSTATE (psycopg, psycopg2 and asyncpg all carry it)."""
    for cause in causes(error):
        state = sqlstate(cause)
        if state in TIMEOUTS:
            return TIMEOUTS[state]
    return None


def pytest_report_header(config: pytest.Config) -> list[str]:
    options = settings(config)
    migrations = ", ".join([*options.migrations, *hook_names(config, "pytest_pgsandbox_migrate")])
    line = f"pgsandbox: isolation {options.isolation}; migrations: {migrations or 'none in pg_migrations'}"
    seed = [*options.seed, *hook_names(config, "pytest_pgsandbox_seed")]
    if seed:
        line += f"; seed: {', '.join(seed)}"
    return [line]


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    report = config.stash.get(REPORT_KEY, None)
    if report is not None and not hasattr(config, "workerinput"):
        write_report(terminalreporter, config, report)
    kept = config.stash.get(KEPT_KEY, [])
    if not kept:
        return
    terminalreporter.section("pgsandbox: kept databases of failed tests")
    for command in kept:
        terminalreporter.write_line(f"  {command}")
    sandbox = config.stash.get(SANDBOX_KEY, None)
    if sandbox is not None and sandbox.server.kind == "local":
        terminalreporter.write_line(
            f"The local server keeps running for them; `pgsandbox clean {sandbox.server.run_id}` stops it."
        )
    else:
        terminalreporter.write_line("Drop them when done (they start with the run's prefix).")


def write_report(terminalreporter: Any, config: pytest.Config, report: dict[str, Any]) -> None:
    """The session report: a terminal section (quiet under -q), and a JSON file with ``--pg-report=json``."""
    from pgsandbox.pytest.checks import report_path

    choice = settings(config).report
    path = report_path(settings(config), config.invocation_params.dir)
    written = ""
    if path is not None:
        try:  # checked at start-up; the directory may have gone since
            path.write_text(json.dumps(report, indent=2) + "\n")
            written = f"report written to {path}"
        except OSError as error:
            written = f"pgsandbox could not write the report to {path}: {error.strerror}; fix {choice!r}."
            terminalreporter.write_line(written, yellow=True)
    if choice == "off" or config.get_verbosity() < 0:
        return
    terminalreporter.section("pgsandbox")
    for line in report_lines(report):
        terminalreporter.write_line(line)
    if written:
        terminalreporter.write_line(written)


def report_lines(report: dict[str, Any]) -> list[str]:
    server = report["server"]
    lines = [f"server: {server['origin']}; {server['start']} in {server['start_seconds']:.2f} s"]
    for template in report["templates"]:
        result = "cache hit" if template["hit"] else f"cache miss, built in {template['build_seconds']:.2f} s"
        lines.append(f"{template['layer']} template {template['hash']} ({', '.join(template['labels'])}): {result}")
    tests = report["tests"]
    by_mode = ", ".join(f"{mode} {count}" for mode, count in sorted(tests.items()))
    lines.append(
        f"tests: {sum(tests.values())} ({by_mode or 'none'}); pgsandbox's set-up {report['setup_seconds']:.2f} s "
        f"and teardown {report['teardown_seconds']:.2f} s in all"
    )
    databases = report["databases"]
    lines.append(f"databases: {databases['created']} created, {databases['dropped']} dropped, {databases['kept']} kept")
    findings = report["findings"]
    lines.append("findings: " + (", ".join(f"{kind} {count}" for kind, count in sorted(findings.items())) or "none"))
    cache = report.get("cache")
    if cache:
        bound = f"bound {cache['max_bytes'] / 1e6:.0f} MB (pg_cache_max_size)" if cache["max_bytes"] else "no bound"
        lines.append(f"cache: {cache['path']}, {cache['bytes'] / 1e6:.1f} MB; {bound}")
    return lines
