"""What pgsandbox adds to pytest's reports: per test, secrets masked and the sections of a failed test (its SQL,
deadlock, lock waits, kept database); per session, the terminal summary and the JSON report."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import pytest

from pgsandbox.common.redact import redact
from pgsandbox.common.words import counted
from pgsandbox.errors import causes, sqlstate
from pgsandbox.pytest.markers import marker_options
from pgsandbox.pytest.state import (
    DATABASE_KEY,
    KEEP_KEY,
    KEPT_KEY,
    LOG_KEY,
    REPORT_KEY,
    SANDBOX_KEY,
    SQL_SHOWN_KEY,
    settings,
)

if TYPE_CHECKING:
    from pgsandbox.sandbox import Database, Sandbox
    from pgsandbox.sandbox.queries import Recorded
    from pgsandbox.server.statements import Statement

TIMEOUTS = {"55P03": "a statement waited too long for a lock", "57014": "a statement was stopped (a timeout)"}


# -- a test's report -----------------------------------------------------------------------------------------
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


def add_sections(item: pytest.Item, call: pytest.CallInfo[None], report: pytest.TestReport) -> None:
    """The sections of a test's report: the SQL it ran (when it failed, or with pg_show_sql), the seed of the rows
    ``pg.insert`` made; for a failed test, its deadlock, the locks behind a timeout and its kept database."""
    advice = scope_mismatch_advice(call, report)
    if advice:
        report.sections.append(("pgsandbox: scoped fixtures", advice))
    sandbox = item.config.stash.get(SANDBOX_KEY, None)
    db = item.stash.get(LOG_KEY, None)
    if db is None or sandbox is None or sandbox.stopped:  # the last test's teardown comes after the session's
        return
    if sandbox.gone is not None:  # no log to read; the first test that met it says so in full
        return
    from pgsandbox.server.tags import RECORDED  # here: loading the plugin imports no server module (psycopg)

    error = call.excinfo.value if call.excinfo else None
    found = add_sql(item, report, sandbox, db, listed=getattr(error, RECORDED, None))
    rows = db._test.rows
    if report.failed and rows is not None and rows.made:
        report.sections.append(
            (
                "pgsandbox: data",
                f"pg.insert made {counted(rows.made, 'row')} of this test from the seed {db.seed!r}: the same seed "
                "makes the same values on every run (pg_data_seed, set or not, is part of it).",
            )
        )
    if report.when != "call" or not report.failed or item.stash.get(DATABASE_KEY, None) is None:
        return
    denied = db._test.roles.explain(error, db.name)  # a permission denied as the app's role (pg.as_role)
    if denied and denied not in getattr(error, "__notes__", ()):
        report.sections.append(("pgsandbox: permission denied", denied))
    deadlock = deadlock_of(error)
    if deadlock is not None:
        # the server's log has each process's statement, which the client's error leaves out
        logged = next((s.detail for s in found or () if s.error.startswith("ERROR 40P01")), None)
        report.sections.append(("pgsandbox: deadlock", sandbox.diagnostics.describe_deadlock(logged or deadlock)))
    stopped = timeout_of(error)
    if stopped:
        report.sections.append((f"pgsandbox: {stopped}", lock_section(sandbox, db, found)))
    if marker_options(item).get("keep_failed", settings(item.config).keep_failed):
        report.sections.append(("pgsandbox: kept database", keep_database(item, sandbox, db)))


SCOPE_MISMATCH = re.compile(
    r"ScopeMismatch: You tried to access the function scoped fixture (pg\w*) with a (\w+) scoped"
)
SCOPED_FIXTURE = {"module": "pg_module", "class": "pg_class", "package": "pg_package", "session": "pg_session_data"}


def scope_mismatch_advice(call: pytest.CallInfo[None], report: pytest.TestReport) -> str | None:
    """pytest's ScopeMismatch, when a wider fixture asked for a per-test pgsandbox fixture: what to use instead."""
    if report.when != "setup" or not report.failed or call.excinfo is None:
        return None
    found = SCOPE_MISMATCH.search(str(call.excinfo.value))
    if found is None:
        return None
    fixture, scope = found.groups()
    scoped = SCOPED_FIXTURE.get(scope, "pg_module")
    return (
        f"pgsandbox: a {scope}-scoped fixture asked for {fixture}, which is one test's database (function scope).\n"
        f"  What to do: for rows made once per {scope}, write them through {scoped} in that fixture "
        f"(def fixture({scoped}): {scoped}.execute(...) or {scoped}.insert(...)): every test of the {scope} sees "
        f"them and is rolled back to them (transaction isolation). For data outside the tests' rollback (a "
        "framework's own database, worker processes), use pg_login."
    )


