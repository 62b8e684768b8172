"""``sql:DIR``: the ``.sql`` files of a directory, in natural order, each in its own transaction.

Files are split into statements here (quotes, dollar quotes, comments and ``BEGIN ATOMIC`` bodies are
respected) and run one by one, so that a failure names its file, line and column. Statements PostgreSQL
refuses inside a transaction block (``CREATE INDEX CONCURRENTLY``, ``VACUUM``...) run on their own between
transactions; a file that manages its own transactions with ``BEGIN``/``COMMIT`` is run as written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import pq

from pgsandbox.template.base import MigrationError, Migrator, Target, file_inputs

NO_TRANSACTION = re.compile(
    r"""^(
        (create|drop)\s+(unique\s+)?index\s+concurrently
      | reindex\b.*\bconcurrently\b
      | vacuum\b
      | cluster\s*$
      | alter\s+system\b
      | create\s+subscription\b
      | alter\s+subscription\b.*\brefresh\b
      | drop\s+subscription\b
    )""",
    re.IGNORECASE | re.VERBOSE | re.DOTALL,
)
OUTSIDE_TEMPLATE = re.compile(r"^((create|drop|alter)\s+(database|tablespace)|create\s+role|create\s+user)\b", re.I)
TRANSACTION_CONTROL = re.compile(
    r"^(begin|start\s+transaction|commit|end|rollback|abort)\b(?!\s+to\b)(?!\s+atomic\b)", re.IGNORECASE
)
OPENS = re.compile(r"^(begin|start\s+transaction)\b", re.IGNORECASE)
# New enum values cannot be used before the transaction that added them commits.
COMMIT_AFTER = re.compile(r"^alter\s+type\b.*\badd\s+value\b", re.IGNORECASE | re.DOTALL)
COPY_STDIN = re.compile(r"^copy\b.*\bfrom\s+stdin\b", re.IGNORECASE | re.DOTALL)
COPY_WHY = "is COPY ... FROM STDIN, whose data only psql can send"
COPY_FIX = "turn the data into INSERT statements, or load it in a python: migration with cursor.copy()"


def natural_key(path: Path) -> list[Any]:
    """``2_x.sql`` before ``10_y.sql``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


@dataclass(frozen=True)
class Statement:
    text: str
    offset: int  # where it starts in the file, in characters


def split_statements(source: str) -> Iterator[Statement]:
    """Split SQL into statements on top-level semicolons; empty and comment-only pieces are dropped."""
    i, n = 0, len(source)
    start = 0
    atomic_depth = 0
    words: list[str] = []  # the statement's leading words, enough to spot CREATE ... BEGIN ATOMIC
    meaningful = False
    while i < n:
        char = source[i]
        nxt = source[i + 1] if i + 1 < n else ""
        if char == "-" and nxt == "-":
            end = source.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        if char == "/" and nxt == "*":
            i = _skip_block_comment(source, i)
            continue
        if char == "'":
            escapes = (
                i > 0 and source[i - 1] in "eE" and (i < 2 or not (source[i - 2].isalnum() or source[i - 2] == "_"))
            )
            i = _skip_quoted(source, i, "'", escapes)
            meaningful = True
            continue
        if char == '"':
            i = _skip_quoted(source, i, '"', False)
            meaningful = True
            continue
        if char == "$" and (i == 0 or not (source[i - 1].isalnum() or source[i - 1] == "_")):
            match = re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$", source[i:])
            if match:
                tag = match.group(0)
                end = source.find(tag, i + len(tag))
                i = n if end < 0 else end + len(tag)
                meaningful = True
                continue
        if char.isalpha() or char == "_":
            match = re.match(r"[A-Za-z_][A-Za-z0-9_$]*", source[i:])
            assert match is not None
            word = match.group(0).lower()
            if atomic_depth:
                if word in ("begin", "case"):
                    atomic_depth += 1
                elif word == "end":
                    atomic_depth -= 1
            elif word == "atomic" and words and words[-1] == "begin" and words[:1] == ["create"]:
                atomic_depth = 1
            words.append(word)
            i += len(word)
            meaningful = True
            continue
        if char == ";" and not atomic_depth:
            if meaningful:
                yield _statement(source, start, i)
            start, words, meaningful = i + 1, [], False
            i += 1
            continue
        if char == "\\" and _line_start(source, i):
            raise _MetaCommand(i)
        if not char.isspace():
            meaningful = True
        i += 1
    if meaningful:
        yield _statement(source, start, n)


class _MetaCommand(Exception):
    def __init__(self, offset: int) -> None:
        self.offset = offset


def _statement(source: str, start: int, end: int) -> Statement:
    text = source[start:end]
    stripped = text.lstrip()
    return Statement(stripped.rstrip(), start + len(text) - len(stripped))


def _line_start(source: str, i: int) -> bool:
    line_start = source.rfind("\n", 0, i) + 1
    return source[line_start:i].strip() == ""


def _skip_block_comment(source: str, i: int) -> int:
    depth, i = 1, i + 2
    while i < len(source) and depth:
        if source.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif source.startswith("*/", i):
            depth, i = depth - 1, i + 2
        else:
            i += 1
    return i


def _skip_quoted(source: str, i: int, quote: str, backslash_escapes: bool) -> int:
    i += 1
    while i < len(source):
        char = source[i]
        if backslash_escapes and char == "\\":
            i += 2
            continue
        if char == quote:
            if source.startswith(quote * 2, i):
                i += 2
                continue
            return i + 1
        i += 1
    return i


def line_and_column(source: str, offset: int) -> tuple[int, int]:
    line = source.count("\n", 0, offset) + 1
    return line, offset - (source.rfind("\n", 0, offset) + 1) + 1


