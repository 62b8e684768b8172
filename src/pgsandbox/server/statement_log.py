"""Reading the local server's statement log: its settings, positions in it, the entries up to a mark.

The server logs every statement of every client (``log_min_duration_statement = 0``) in a machine-readable
file: jsonlog where it has it (PostgreSQL 15+), csvlog otherwise. Nothing reads it while tests pass; a failed
test's report and ``pg_queries`` read the part they need (statements.py makes them a test's statements).

pgsandbox's own administration runs with logging off (``tags.QUIET_OPTIONS``), so a reader meets only what
clients ran.

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
from typing import TYPE_CHECKING, Any

from pgsandbox.errors import PgSandboxError

if TYPE_CHECKING:
    import psycopg  # imported with the connection: the server's start reads this module's settings without it

FORMATS = ("jsonlog", "csvlog")
FILE_PREFIX = "statements-"
ROTATION_SIZE_MB = 16
FILES_KEPT = 4  # the newest files stay; older ones are removed: at most ~64 MB of log on the run's tmpfs
SYNC_TIMEOUT = 5.0
SETTINGS_CHECK_AFTER = 0.2  # seconds without the mark before the logging settings are checked once
PARAMETER_MAX_LENGTH = 200  # bytes of each parameter value the server logs

# the columns of csvlog, PostgreSQL 13+ (14 added leader_pid and query_id at the end)
CSV_COLUMNS = [
    *("timestamp", "user", "dbname", "pid", "remote_host", "session_id", "line_num", "ps", "session_start"),
    *("vxid", "txid", "error_severity", "state_code", "message", "detail", "hint", "internal_query"),
    *("internal_position", "context", "statement", "cursor_position", "func_name", "application_name"),
    *("backend_type", "leader_pid", "query_id"),
]

# what the server logs for a statement that ran to its end (log_min_duration_statement): its duration, the
# phase of the extended protocol (or a simple query's "statement"), the SQL
DURATION = re.compile(r"duration: ([0-9.]+) ms  (statement|parse|bind|execute)(?: [^:]*)?: (.*)", re.DOTALL)


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
class StatementLog:
    """The local server's statement log: ``directory`` holds its files, in ``format`` (jsonlog or csvlog)."""

    directory: Path
    format: str
    _suffix: str = field(init=False, default="")
    _current: str = field(init=False, default="")  # the newest file at the last listing

    def __post_init__(self) -> None:
        self._suffix = ".json" if self.format == "jsonlog" else ".csv"

    def handoff(self) -> dict[str, str]:
        """Where another process on this machine reads the same log (an xdist worker; ``Sandbox.handoff``)."""
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
        started = time.monotonic()
        deadline, settings_checked = started + SYNC_TIMEOUT, False
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
            now = time.monotonic()
            if now > deadline or (not settings_checked and now - started > SETTINGS_CHECK_AFTER):
                # a log that moved elsewhere never shows the mark: say so at once rather than after the timeout
                settings_checked = True
                changed = self._changed_settings(conn)
                if changed:
                    raise StatementLogError(
                        f"the server no longer logs statements where pgsandbox reads them ({changed}): something "
                        "changed its logging during the run (ALTER SYSTEM and pg_reload_conf()?).",
                        "leave the server's logging settings alone in tests (pgsandbox resets them after a test "
                        "that changed them with ALTER SYSTEM through pg_admin); set others with pg_server_settings.",
                    )
            if now > deadline:
                raise StatementLogError(
                    f"the server's statement log in {self.directory} did not show a mark within {SYNC_TIMEOUT:.0f} s.",
                    "the machine may be overloaded; pg_sql_log = off turns the statement log off.",
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _changed_settings(self, conn: psycopg.Connection[Any]) -> str:
        """The logging settings that differ from what this log needs (``name = value``), if any."""
        import psycopg

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
        read = read_jsonlog if self.format == "jsonlog" else read_csvlog
        for _, _, data in chunks:
            yield from read(data)


def read_jsonlog(data: bytes) -> Iterator[Entry]:
    """The entries of a piece of a jsonlog file: one JSON object per line."""
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            fields = json.loads(line)
        except ValueError:
            continue  # a line cut by a read at the start of a test: not the test's
        yield Entry.from_fields(fields)


def read_csvlog(data: bytes) -> Iterator[Entry]:
    """The entries of a piece of a csvlog file: CSV rows of :data:`CSV_COLUMNS`, whose quoted fields may hold
    commas and line breaks (a statement of several lines)."""
    for row in csv.reader(io.StringIO(data.decode("utf-8", errors="replace"))):
        yield Entry.from_fields(dict(zip(CSV_COLUMNS, row, strict=False)))


def server_messages(directory: Path) -> str:
    """What the server said in the log files of ``directory`` other than statements, as text: where a start-up
    failure is told once the logging collector runs."""
    lines = []
    for log_format in FORMATS:
        log = StatementLog(directory, log_format)
        chunks, _ = log._read_from(Position("", 0))
        for entry in log._parse(chunks):
            if not DURATION.match(entry.message):
                lines.append(f"{entry.timestamp} {entry.severity}:  {entry.message}")
                lines += [f"{entry.timestamp} DETAIL:  {entry.detail}"] if entry.detail else []
    return "\n".join(lines)
