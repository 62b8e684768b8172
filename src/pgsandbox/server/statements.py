"""What a test ran, from the entries of the statement log (statement_log.py): its statements, their durations,
parameters and errors, the lock waits it met, and the text of a report.

Each entry carries the ``application_name`` that pgsandbox gives every connection of a test (and the database,
for a test's own clone), which is how an entry is attributed to its test (:class:`Scope`), whatever client
library or connection ran it. What pgsandbox runs on a test's connection starts with ``tags.INTERNAL``: it
never shows up as the test's SQL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from pgsandbox.common.redact import redact
from pgsandbox.common.words import counted
from pgsandbox.server.statement_log import DURATION, Entry
from pgsandbox.server.tags import INTERNAL, OURS_PREFIX

_PARAMETERS = re.compile(r"^[Pp]arameters: ")
_PASSWORD = re.compile(r"(\bPASSWORD\s+)('(?:[^']|'')*'|E'(?:[^'\\]|\\.|'')*')", re.IGNORECASE)
_TRANSACTION_CONTROL = re.compile(
    r"\s*(?:/\*.*?\*/\s*)*(BEGIN|START\s+TRANSACTION|COMMIT|END|ROLLBACK|ABORT|SAVEPOINT|RELEASE|PREPARE\s+TRANSACTION)\b",
    re.IGNORECASE,
)
_HOUSEKEEPING = re.compile(r"\s*(DEALLOCATE|DISCARD)\b", re.IGNORECASE)  # a client's prepared statements
# What client libraries ask a new connection before the app's first statement: SQLAlchemy's dialect
# initialization (on psycopg, psycopg2 and asyncpg alike), the hstore type lookups of psycopg and psycopg2, and
# asyncpg's type introspection. A connection made inside the block (database isolation, an app's own engine)
# sends them where one made before it does not: counting them made pg_queries depend on the isolation.
_DRIVER_SETUP = re.compile(
    r"\s*(?:select pg_catalog\.version\(\)|select current_schema\(\)|show transaction isolation level"
    r"|show standard_conforming_strings|SELECT t\.oid, typarray\b|SELECT\s+typname AS name, oid, typarray AS array_oid"
    r"|WITH RECURSIVE typeinfo_tree\b|SELECT t\.oid, t\.typelem AS elemtype, t\.typtype AS kind\b)",
    re.IGNORECASE,
)


# pg.insert sends its made-up values as text the server casts to the column's type (data/rows.py): shown as
# the plain placeholder the test would write
_AS_TEXT = re.compile(r"CAST\(CAST\((\$\d+) AS text\) AS (?:[^()]|\([^()]*\))+\)")


@dataclass(frozen=True)
class Scope:
    """What belongs to one test: connections named after it, and everything in its own database.

    ``shared``: the session database of transaction isolation, which the test has to itself only while it
    runs (from ``since``, a :func:`log_time`). The app's own connections to it (``pg.dsn``), which carry no
    application_name pgsandbox gave, are the test's there and then."""

    names: frozenset[str]
    dbname: str | None = None  # a database only this test uses (database isolation)
    shared: str | None = None
    since: str = ""

    def __contains__(self, entry: Entry) -> bool:
        if entry.application_name in self.names or (self.dbname is not None and entry.dbname == self.dbname):
            return True
        return (
            self.shared is not None
            and entry.dbname == self.shared
            and not entry.application_name.startswith(OURS_PREFIX)
            # a timestamp in another zone (log_timezone set by pg_server_settings): the log's order decides
            and (not entry.timestamp.endswith(" UTC") or entry.timestamp >= self.since)
        )


