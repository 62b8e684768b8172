"""pytest glue: options, ini keys, the ``pg`` marker and the hooks. The fixtures are in fixtures.py, the session's
sandbox in state.py, what goes into pytest's reports in report.py; everything else is in the core, which works
without pytest."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

from pgsandbox.errors import ConfigError, PgSandboxError, PgSandboxWarning, with_link
from pgsandbox.pytest import report as reports
from pgsandbox.pytest import state
from pgsandbox.pytest.state import (
    CONTROLLER_KEY,
    DATABASE_KEY,
    KEEP_KEY,
    KEPT_KEY,
    NEXT_KEY,
    SANDBOX_KEY,
    SETTINGS_KEY,
    WORKER_REPORTS_KEY,
    XDIST_INPUT,
    XDIST_KEPT,
    XDIST_REPORT,
    settings,
)
from pgsandbox.settings import BY_NAME, OPTIONS, Settings

pytest_plugins = ["pgsandbox.pytest.fixtures"]

__all__ = ["DATABASE_KEY", "KEEP_KEY", "SETTINGS_KEY", "PgSandboxWarning", "settings"]


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
            # a bool to pytest too, for --help; unset stays None (the environment, a lower-precedence source
            # than the command line only, may still set it)
            parser.addini(option.ini, option.help, type="bool", default=None)
        else:
            group.addoption(option.cli, dest=f"pg_{option.name}", default=None, help=option.help + env)
            parser.addini(option.ini, option.help, default="")


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> Generator[None, None, None]:
    """Before pytest-django sets Django up: its PostgreSQL backend loads with the project's driver."""
    if early_config.pluginmanager.hasplugin("django"):  # else not even imported: 10-25 ms of every start
        from pgsandbox.pytest import django

        django.choose_driver(early_config)
    return (yield)


def ini_value(config: pytest.Config, name: str) -> Any:
    """An ini key's value; pytest reads a flag's itself and says only "invalid truth value" of a bad one."""
    option = BY_NAME[name]
    try:
        return config.getini(option.ini)
    except (ValueError, pytest.UsageError) as error:
        raise ConfigError(
            f"ini {option.ini}: bad value: {error}; expected true or false.",
            f"fix ini {option.ini}; {option.cli} takes: {option.help}.",
        ) from None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pg(isolation=..., keep_failed=..., async_driver=..., guard=..., session_class=..., "
        "async_session_class=..., reset_sequences=..., fence=..., fence_allow=[...]): per-test pgsandbox options, "
        "for a test, "
        "class or module "
        "(they take precedence over the command line)",
    )
    try:
        config.stash[SETTINGS_KEY] = Settings.from_sources(
            cli={o.name: config.getoption(f"pg_{o.name}") for o in OPTIONS},
            env=os.environ,
            ini={o.name: ini_value(config, o.name) for o in OPTIONS},
        )
        from pgsandbox.pytest.checks import check_startup, unmatched_inputs

        worker = hasattr(config, "workerinput")  # an xdist worker: its controller checked and warned already
        if not worker:
            check_startup(config.stash[SETTINGS_KEY], config.invocation_params.dir)
    except ConfigError as error:
        raise pytest.UsageError(f"pgsandbox: {with_link(error)}") from None
    state.install_fence(config)
    for pattern in [] if worker else unmatched_inputs(config.stash[SETTINGS_KEY], config.rootpath):
        warning = PgSandboxWarning(
            f"pg_migrations_inputs: {pattern!r} matches no file under {config.rootpath}, so no file of it is in "
            "the template's hash. Fix the glob (relative to the rootdir) if it is meant to match something."
        )
        try:
            config.issue_config_time_warning(warning, stacklevel=2)
        except PgSandboxWarning:  # -W error: a usage error, not pytest's INTERNALERROR
            raise pytest.UsageError(f"pgsandbox: {warning}") from None
    if config.pluginmanager.hasplugin("django"):
        from pgsandbox.pytest import django

        django.start(config)  # pytest-django's database fixtures on the sandbox
    chars = config.option.reportchars or ""
    if config.stash[SETTINGS_KEY].show_sql and not {"P", "A"} & set(chars):
        config.option.reportchars = chars + "P"  # a passed test's report sections are shown with -rP


def pytest_itemcollected(item: pytest.Item) -> None:
    """The first collected test that needs the sandbox starts its server, while pytest collects the rest."""
    if "pg_sandbox" in getattr(item, "fixturenames", ()):
        state.start_in_background(item.session)


def pytest_report_header(config: pytest.Config) -> list[str]:
    if not config.pluginmanager.hasplugin("django"):
        return []
    from pgsandbox.pytest import django

    return django.header(config)  # which driver Django's databases use, when pgsandbox runs them


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the sandbox right after collection when a collected test needs it, so that its lines (server,
    templates: hit or miss, build time) come with the session's header, before the first test."""
    if state.runs_no_tests(session.config):
        return
    if any("pg_sandbox" in getattr(item, "fixturenames", ()) for item in session.items):
        state.start_early(session)
    else:
        state.discard_background_start(session.config)  # deselected after all
        state.remove_fence(session.config)  # no sandbox: nothing to fence tests into


@pytest.hookimpl(trylast=True)  # after pytest's own session teardown, where the fixture stops it normally
def pytest_sessionfinish(session: pytest.Session) -> None:
    state.stop_at_session_end(session.config)


def pytest_unconfigure(config: pytest.Config) -> None:
    state.remove_fence(config)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, Any, Any]:
    item.stash[NEXT_KEY] = nextitem  # lets a test's teardown open the next test's transaction
    try:
        return (yield)
    finally:
        state.fence_leave_test(item)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    state.fence_enter_test(item)  # before the fixtures: they connect for the test too


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    reports.redact_report(report)
    reports.add_sections(item, call, report)
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    reports.write_summary(terminalreporter, config)


# -- pytest-xdist: one server and one template build for all workers ------------------------------------------
@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """On the xdist controller, as it sets up a worker: start the sandbox once (server, templates), and tell
    each worker where to find it; each creates its own role and databases on it."""
    from pgsandbox.pytest.xdist import SharedSandbox

    config = node.config
    if state.runs_no_tests(config):
        return  # --collect-only: the workers run nothing that needs a database
    shared = config.stash.get(CONTROLLER_KEY, None)
    if shared is None:
        shared = SharedSandbox(lambda say: state.start(config, say))
        config.stash[CONTROLLER_KEY] = shared
    node.workerinput[XDIST_INPUT] = shared.worker_input


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """The first worker has collected: print the sandbox's start-up lines once, after xdist's own."""
    config = node.config
    shared = config.stash.get(CONTROLLER_KEY, None)
    if shared is None or config.stash.get(SANDBOX_KEY, None) is not None:
        return
    result = shared.outcome()
    if not isinstance(result, PgSandboxError):
        config.stash[SANDBOX_KEY] = result
    write = state.progress_writer(config)
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
    kept = getattr(node, "workeroutput", {}).get(XDIST_KEPT)
    shared = node.config.stash.get(CONTROLLER_KEY, None)
    if not kept or shared is None:
        return
    sandbox = shared.outcome()
    if isinstance(sandbox, PgSandboxError):
        return
    sandbox.kept.adopt(kept["names"])
    node.config.stash[KEPT_KEY] = [*node.config.stash.get(KEPT_KEY, []), *kept["commands"]]
