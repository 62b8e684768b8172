"""The session report and the teardown findings as plain functions: no server, no pytester (the fast tier)."""

from __future__ import annotations

import json
from pathlib import Path

from pgsandbox.isolation.findings import (
    LEFT_OPEN,
    OWN_DB,
    PREPARED,
    SESSION_DB,
    Finding,
    escaped,
    left_open,
    prepared_left,
)
from pgsandbox.sandbox.report import Counters, ServerSummary, cache_report, merge_reports, session_report
from pgsandbox.server.admin import Session
from pgsandbox.template import TemplateInfo

SERVER = ServerSummary("16.4", "PostgreSQL 16.4 from a wheel", "from the initdb cache", 0.12345)
TEMPLATE = TemplateInfo(
    "migrations", "pgsandbox_tpl_0123456789abcdef", "key", hit=False, seconds=1.23456, labels=("m",)
)


def report_of(counters: Counters, **databases: int) -> dict[str, object]:
    cache = {"path": "/cache", "bytes": 10, "max_bytes": 100}
    return session_report(SERVER, [TEMPLATE], counters, {"created": 0, "dropped": 0, "kept": 0, **databases}, cache)


def test_the_report_counts_tests_by_mode_seconds_and_findings_by_kind() -> None:
    counters = Counters()
    counters.opened("transaction", 0.01)
    counters.opened("transaction", 0.02)
    counters.opened("database", 0.1)
    counters.teardown_seconds += 0.0504
    counters.found(LEFT_OPEN)
    counters.found(LEFT_OPEN)
    counters.found(PREPARED)

    report = report_of(counters, created=3, dropped=2)

    assert report["server"] == {
        "version": "16.4",
        "origin": "PostgreSQL 16.4 from a wheel",
        "start": "from the initdb cache",
        "start_seconds": 0.123,
    }
    assert report["templates"] == [
        {
            "layer": "migrations",
            "hash": "0123456789ab",
            "labels": ["m"],
            "hit": False,
            "why_built": "cache miss",
            "build_seconds": 1.235,
        }
    ]
    assert report["tests"] == {"transaction": 2, "database": 1}
    assert report["setup_seconds"] == 0.13 and report["teardown_seconds"] == 0.05
    assert report["databases"] == {"created": 3, "dropped": 2, "kept": 0}
    assert report["findings"] == {LEFT_OPEN: 2, PREPARED: 1}
    assert json.loads(json.dumps(report)) == report  # plain data: --pg-report=json writes it as it is


def test_the_report_is_a_copy_of_the_counters() -> None:
    counters = Counters()
    counters.opened("transaction", 0.01)
    report = report_of(counters)
    counters.opened("transaction", 0.01)
    assert report["tests"] == {"transaction": 1}


def test_merge_reports_adds_the_workers_counts_to_the_controllers() -> None:
    controller = report_of(Counters(), created=1)
    first, second = Counters(), Counters()
    first.opened("transaction", 0.25)
    first.found(LEFT_OPEN)
    second.opened("database", 0.5)
    second.opened("transaction", 0.125)
    second.teardown_seconds = 1.0
    second.found(LEFT_OPEN)
    second.found(PREPARED)

    merged = merge_reports(controller, [report_of(first, created=2, dropped=2), report_of(second, created=3, kept=1)])

    assert merged["tests"] == {"transaction": 2, "database": 1}
    assert merged["setup_seconds"] == 0.875 and merged["teardown_seconds"] == 1.0
    assert merged["databases"] == {"created": 6, "dropped": 2, "kept": 1}
    assert merged["findings"] == {LEFT_OPEN: 2, PREPARED: 1}
    assert merged["server"] == controller["server"] and merged["templates"] == controller["templates"]
    assert controller["tests"] == {}  # the controller's own report is left as it was


def test_merge_reports_with_no_workers_is_the_controllers_report() -> None:
    controller = report_of(Counters())
    assert merge_reports(controller, []) == controller


def test_the_cache_report_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    assert cache_report(tmp_path / "none", 5) == {"path": str(tmp_path / "none"), "bytes": 0, "max_bytes": 5}


def test_a_finding_is_its_text_with_a_kind() -> None:
    sessions = [
        Session(11, "pool", "idle", "select 1", None),
        Session(12, "worker", "idle in transaction", "select 2", 1.5),
    ]
    idle, other = left_open("t.py::test_x", sessions, OWN_DB)
    assert isinstance(idle, Finding) and idle.kind == "sessions left idle in transaction"
    assert str(idle).startswith("t.py::test_x left 1 session(s) idle in transaction on its database (pid 12")
    assert other.kind == LEFT_OPEN
    assert other.text.startswith("t.py::test_x left 1 connection(s) open to its database (pid 11")
    assert other.text.endswith("pgsandbox terminated them.")


def test_prepared_transactions_are_said_the_same_way_in_both_modes() -> None:
    own = prepared_left("t.py::test_x", ["a", "b"], OWN_DB)
    shared = prepared_left("t.py::test_x", ["a", "b"], SESSION_DB)
    assert own.kind == shared.kind == PREPARED
    assert own.text == "t.py::test_x left 2 prepared transaction(s) (a, b) in its database; pgsandbox rolled them back."
    assert shared.text == (
        "t.py::test_x left 2 prepared transaction(s) (a, b) in the session database, where PREPARE TRANSACTION "
        "outlives the test's rollback; pgsandbox rolled them back."
    )


def test_an_escape_names_each_cause_and_what_changed() -> None:
    error = escaped("t.py::test_x", ["public.users (+1 row, 1 row written)"], own=True, committed=["pg_admin"])
    assert error.what == (
        "t.py::test_x committed outside its transaction, so its writes escaped the rollback: its transaction was "
        "ended by a COMMIT (or END) statement run on the test's connection; its pg_admin connection, outside the "
        "test's transaction, committed.\n  Changed: public.users (+1 row, 1 row written).\n  pgsandbox cloned "
        "the session database again from the template: the next test starts clean."
    )
    assert "isolation='database'" in error.fix