def add_sql(
    item: pytest.Item, report: pytest.TestReport, sandbox: Sandbox, db: Database, listed: Recorded | None = None
) -> list[Statement] | None:
    """The statements of the test from the server's log, as a section, when it failed or pg_show_sql asks;
    ``None`` when they were not read. ``listed``: a failed pg_queries block's, which its error lists already:
    the section has only the others (none: no section)."""
    show_sql = settings(item.config).show_sql and report.when == "call"
    shown = item.stash.get(SQL_SHOWN_KEY, False)  # a teardown error after a failure: the SQL is there already
    if not ((report.failed and not shown) or show_sql):
        return None
    item.stash[SQL_SHOWN_KEY] = True
    import psycopg

    from pgsandbox.server.statement_log import StatementLogError

    try:
        found, _, complete = sandbox.diagnostics.sql_of(db)
    except StatementLogError as unavailable:
        if show_sql or sandbox.server.statement_log is not None:  # a log that should have answered: say why
            report.sections.append(("pgsandbox: SQL", f"pgsandbox: {unavailable}"))
        return None
    except psycopg.Error as unreadable:
        from pgsandbox.sandbox.gone import connection_lost

        if not connection_lost(unreadable):  # else the server is gone: the teardown says so, in full
            report.sections.append(("pgsandbox: SQL", f"pgsandbox could not read the statement log: {unreadable}"))
        return None
    if listed is None:
        report.sections.append((f"pgsandbox: SQL of {report.when}", sql_section(found, complete)))
        return found
    others = [statement for statement in found if statement not in listed.all]
    if others:
        title = f"pgsandbox: SQL of {report.when}, besides the pg_queries block's (listed above)"
        report.sections.append((title, sql_section(others, complete)))
    return found


def sql_section(found: list[Statement], complete: bool) -> str:
    from pgsandbox.server import statements

    return (
        statements.report(found, complete=complete)
        + "\n(from the server's statement log: parameters as the server saw them, known secrets masked)"
    )


def lock_section(sandbox: Sandbox, db: Database, found: list[Statement] | None) -> str:
    """What a stopped statement waited for (from the log), and who held locks on the test's database."""
    from pgsandbox.server.statements import lock_waits

    waits = lock_waits(found or [])
    holders = sandbox.diagnostics.lock_holders(db.name)
    return (
        ("".join(f"{wait}\n" for wait in waits) + "\n" if waits else "")
        + "sessions in a transaction on the test's database when it failed, with the locks they held (the "
        "session whose statement was stopped may be among them):\n"
        + ("\n".join(f"    {holder}" for holder in holders) or "    none left")
        + "\n(pg_lock_timeout, pg_statement_timeout: how long a statement may wait or run)"
    )


def keep_database(item: pytest.Item, sandbox: Sandbox, db: Database) -> str:
    """Mark the failed test's database to be kept (its teardown keeps it), and say how to open it."""
    if sandbox.schema is not None:  # schema isolation: the tests share the session's schema
        from pgsandbox.isolation.findings import not_kept_in_schema

        return not_kept_in_schema(item.nodeid).text
    scope = sandbox.transaction_scope if db.isolation == "transaction" else None
    if scope is not None:
        from pgsandbox.isolation.findings import not_kept_in_scope

        return not_kept_in_scope(item.nodeid, scope).text
    item.stash[KEEP_KEY] = True
    db.keep = True  # driver fixtures commit instead of rolling back, for the kept database
    name = db.name if db.isolation == "database" else sandbox.kept.next_name()
    return (
        f"the database of this test is kept as {name}; open it with:\n"
        f"    {sandbox.kept.psql_command(name)}\n"
        "(the password is in that passfile, readable only by you, which goes with the kept database: "
        "`pgsandbox clean` stops a kept local server and removes both; on an existing server, "
        "`pgsandbox reap --include-kept` drops the database and removes the file)"
    )


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


# -- the session's report ------------------------------------------------------------------------------------
def write_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """The session report, and the kept databases of failed tests with how to open and drop them."""
    report = config.stash.get(REPORT_KEY, None)
    if report is not None and not hasattr(config, "workerinput"):
        write_report(terminalreporter, config, report)
    kept = config.stash.get(KEPT_KEY, [])
    if not kept:
        return
    terminalreporter.ensure_newline()
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


def write_report(terminalreporter: pytest.TerminalReporter, config: pytest.Config, report: dict[str, Any]) -> None:
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
    terminalreporter.ensure_newline()  # else the first write_line ends the last test's progress line: a blank line
    terminalreporter.section("pgsandbox")
    for line in report_lines(report):
        terminalreporter.write_line(line)
    if written:
        terminalreporter.write_line(written)


def report_lines(report: dict[str, Any]) -> list[str]:
    server = report["server"]
    lines = [f"server: {server['origin']}; {server['start']} in {server['start_seconds']:.2f} s"]
    for template in report["templates"]:
        why = template.get("why_built") or "cache miss"  # a worker's report of an older version has no reason
        result = "cache hit" if template["hit"] else f"{why}, built in {template['build_seconds']:.2f} s"
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
