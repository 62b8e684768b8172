"""What tests ran, from the local server's own log: every statement, its duration, parameters and errors.

The server logs every statement of every client (``log_min_duration_statement = 0``) in a machine-readable
file: jsonlog where it has it (PostgreSQL 15+), csvlog otherwise. Nothing reads it while tests pass; a failed
test's report and ``pg_queries`` read the part they need. Each entry carries the ``application_name`` that
pgsandbox gives every connection of a test (and the database, for a test's own clone), which is how an entry
is attributed to its test, whatever client library or connection ran it.

pgsandbox's own administration runs with logging off (:data:`QUIET_OPTIONS`), and what it runs on a test's
connection starts with :data:`INTERNAL`: neither shows up as the test's SQL.

The logging collector writes what backends send it a moment later. A reader asks for everything up to a mark
it writes itself through the admin connection (:meth:`StatementLog.collect`): whatever a test ran before that
is in the file once the mark is, so no read misses a statement and no wait is a guess.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from pgsandbox.common.redact import redact
from pgsandbox.errors import PgSandboxError
from pgsandbox.server.tags import INTERNAL, OURS_PREFIX

FORMATS = ("jsonlog", "csvlog")
FILE_PREFIX = "statements-"
ROTATION_SIZE_MB = 16
FILES_KEPT = 4  # the newest files stay; older ones are removed: at most ~64 MB of log on the run's tmpfs
SYNC_TIMEOUT = 5.0
PARAMETER_MAX_LENGTH = 200  # bytes of each parameter value the server logs

# the columns of csvlog, PostgreSQL 13+ (14 added leader_pid and query_id at the end)
CSV_COLUMNS = [
    *("timestamp", "user", "dbname", "pid", "remote_host", "session_id", "line_num", "ps", "session_start"),
    *("vxid", "txid", "error_severity", "state_code", "message", "detail", "hint", "internal_query"),
    *("internal_position", "context", "statement", "cursor_position", "func_name", "application_name"),
    *("backend_type", "leader_pid", "query_id"),
]

_DURATION = re.compile(r"duration: ([0-9.]+) ms  (statement|parse|bind|execute)(?: [^:]*)?: (.*)", re.DOTALL)
_PARAMETERS = re.compile(r"^[Pp]arameters: ")
_PASSWORD = re.compile(r"(\bPASSWORD\s+)('(?:[^']|'')*'|E'(?:[^'\\]|\\.|'')*')", re.IGNORECASE)
_TRANSACTION_CONTROL = re.compile(
    r"\s*(?:/\*.*?\*/\s*)*(BEGIN|START\s+TRANSACTION|COMMIT|END|ROLLBACK|ABORT|SAVEPOINT|RELEASE|PREPARE\s+TRANSACTION)\b",
    re.IGNORECASE,
)
_HOUSEKEEPING = re.compile(r"\s*(DEALLOCATE|DISCARD)\b", re.IGNORECASE)  # a client's prepared statements


class StatementLogError(PgSandboxError):
    """The statement log cannot answer (external server, logging turned off, the log was cut)."""


def server_settings(directory: Path, log_format: str) -> dict[str, str]:
    """postgresql.conf settings that log every statement to ``directory`` in ``log_format``."""
    return {
        "logging_collector": "on",
        "log_destination": log_format,
        "log_directory": str(directory),
        "log_filename": FILE_PREFIX + "%Y%m%d-%H%M%S",
        "log_rotation_age": "0",
        "log_rotation_size": f"{ROTATION_SIZE_MB}MB",
        "log_file_mode": "0600",
        "log_min_duration_statement": "0",
        "log_parameter_max_length": str(PARAMETER_MAX_LENGTH),
        "log_parameter_max_length_on_error": str(PARAMETER_MAX_LENGTH),
        "log_lock_waits": "on",
        "log_timezone": "UTC",  # timestamps comparable with the test's start (Scope.since)
        # a wait longer than this is logged with the process holding the lock (and deadlocks are found then)
        "deadlock_timeout": "100ms",
    }


def choose_format(choice: str, major: int) -> str | None:
    """The log format for ``pg_sql_log`` = ``choice`` on a server of ``major`` version; None: no log."""
    if choice == "off":
        return None
    if choice == "auto":
        return "jsonlog" if major >= 15 else "csvlog"
    if choice == "jsonlog" and major < 15:
        raise StatementLogError(
            f"pg_sql_log = jsonlog needs PostgreSQL 15 or newer; this server is {major}.",
            "use pg_sql_log = auto (csvlog on this version) or csvlog.",
        )
    return choice


@dataclass(frozen=True)
class Position:
    """A place in the log: a file and an offset in it."""

    file: str
    offset: int


def log_time(epoch: float) -> str:
    """``epoch`` as the log writes its timestamps (``log_timezone`` = UTC, milliseconds), rounded down."""
    whole = int(epoch * 1000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(whole // 1000)) + f".{whole % 1000:03d} UTC"


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
class Entry:
    """One line of the server's log, the fields pgsandbox uses."""

    pid: int
    severity: str
    message: str
    application_name: str = ""
    dbname: str = ""
    state_code: str = ""
    detail: str = ""
    hint: str = ""
    context: str = ""
    statement: str = ""
    timestamp: str = ""

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Entry:
        def text(name: str) -> str:
            value = fields.get(name)
            return "" if value is None else str(value)

        pid = text("pid")
        return cls(
            pid=int(pid) if pid.isdigit() else 0,
            severity=text("error_severity"),
            message=text("message"),
            application_name=text("application_name"),
            dbname=text("dbname"),
            state_code=text("state_code"),
            detail=text("detail"),
            hint=text("hint"),
            context=text("context"),
            statement=text("statement"),
            timestamp=text("timestamp"),
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

    @property
    def transaction_control(self) -> bool:
        """BEGIN, COMMIT, ROLLBACK, SAVEPOINT...: not counted by ``pg_queries`` (they differ between isolation
        modes, where a ``commit()`` becomes a savepoint)."""
        return bool(_TRANSACTION_CONTROL.match(self.sql))

    @property
    def counted(self) -> bool:
        """What ``pg_queries`` counts: not transaction control, not a client's DEALLOCATE of its prepared
        statements, not what the server said about the session."""
        ran = bool(self.sql.strip()) and not self.event
        return ran and not self.transaction_control and not _HOUSEKEEPING.match(self.sql)

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


@dataclass
class StatementLog:
    """The local server's statement log: ``directory`` holds its files, in ``format`` (jsonlog or csvlog)."""

    directory: Path
    format: str
    _suffix: str = field(init=False, default="")
    _current: str = field(init=False, default="")  # the newest file at the last listing

    def __post_init__(self) -> None:
        self._suffix = ".json" if self.format == "jsonlog" else ".csv"

    def describe(self) -> dict[str, str]:
        return {"directory": str(self.directory), "format": self.format}

    def _files(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return sorted(n for n in names if n.startswith(FILE_PREFIX) and n.endswith(self._suffix))

    def position(self) -> Position:
        """Where the log ends now. Once per test, so it costs a stat of the file last seen (3 us) while that file
        is smaller than the rotation size; then the directory is listed again and old files are removed. A file
        started meanwhile (a restart) is still read: a read takes every file from its position's on."""
        if self._current:
            with contextlib.suppress(OSError):
                size = os.path.getsize(self.directory / self._current)
                if size < ROTATION_SIZE_MB * 1024 * 1024:
                    return Position(self._current, size)
        files = self._files()
        for old in files[:-FILES_KEPT]:
            with contextlib.suppress(OSError):
                os.unlink(self.directory / old)
        if not files:
            return Position("", 0)
        last = self._current = files[-1]
        try:
            return Position(last, os.path.getsize(self.directory / last))
        except OSError:
            return Position(last, 0)

    def collect(self, since: Position, conn: psycopg.Connection[Any]) -> tuple[list[Entry], Position, bool]:
        """Every entry from ``since`` up to a mark written now through ``conn`` (an admin connection, whose
        own statements are not logged), the position after the mark, and whether the log from ``since`` was
        complete (False: a file was already removed)."""
        token = f"pgsandbox-mark-{secrets.token_hex(8)}"
        conn.execute("SET log_min_duration_statement = 0")
        try:
            conn.execute(f"SELECT '{token}'")
        finally:
            conn.execute("SET log_min_duration_statement = -1")
        deadline = time.monotonic() + SYNC_TIMEOUT
        delay = 0.0005
        marker = token.encode()
        while True:
            chunks, complete = self._read_from(since)
            for index, (name, start, data) in enumerate(chunks):
                found = data.find(marker)
                if found < 0:
                    continue
                end = data.find(b"\n", found)
                end = len(data) if end < 0 else end + 1
                chunks[index] = (name, start, data[:end])
                entries = [e for e in self._parse(chunks[: index + 1]) if token not in e.message]
                return entries, Position(name, start + end), complete
            if time.monotonic() > deadline:
                changed = self._changed_settings(conn)
                if changed:
                    raise StatementLogError(
                        f"the server no longer logs statements where pgsandbox reads them ({changed}): something "
                        "changed its logging during the run (ALTER SYSTEM and pg_reload_conf()?).",
                        "leave the server's logging settings alone in tests (pgsandbox resets them after a test "
                        "that changed them with ALTER SYSTEM through pg_admin); set others with pg_server_settings.",
                    )
                raise StatementLogError(
                    f"the server's statement log in {self.directory} did not show a mark within {SYNC_TIMEOUT:.0f} s.",
                    "the machine may be overloaded; pg_sql_log = off turns the statement log off.",
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _changed_settings(self, conn: psycopg.Connection[Any]) -> str:
        """The logging settings that differ from what this log needs (``name = value``), if any."""
        expected = {"log_destination": self.format, "logging_collector": "on", "log_directory": str(self.directory)}
        try:
            rows = conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", [list(expected)]
            ).fetchall()
        except psycopg.Error:
            return ""
        return ", ".join(f"{name} = {setting}" for name, setting in rows if setting != expected[name])

    def _read_from(self, since: Position) -> tuple[list[tuple[str, int, bytes]], bool]:
        chunks = []
        files = self._files()
        complete = not since.file or since.file in files
        for name in files:
            if name < since.file:
                continue
            start = since.offset if name == since.file else 0
            try:
                with open(self.directory / name, "rb") as handle:
                    handle.seek(start)
                    chunks.append((name, start, handle.read()))
            except OSError:
                complete = False
        return chunks, complete

    def _parse(self, chunks: Iterable[tuple[str, int, bytes]]) -> Iterator[Entry]:
        for _, _, data in chunks:
            text = data.decode("utf-8", errors="replace")
            if self.format == "jsonlog":
                for line in text.splitlines():
                    try:
                        fields = json.loads(line)
                    except ValueError:
                        continue  # a line cut by a read at the start of a test: not the test's
                    yield Entry.from_fields(fields)
            else:
                for row in csv.reader(io.StringIO(text)):
                    yield Entry.from_fields(dict(zip(CSV_COLUMNS, row, strict=False)))


def server_messages(directory: Path) -> str:
    """What the server said in the log files of ``directory`` other than statements, as text: where a start-up
    failure is told once the logging collector runs."""
    lines = []
    for log_format in FORMATS:
        log = StatementLog(directory, log_format)
        chunks, _ = log._read_from(Position("", 0))
        for entry in log._parse(chunks):
            if not _DURATION.match(entry.message):
                lines.append(f"{entry.timestamp} {entry.severity}:  {entry.message}")
                lines += [f"{entry.timestamp} DETAIL:  {entry.detail}"] if entry.detail else []
    return "\n".join(lines)


def ran(entry: Entry) -> str | None:
    """The SQL of a statement that ran to its end (a duration line), but pgsandbox's own; None for anything
    else (a failed statement, a lock wait...)."""
    if entry.severity != "LOG":
        return None
    match = _DURATION.match(entry.message)
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
            match = _DURATION.match(entry.message)
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
        f"{len(found)} statement(s), {total:.2f} ms in all"
        + (f", {errors} failed" if errors else "")
        + (f"; the first {len(found) - limit} are not shown" if len(found) > limit else "")
        + ("" if complete else "; the log before them was rotated away")
    ]
    if labels:
        by_pid = {s.pid: s.application_name for s in found}
        lines += [f"  {labels[pid]}= backend {pid} ({_whose(by_pid[pid])})" for pid in pids]
    for statement in found[-limit:]:
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