@dataclass
class Statement:
    """A statement a test ran (``duration_ms`` set), one that failed (``error`` set), or something the server
    said about its session (a lock wait: ``event``)."""

    sql: str
    pid: int
    application_name: str = ""
    duration_ms: float | None = None
    parameters: str = ""
    error: str = ""
    detail: str = ""
    event: str = ""

    def __post_init__(self) -> None:
        self.sql = _AS_TEXT.sub(r"\1", self.sql)

    @property
    def transaction_control(self) -> bool:
        """BEGIN, COMMIT, ROLLBACK, SAVEPOINT...: not counted by ``pg_queries`` (they differ between isolation
        modes, where a ``commit()`` becomes a savepoint)."""
        return bool(_TRANSACTION_CONTROL.match(self.sql))

    @property
    def driver_setup(self) -> bool:
        """A client library's questions to a new connection (SQLAlchemy's version and settings probes, type
        lookups): not the app's statements, not counted, folded into one line in reports."""
        return not self.event and not self.error and bool(_DRIVER_SETUP.match(self.sql))

    @property
    def counted(self) -> bool:
        """What ``pg_queries`` counts: not transaction control, not a client's DEALLOCATE of its prepared
        statements or its set-up of a new connection, not what the server said about the session."""
        ran = bool(self.sql.strip()) and not self.event
        housekeeping = _HOUSEKEEPING.match(self.sql) or self.driver_setup
        return ran and not self.transaction_control and not housekeeping

    def describe(self, max_sql: int = 1000) -> str:
        if self.event:
            lines = [self.event + (f" ({self.detail})" if self.detail else "")]
            if self.sql:
                lines.append("statement: " + _shorten(self.sql, max_sql))
            return redact_sql("\n".join(lines))
        lines = [_shorten(self.sql, max_sql)] if self.sql.strip() else []
        if self.parameters:
            lines.append("parameters: " + self.parameters)
        if self.error:
            lines.append(self.error + (f"\nDETAIL: {self.detail}" if self.detail else ""))
        return redact_sql("\n".join(lines))


def redact_sql(text: str) -> str:
    """Known secrets and DSN passwords (:func:`redact`), and the literal of any ``PASSWORD '...'`` clause."""
    return redact(_PASSWORD.sub(lambda m: m.group(1) + "'***'", text))


