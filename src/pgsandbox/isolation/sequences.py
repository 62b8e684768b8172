"""``pg_reset_sequences``: sequences are not transactional (a rolled-back ``nextval`` stays taken), so in
``transaction`` isolation ids keep growing from test to test. With the option, the state of every sequence is
read when a test begins (:data:`SNAPSHOT`) and the ones the test moved are set back after its rollback
(:func:`restore_sql`), so the first row a test inserts gets the same id in every test."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from pgsandbox.server.tags import INTERNAL

# every sequence the tests' role may read and set: its last value (NULL before its first nextval, or after a
# setval(..., false)) and its start. The catalog functions, not the pg_sequences view, whose joins cost more.
# has_table_privilege, not has_sequence_privilege: the planner may check the condition on pg_class rows before
# the join, and has_sequence_privilege fails on a table.
SNAPSHOT = (
    INTERNAL + "SELECT c.oid::bigint, pg_sequence_last_value(c.oid), s.seqstart "
    "FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid "
    "WHERE c.relkind = 'S' AND NOT pg_is_other_temp_schema(c.relnamespace) "
    "AND has_table_privilege(c.oid, 'SELECT') AND has_table_privilege(c.oid, 'UPDATE')"
)


class SequenceState(NamedTuple):
    oid: int
    last_value: int | None  # None: the next nextval returns ``start``
    start: int


def snapshot(rows: Iterable[Sequence[object]]) -> tuple[SequenceState, ...]:
    """The rows of :data:`SNAPSHOT` as states."""
    return tuple(
        SequenceState(int(str(oid)), None if last is None else int(str(last)), int(str(start)))
        for oid, last, start in rows
    )


def _array(values: Iterable[int | None], kind: str) -> str:
    return "'{" + ",".join("NULL" if value is None else str(int(value)) for value in values) + "}'::" + kind + "[]"


def restore_sql(states: Sequence[SequenceState]) -> str | None:
    """One statement that sets back the sequences whose state differs from ``states`` (only those: a setval
    writes WAL), returning how many it set; None when there is no sequence. Literal arrays rather than
    parameters: it travels in one simple-protocol round trip with the rollback."""
    if not states:
        return None
    oids = _array((state.oid for state in states), "oid")
    lasts = _array((state.last_value for state in states), "int8")
    starts = _array((state.start for state in states), "int8")
    return (
        f"{INTERNAL}SELECT count(setval(s.seq, coalesce(s.last, s.start), s.last IS NOT NULL)) "
        f"FROM unnest({oids}, {lasts}, {starts}) AS s(seq, last, start) "
        "WHERE pg_sequence_last_value(s.seq) IS DISTINCT FROM s.last"
    )
