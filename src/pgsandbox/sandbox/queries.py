"""Count and list the statements a block of code runs: the ``pg_queries`` fixture, for N+1 tests.

Read from the local server's statement log, so every connection of the test counts, whatever library made
it (psycopg, psycopg2, asyncpg, SQLAlchemy, the app's own engine in database isolation). Transaction control
(BEGIN, COMMIT, SAVEPOINT...) is listed but not counted: it differs between isolation modes; nor is the
DEALLOCATE a client sends for its prepared statements.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pgsandbox.common.words import counted
from pgsandbox.server import statements
from pgsandbox.server.tags import RECORDED

if TYPE_CHECKING:
    from pgsandbox.sandbox import Database, Sandbox
    from pgsandbox.server.statements import Statement


class Recorded:
    """What a block ran: :attr:`statements` (counted), :attr:`all` (with transaction control and what the
    server said about the block's sessions), ``len()`` and iteration over the counted ones."""

    def __init__(self) -> None:
        self.all: list[Statement] = []
        self.complete = True

    @property
    def statements(self) -> list[Statement]:
        return [statement for statement in self.all if statement.counted]

    @property
    def count(self) -> int:
        return len(self.statements)

    @property
    def sql(self) -> list[str]:
        """The counted statements' SQL text, in order (parameters as ``$1``...)."""
        return [statement.sql for statement in self.statements]

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Statement]:
        return iter(self.statements)

    def __str__(self) -> str:
        return statements.report(self.all, limit=100, complete=self.complete)

    def __repr__(self) -> str:
        return f"<Recorded {counted(self.count, 'statement')}>"


class Queries:
    """``with pg_queries() as ran:`` records; ``pg_queries(3)`` also checks that the block ran exactly 3
    statements, ``pg_queries(at_most=3)`` at most 3; a wrong count fails listing them all."""

    def __init__(self, sandbox: Sandbox, db: Database) -> None:
        self._sandbox = sandbox
        self._db = db

    def __call__(self, count: int | None = None, *, at_most: int | None = None) -> Block:
        return Block(self._sandbox, self._db, count, at_most)


class Block:
    """One ``with pg_queries(...):`` block. A class rather than a generator: a failed count's traceback ends in
    the test's ``with`` line, not in pgsandbox's frames and contextlib's."""

    def __init__(self, sandbox: Sandbox, db: Database, count: int | None, at_most: int | None) -> None:
        self._sandbox, self._db, self._count, self._at_most = sandbox, db, count, at_most
        self._recorded = Recorded()
        self._start: Any = None

    def __enter__(self) -> Recorded:
        log = self._sandbox.server.statement_log
        _, self._start, _ = self._sandbox.diagnostics.sql_of(self._db, log.position() if log else None)
        return self._recorded

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        __tracebackhide__ = True  # pytest leaves this frame out of a failure's traceback
        if error is not None:
            return  # the block's own failure is the one to see (and the server may be what failed)
        recorded, count, at_most = self._recorded, self._count, self._at_most
        recorded.all, _, recorded.complete = self._sandbox.diagnostics.sql_of(self._db, self._start)
        limit = count if count is not None else at_most or 0
        expected = f"{'exactly' if count is not None else 'at most'} {counted(limit, 'statement')}"
        if (count is not None and recorded.count != count) or (at_most is not None and recorded.count > at_most):
            # a plain AssertionError, as a failed assert is; what it lists goes with it (pytest/report.py)
            failure = AssertionError(
                f"expected {expected}, the block ran {recorded.count} (transaction control not counted):\n{recorded}"
            )
            setattr(failure, RECORDED, recorded)
            raise failure