def _shorten(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + f" … ({len(text) - limit} more characters)"


def ran(entry: Entry) -> str | None:
    """The SQL of a statement that ran to its end (a duration line), but pgsandbox's own; None for anything
    else (a failed statement, a lock wait...)."""
    if entry.severity != "LOG":
        return None
    match = DURATION.match(entry.message)
    if match is None or match[2] in ("parse", "bind") or match[3].startswith(INTERNAL):
        return None
    return match[3]


def statements(entries: Iterable[Entry], scope: Scope) -> list[Statement]:
    """The test's statements in the order they ran: parse, bind and execute of one statement are one, with
    their durations added; pgsandbox's own statements are left out."""
    found: list[Statement] = []
    pending: dict[int, float] = {}  # parse and bind durations by backend, until its execute
    for entry in entries:
        if entry not in scope:
            continue
        if entry.severity == "LOG":
            match = DURATION.match(entry.message)
            if match is None:
                found.append(
                    Statement(
                        entry.statement,
                        entry.pid,
                        entry.application_name,
                        event=entry.message,
                        detail=entry.detail,
                    )
                )
                continue
            duration, phase, text = float(match[1]), match[2], match[3]
            if text.startswith(INTERNAL):
                pending.pop(entry.pid, None)
                continue
            if phase in ("parse", "bind"):
                pending[entry.pid] = pending.get(entry.pid, 0.0) + duration
                continue
            parameters = _PARAMETERS.sub("", entry.detail) if _PARAMETERS.match(entry.detail) else ""
            found.append(
                Statement(
                    text,
                    entry.pid,
                    entry.application_name,
                    duration_ms=duration + pending.pop(entry.pid, 0.0),
                    parameters=parameters,
                )
            )
        elif entry.severity in ("ERROR", "FATAL", "PANIC"):
            pending.pop(entry.pid, None)
            if entry.statement.startswith(INTERNAL):
                continue
            context = entry.context
            parameters = ""
            if "with parameters: " in context:
                parameters = context.split("with parameters: ", 1)[1].split("\n", 1)[0]
            found.append(
                Statement(
                    entry.statement,
                    entry.pid,
                    entry.application_name,
                    parameters=parameters,
                    error=f"{entry.severity} {entry.state_code}: {entry.message}".replace("  ", " "),
                    detail=entry.detail,
                )
            )
        elif entry.severity == "WARNING":
            found.append(
                Statement(entry.statement, entry.pid, entry.application_name, event="WARNING: " + entry.message)
            )
    return found


_LOCK_WAIT = re.compile(r"process (\d+) still waiting for (.+?) after ([0-9.]+) ms")
_HOLDERS = re.compile(r"Process(?:es)? holding the lock: ([0-9, ]+)\.")


def lock_waits(found: list[Statement]) -> list[str]:
    """The lock waits the server logged for a test (``log_lock_waits``, after ``deadlock_timeout``), each with
    the process that held the lock: its ``application_name`` and last statement when it was the test's."""
    told = []
    for index, event in enumerate(found):
        wait = _LOCK_WAIT.match(event.event)
        holders = _HOLDERS.search(event.detail)
        if not wait or not holders:
            continue
        described = []
        for pid in (int(p) for p in holders[1].split(",")):
            theirs = [s for s in found[:index] if s.pid == pid and not s.event]
            if theirs:
                last = _shorten(theirs[-1].sql, 300)
                described.append(
                    f"backend {pid} ({theirs[-1].application_name or 'no application_name'}), whose "
                    f"last statement before then was {last!r}"
                )
            else:
                described.append(f"backend {pid} (not one of this test's connections)")
        told.append(
            redact_sql(
                f"backend {wait[1]} waited for {wait[2]} (still waiting after {float(wait[3]):.0f} ms) running "
                f"{_shorten(event.sql, 300)!r}; the lock was held by " + "; ".join(described)
            )
        )
    return told


def _whose(application_name: str) -> str:
    """A connection's legend: its application_name, and whether pgsandbox opened it."""
    if application_name.startswith(OURS_PREFIX):
        return application_name
    return f"{application_name or 'no application_name'}: a connection the test or its app opened itself"


def report(found: list[Statement], limit: int = 50, max_sql: int = 1000, complete: bool = True) -> str:
    """The statements as a report section: the last ``limit`` of them, each shortened to ``max_sql``
    characters, one connection label per backend when there are several or one is not pgsandbox's."""
    if not found:
        return "no statements were logged for this test" + ("" if complete else " (its log was rotated away)")
    pids = list(dict.fromkeys(s.pid for s in found))
    foreign = any(not s.application_name.startswith(OURS_PREFIX) for s in found)
    labels = {pid: f"c{index + 1} " for index, pid in enumerate(pids)} if len(pids) > 1 or foreign else {}
    total = sum(s.duration_ms or 0.0 for s in found)
    errors = sum(1 for s in found if s.error)
    lines = [
        f"{counted(len(found), 'statement')}, {total:.2f} ms in all"
        + (f", {errors} failed" if errors else "")
        + (f"; the first {len(found) - limit} are not shown" if len(found) > limit else "")
        + ("" if complete else "; the log before them was rotated away")
    ]
    if labels:
        by_pid = {s.pid: s.application_name for s in found}
        lines += [f"  {labels[pid]}= backend {pid} ({_whose(by_pid[pid])})" for pid in pids]
    setup = 0  # driver set-up statements in a row, told as one line
    for statement in [*found[-limit:], None]:
        if statement is not None and statement.driver_setup:
            setup += 1
            continue
        if setup:
            told = counted(setup, "driver set-up statement")
            lines.append(f"{'':>10} +{told} (a client library's questions to a new connection)")
            setup = 0
        if statement is None:
            break
        if statement.error:
            head = f"{'failed':>10} "
        elif statement.event:
            head = f"{'server':>10} "
        else:
            head = f"{statement.duration_ms or 0.0:7.2f} ms "
        body = statement.describe(max_sql).splitlines() or [""]
        prefix = labels.get(statement.pid, "")
        lines.append(f"{prefix}{head}{body[0]}")
        lines += [" " * (len(prefix) + len(head)) + line for line in body[1:]]
    return "\n".join(lines)
