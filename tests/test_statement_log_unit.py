"""The statement log read and interpreted without a server, on canned lines.

``statement_logs/csvlog.csv`` and ``statement_logs/jsonlog.json`` are what PostgreSQL 18 wrote for the same
session (``tests/statement_logs/README.md``): connection "pgsandbox t1" ran a statement of two lines with a
quoted comma, a parameter holding a comma, quotes and a line break (parse, bind, execute), a statement of
pgsandbox's own, a division by zero with a parameter, a ``RAISE WARNING``, and an update that waited for
"billing-worker"'s lock; then pgsandbox's mark.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from pgsandbox.server import statement_log
from pgsandbox.server.statement_log import Entry, read_csvlog, read_jsonlog, server_messages
from pgsandbox.server.statements import Scope, Statement, lock_waits, ran, report, statements

CANNED = Path(__file__).parent / "statement_logs"
CSV = (CANNED / "csvlog.csv").read_bytes()
JSON = (CANNED / "jsonlog.json").read_bytes()
TEST = Scope(frozenset(["pgsandbox t1"]))
READERS = [pytest.param(read_csvlog, CSV, id="csvlog"), pytest.param(read_jsonlog, JSON, id="jsonlog")]


def shape(entry: Entry) -> tuple[str, ...]:
    """An entry without what differs between two runs of the same session (pids, durations, timestamps)."""

    def plain(text: str) -> str:
        return re.sub(r"\d+(\.\d+)?", "N", re.sub(r"pgsandbox-mark-\w+", "pgsandbox-mark-", text))

    return (
        entry.severity,
        entry.application_name,
        entry.dbname,
        "" if entry.state_code == "00000" else entry.state_code,  # jsonlog leaves out "successful completion"
        plain(entry.message),
        plain(entry.detail),
        entry.context,
        entry.statement,
    )


def test_both_readers_read_the_same_entries() -> None:
    from_csv, from_json = list(read_csvlog(CSV)), list(read_jsonlog(JSON))
    assert len(from_json) == 17  # one JSON object per line
    assert [shape(e) for e in from_csv] == [shape(e) for e in from_json]


@pytest.mark.parametrize(("read", "data"), READERS)
def test_a_statement_of_several_lines_with_quoted_commas(read: object, data: bytes) -> None:
    assert callable(read)
    first = next(iter(read(data)))
    assert first.message.endswith("statement: select 'a, b' as x,\n  2 as y")
    assert (first.severity, first.application_name, first.dbname) == ("LOG", "pgsandbox t1", "postgres")
    assert first.timestamp.endswith(" UTC") and first.pid > 0
    parameters = [e.detail for e in read(data) if e.detail.startswith("Parameters")]
    assert parameters == ["Parameters: $1 = 'one, \"two\"\nthree'"] * 2  # bind and execute


@pytest.mark.parametrize(("read", "data"), READERS)
def test_an_error_keeps_its_statement_and_context(read: object, data: bytes) -> None:
    assert callable(read)
    error = next(e for e in read(data) if e.severity == "ERROR")
    assert (error.state_code, error.message, error.statement) == ("22012", "division by zero", "select 1/$1::int")
    assert error.context == "unnamed portal with parameters: $1 = '0'"


def test_a_jsonlog_line_cut_by_a_read_is_left_out() -> None:
    lines = JSON.splitlines(keepends=True)
    cut_last = b"".join(lines[:3]) + lines[3][:40]  # the collector was writing the fourth line
    assert [e.message for e in read_jsonlog(cut_last)] == [e.message for e in read_jsonlog(b"".join(lines[:3]))]
    cut_first = lines[0][40:] + b"".join(lines[1:3])  # a read that began in the middle of a line
    assert len(list(read_jsonlog(cut_first))) == 2


def test_a_csvlog_row_cut_by_a_read_keeps_the_fields_it_has() -> None:
    """A cut inside a quoted field (a parameter's line break here) leaves the rows before it whole; the cut row
    has the fields before the cut, and no application_name, so it is no named test's."""
    cut = CSV[: CSV.index(b"three'")]
    entries = list(read_csvlog(cut))
    assert [m[3] for e in entries[:2] if (m := statement_log.DURATION.match(e.message))] == [
        "select 'a, b' as x,\n  2 as y",
        "select $1::text as p",
    ]
    last = entries[-1]
    assert last.message.endswith("bind <unnamed>: select $1::text as p") and last.application_name == ""
    assert last.detail == 'Parameters: $1 = \'one, "two"\n'
    assert statements(entries, TEST)[-1].sql == "select 'a, b' as x,\n  2 as y"  # the cut bind is not the test's


@pytest.mark.parametrize(("read", "data"), READERS)
def test_parse_bind_and_execute_make_one_statement(read: object, data: bytes) -> None:
    assert callable(read)
    entries = list(read(data))
    found = statements(entries, TEST)
    assert [s.sql for s in found if not s.event] == [
        "select 'a, b' as x,\n  2 as y",
        "select $1::text as p",
        "select 1/$1::int",
        "do $$ begin raise warning 'careful, now'; end $$",
        "update users set name = 'waited' where id = 1",
    ]  # pgsandbox's own statement is left out
    merged = found[1]
    phases = [e for e in entries if e.message.endswith("select $1::text as p")]
    durations = [float(m[1]) for e in phases if (m := statement_log.DURATION.match(e.message))]
    assert merged.duration_ms == pytest.approx(sum(durations)) and len(durations) == 3
    assert merged.parameters == "$1 = 'one, \"two\"\nthree'"
    failed = found[2]
    assert failed.duration_ms is None and failed.parameters == "$1 = '0'"
    assert failed.error == "ERROR 22012: division by zero"
    assert [s.event for s in found if s.event] == [
        "WARNING: careful, now",
        next(e.message for e in entries if "still waiting" in e.message),
        next(e.message for e in entries if "acquired ShareLock" in e.message),
    ]
    assert [s.counted for s in found].count(True) == 5
    assert [ran(e) for e in entries if ran(e) is not None][:2] == [
        "select 'a, b' as x,\n  2 as y",
        "select $1::text as p",
    ]


@pytest.mark.parametrize(("read", "data"), READERS)
def test_entries_are_attributed_by_application_name_or_database(read: object, data: bytes) -> None:
    assert callable(read)
    entries = list(read(data))
    theirs = statements(entries, Scope(frozenset(["billing-worker"])))
    assert [s.sql for s in theirs] == ["BEGIN", "update users set name = 'held' where id = 1", "COMMIT"]
    assert not any(s.counted for s in theirs[::2])  # transaction control is not counted by pg_queries
    assert statements(entries, Scope(frozenset(["pgsandbox t2"]))) == []
    own_database = statements(entries, Scope(frozenset(), dbname="postgres"))
    assert len(own_database) == len(statements(entries, TEST)) + len(theirs) + 2  # and the mark's two lines
    assert statements(entries, Scope(frozenset(), dbname="elsewhere")) == []
    # the session database of transaction isolation: connections pgsandbox did not name are the test's
    shared = statements(entries, Scope(frozenset(["pgsandbox t1"]), shared="postgres", since="2000-01-01"))
    assert [s.application_name for s in shared].count("billing-worker") == 3


@pytest.mark.parametrize(("read", "data"), READERS)
def test_a_lock_wait_names_the_holder_and_its_last_statement(read: object, data: bytes) -> None:
    assert callable(read)
    entries = list(read(data))
    found = statements(entries, Scope(frozenset(["pgsandbox t1", "billing-worker"])))
    [told] = lock_waits(found)
    waiter = next(e.pid for e in entries if e.application_name == "pgsandbox t1")
    holder = next(e.pid for e in entries if e.application_name == "billing-worker")
    assert told.startswith(f"backend {waiter} waited for ShareLock on transaction ")
    assert "running \"update users set name = 'waited' where id = 1\"" in told
    assert f"held by backend {holder} (billing-worker), whose last statement before then was " in told
    assert "\"update users set name = 'held' where id = 1\"" in told
    alone = lock_waits(statements(entries, TEST))  # the holder was no connection of the test's
    assert alone and alone[0].endswith(f"backend {holder} (not one of this test's connections)")


@pytest.mark.parametrize(("read", "data"), READERS)
def test_the_report_labels_each_connection(read: object, data: bytes) -> None:
    assert callable(read)
    found = statements(read(data), Scope(frozenset(["pgsandbox t1", "billing-worker"])))
    text = report(found)
    lines = text.splitlines()
    assert lines[0].startswith("11 statements, ") and lines[0].endswith(" ms in all, 1 failed")
    assert re.fullmatch(r"  c1 = backend \d+ \(pgsandbox t1\)", lines[1])
    assert re.fullmatch(
        r"  c2 = backend \d+ \(billing-worker: a connection the test or its app opened itself\)", lines[2]
    )
    assert re.fullmatch(r"c1 +[0-9.]+ ms select 'a, b' as x,", lines[3]) and lines[4].endswith("    2 as y")
    assert "c1     failed select 1/$1::int" in text and "ERROR 22012: division by zero" in text
    assert "c1     server WARNING: careful, now" in text
    assert 'parameters: $1 = \'one, "two"' in text
    assert report(found, limit=2).splitlines()[0].endswith("; the first 9 are not shown")
    assert report([]) == "no statements were logged for this test"


def test_the_servers_own_messages_from_its_log_files(tmp_path: Path) -> None:
    """What a server that failed to start said is in its log files: everything but the statements."""
    shutil.copy(CANNED / "csvlog.csv", tmp_path / f"{statement_log.FILE_PREFIX}20260101-000000.csv")
    shutil.copy(CANNED / "jsonlog.json", tmp_path / f"{statement_log.FILE_PREFIX}20260101-000001.json")
    told = server_messages(tmp_path).splitlines()
    said = [line.split(" UTC ", 1)[1].split(":", 1)[0] for line in told]
    assert said == ["ERROR", "WARNING", "LOG", "DETAIL", "LOG"] * 2  # csvlog first, then jsonlog
    assert "ERROR:  division by zero" in told[0] and "DETAIL:  Process holding the lock: " in told[3]
    assert server_messages(tmp_path / "none") == ""


def test_the_log_format_for_a_server_version() -> None:
    choose = statement_log.choose_format
    assert [choose("auto", 15), choose("auto", 14), choose("csvlog", 17), choose("off", 17)] == [
        "jsonlog",
        "csvlog",
        "csvlog",
        None,
    ]
    with pytest.raises(statement_log.StatementLogError) as caught:
        choose("jsonlog", 14)
    assert caught.value.what == "pg_sql_log = jsonlog needs PostgreSQL 15 or newer; this server is 14."
    assert caught.value.fix == "use pg_sql_log = auto (csvlog on this version) or csvlog."
    settings = statement_log.server_settings(Path("/run/log"), "csvlog")
    assert settings["log_destination"] == "csvlog" and settings["log_directory"] == "/run/log"
    assert settings["log_min_duration_statement"] == "0" and settings["log_timezone"] == "UTC"


def test_a_client_librarys_set_up_of_a_connection_is_not_counted_and_is_folded() -> None:
    """SQLAlchemy's first-connect probes and the drivers' type lookups (as psycopg, psycopg2 and asyncpg send
    them): a connection made inside a pg_queries block sends them, one made before does not."""
    probes = [
        "select pg_catalog.version()",
        "select current_schema()",
        "show transaction isolation level",
        "show standard_conforming_strings",
        "SELECT t.oid, typarray\nFROM pg_type t JOIN pg_namespace ns\n    ON typnamespace = ns.oid\n"
        "WHERE typname = 'hstore';",
        "SELECT\n    typname AS name, oid, typarray AS array_oid,\n    oid::regtype::text AS regtype",
        "WITH RECURSIVE typeinfo_tree(\n    oid, ns, name, kind, basetype, elemtype, elemdelim,",
    ]
    name = "pgsandbox t.py::test_x"  # one connection of pgsandbox's: no connection labels
    found = [Statement("BEGIN", 7, name, duration_ms=0.01)]
    found += [Statement(sql, 7, name, duration_ms=0.1) for sql in probes]
    found += [Statement("select count(*) from users", 7, name, 0.2), Statement("ROLLBACK", 7, name, 0.01)]
    assert [s.sql for s in found if s.counted] == ["select count(*) from users"]
    assert all(s.driver_setup for s in found[1:8]) and not found[8].driver_setup
    lines = report(found).splitlines()
    assert lines[1].endswith("ms BEGIN")
    assert lines[2] == "           +7 driver set-up statements (a client library's questions to a new connection)"
    assert lines[3].endswith("ms select count(*) from users") and len(lines) == 5
    assert not Statement("select current_schema()", 7, error="ERROR 42P01: oops").driver_setup  # a failure shows


def test_pg_inserts_casts_show_as_plain_placeholders() -> None:
    sent = (
        'INSERT INTO "shop"."item" ("a", "b", "c") VALUES ($1, CAST(CAST($2 AS text) AS numeric(10,2)), '
        "CAST(CAST($3 AS text) AS jsonb)) RETURNING *"
    )
    assert Statement(sent, 1).sql == 'INSERT INTO "shop"."item" ("a", "b", "c") VALUES ($1, $2, $3) RETURNING *'