class SqlDirMigrator(Migrator):
    def __init__(self, directory: Path, root: Path) -> None:
        self.directory = directory
        self.root = root
        self.label = f"sql:{_shown(directory, root)}"

    def files(self) -> list[Path]:
        if not self.directory.is_dir():
            raise MigrationError(
                f"migrations directory {self.directory} does not exist (from pg_migrations {self.label}).",
                "fix the path in pg_migrations; relative paths start at pytest's rootdir.",
            )
        files = sorted((p for p in self.directory.iterdir() if p.suffix == ".sql" and p.is_file()), key=natural_key)
        if not files:
            raise MigrationError(
                f"migrations directory {self.directory} holds no .sql files.",
                "add migrations, or point pg_migrations at the directory that has them.",
            )
        return files

    def inputs(self) -> Iterable[tuple[str, bytes]]:
        return file_inputs(self.files(), self.directory)

    def input_paths(self) -> list[Path]:
        return self.files()

    def migrate(self, target: Target) -> None:
        with target.connect(autocommit=True) as conn:
            for path in self.files():
                run_file(conn, path, _shown(path, self.root))


def run_file(conn: psycopg.Connection[Any], path: Path, shown: str) -> None:
    source = path.read_text(encoding="utf-8")
    statements: list[Statement] = []
    try:
        statements.extend(split_statements(source))
    except _MetaCommand as meta:
        if statements and COPY_STDIN.match(statements[-1].text):
            raise _Failure(source, shown, statements[-1]).refuse(COPY_WHY, COPY_FIX) from None
        line, column = line_and_column(source, meta.offset)
        command = source[meta.offset :].split(None, 1)[0]
        raise MigrationError(
            f"migration {shown}, line {line}, column {column}: {command} is a psql command, not SQL.",
            "pgsandbox runs .sql files statement by statement without psql: write the SQL out in full "
            "(or use a python: migration for what needs psql).",
        ) from None
    ours = False
    opened_at: Statement | None = None
    for statement in statements:
        status = conn.info.transaction_status
        fail = _Failure(source, shown, statement)
        if OUTSIDE_TEMPLATE.match(statement.text):
            raise fail.refuse(
                "creates or changes something outside the template database (databases, tablespaces, roles "
                "are shared by the whole server)",
                "leave it out of the migrations; create roles once on the server, or in a python: migration that "
                "checks whether they exist",
            )
        if COPY_STDIN.match(statement.text):
            raise fail.refuse(COPY_WHY, COPY_FIX)
        if TRANSACTION_CONTROL.match(statement.text):
            if ours:
                conn.execute("COMMIT")
            ours = False
            opened_at = statement if OPENS.match(statement.text) else None
            fail.execute(conn)
            continue
        if NO_TRANSACTION.match(statement.text):
            if status != pq.TransactionStatus.IDLE:
                if not ours:
                    raise fail.refuse(
                        "cannot run inside a transaction block, and the file opened one with BEGIN",
                        "move it after the COMMIT, or into a file of its own",
                    )
                conn.execute("COMMIT")
                ours = False
            fail.execute(conn)
            continue
        if status == pq.TransactionStatus.IDLE:
            conn.execute("BEGIN")
            ours = True
        fail.execute(conn)
        if COMMIT_AFTER.match(statement.text) and ours:
            conn.execute("COMMIT")
            ours = False
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        if ours:
            conn.execute("COMMIT")
        else:
            conn.execute("ROLLBACK")
            where = f", line {line_and_column(source, opened_at.offset)[0]}" if opened_at else ""
            raise MigrationError(
                f"migration {shown} opened a transaction{where} and did not commit it.",
                "add COMMIT at the end of the file (or remove its BEGIN: pgsandbox runs each file in a transaction).",
            )


@dataclass(frozen=True)
class _Failure:
    source: str
    shown: str
    statement: Statement

    def execute(self, conn: psycopg.Connection[Any]) -> None:
        try:
            conn.execute(self.statement.text)
        except psycopg.Error as error:
            raise self.from_error(error) from None

    def where(self, position: int | None) -> tuple[int, int]:
        offset = self.statement.offset + (position - 1 if position else 0)
        return line_and_column(self.source, offset)

    def excerpt(self, position: int | None) -> str:
        lines = self.statement.text.splitlines() or [""]
        first_line = self.where(None)[0]
        error_line, column = self.where(position)
        shown: list[str] = []
        for number, text in enumerate(lines, start=first_line):
            if len(shown) >= 12 and number > error_line:
                shown.append("    ...")
                break
            shown.append(f"    {number:>4} | {text}")
            if position and number == error_line:
                shown.append("         | " + " " * (column - 1) + "^")
        return "\n".join(shown)

    def from_error(self, error: psycopg.Error) -> MigrationError:
        diag = error.diag
        position = int(diag.statement_position) if diag.statement_position else None
        line, column = self.where(position)
        message = diag.message_primary or str(error).strip()
        details = [f"  PostgreSQL: {message}" + (f" (SQLSTATE {diag.sqlstate})" if diag.sqlstate else "")]
        for label, value in (("detail", diag.message_detail), ("hint", diag.message_hint), ("context", diag.context)):
            if value:
                details.append(f"  {label}: {value}")
        return MigrationError(
            f"migration {self.shown} failed at line {line}, column {column}:\n"
            + self.excerpt(position)
            + "\n"
            + "\n".join(details),
            "fix that statement and run again; the template was not kept, so nothing half-built is reused.",
        )

    def refuse(self, why: str, fix: str) -> MigrationError:
        line, column = self.where(None)
        return MigrationError(
            f"migration {self.shown}, line {line}, column {column}: this statement {why}:\n" + self.excerpt(None),
            fix + ".",
        )


def _shown(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
