"""``database`` isolation: every test gets its own database, cloned from the template, dropped after.

Clones are made ahead by a background thread, with a connection already open to each (the first
connection to a new database builds its catalog caches: about 4 ms), so a test rarely waits. Used clones
are dropped by a second thread, after their connections are gone: ``DROP DATABASE`` otherwise sleeps 100 ms
waiting for a backend that is still exiting.
"""

from __future__ import annotations

import contextlib
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgsandbox.isolation.base import Begun, GuestConnections, Mode
from pgsandbox.isolation.findings import OWN_DB, Finding, clone_failed
from pgsandbox.isolation.guests import app_name
from pgsandbox.isolation.leftovers import end_left_open, end_prepared
from pgsandbox.server.admin import terminate_connections
from pgsandbox.server.base import Server
from pgsandbox.server.tags import INTERNAL

DEPTH = 2  # clones made ahead: enough to hide a create (~16 ms) behind a test, without hoarding memory
# Two CREATE DATABASE at once share their checkpoints: 13 ms per clone instead of 19 ms, measured here.
MAKERS = 2
CALIBRATION_SAMPLES = 2
GONE_WAIT_SECONDS = 2.0


@dataclass
class Clone:
    """A clone of the template made ahead for a test, with a connection already open to it (None when that
    connect failed: the test opens its own)."""

    name: str
    conn: psycopg.Connection[Any] | None


class DatabaseIsolation:
    """A clone of the template per test, from a :class:`ClonePool`; what the test left in it (connections,
    prepared transactions) is ended and said, and the clone dropped or kept (an
    :class:`~pgsandbox.isolation.base.Isolation`)."""

    mode: Mode = "database"
    first_clone = "the first database of a test"
    keeps_in_place = True  # a kept clone keeps its name

    def __init__(self, server: Server, template: str, strategies: Sequence[str], drop_at_close: bool = True) -> None:
        """``drop_at_close``: drop the clones left at :meth:`close` (not needed on a local server about to be
        removed)."""
        self.server = server
        self.pool = ClonePool(server, template, strategies)
        self._drop_at_close = drop_at_close
        self._given: dict[str, psycopg.Connection[Any]] = {}  # the connections opened ahead, by clone

    @property
    def created(self) -> int:
        return self.pool.created

    @property
    def dropped(self) -> int:
        return self.pool.dropped

    @property
    def timings(self) -> dict[str, list[float]]:
        """Seconds per CREATE DATABASE of the clones, by strategy."""
        return {strategy: list(times) for strategy, times in self.pool.timings.items()}

    def begin(self, test_id: str) -> Begun:
        clone = self.pool.acquire()
        if clone.conn is not None:
            clone.conn.autocommit = True  # one round trip, no transaction left open
            clone.conn.execute(INTERNAL + "SELECT set_config('application_name', %s, false)", [app_name(test_id)])
            clone.conn.autocommit = False
            self._given[clone.name] = clone.conn
        return Begun(clone.name, clone.conn)

    def end(
        self,
        test_id: str,
        dbname: str,
        *,
        guests: GuestConnections,
        ours: Collection[int] = (),
        keep_as: str | None = None,
        next_test_id: str | None = None,
    ) -> list[Finding]:
        """Close the connection given at :meth:`begin`, end what the test left, and drop the clone (or keep it:
        ``keep_as``, which is its own name)."""
        closed = {*guests.pids, *ours}
        conn = self._given.pop(dbname, None)
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                if not conn.closed:
                    closed.add(conn.info.backend_pid)
                conn.close()
        found = self._left_behind(test_id, dbname, closed)
        self.pool.release(dbname, keep=keep_as is not None)
        return found

    def _left_behind(self, test_id: str, dbname: str, ours: Collection[int]) -> list[Finding]:
        """Connections the test left open (terminated) and transactions it prepared (rolled back: they would
        keep its database from being dropped). One query in the common case, where there are neither."""
        admin = self.server.admin
        row = admin.execute(
            "SELECT pg_stat_get_db_numbackends(d.oid), "
            "(SELECT count(*) FROM pg_prepared_xact() p WHERE p.dbid = d.oid) FROM pg_database d WHERE datname = %s",
            [dbname],
        ).fetchone()
        found: list[Finding] = []
        if row and row[0]:
            found += end_left_open(admin, dbname, test_id, ours, OWN_DB)
        if row and row[1]:
            with self.server.connect(dbname, autocommit=True) as conn:
                found += end_prepared(conn, test_id, OWN_DB)
        return found

    def close(self) -> None:
        self.pool.close(drop_all=self._drop_at_close)
        self._close_given()

    def close_quietly(self) -> None:
        with contextlib.suppress(Exception):
            self.pool.close(drop_all=False)
        self._close_given()

    def _close_given(self) -> None:
        for conn in self._given.values():
            with contextlib.suppress(Exception):
                conn.close()
        self._given.clear()


def clone_strategies(version: tuple[int, int], setting: str, local: bool) -> list[str]:
    """Strategies for per-test clones (``setting``: pg_clone_strategy). A local server runs with fsync off, where
    FILE_COPY's checkpoints cost little (16 ms against 66 ms on tmpfs); on someone else's server the storage and
    settings are unknown, so the clone pool tries both and keeps the faster."""
    if version[0] < 15:
        return []
    if setting != "auto":
        return [setting.upper()]
    return ["FILE_COPY"] if local else ["FILE_COPY", "WAL_LOG"]


class ClonePool:
    def __init__(
        self,
        server: Server,
        template: str,
        strategies: Sequence[str],
        depth: int = DEPTH,
        makers: int = MAKERS,
    ) -> None:
        """``strategies``: CREATE DATABASE strategies to use; with several, the first clones try each and
        the fastest is kept (what wins depends on the server's storage and load). ``template``'s objects
        already belong to the tests' role (Sandbox._test_template)."""
        self.server = server
        self.template = template
        self.strategies = list(strategies)
        self.timings: dict[str, list[float]] = {strategy: [] for strategy in self.strategies}
        self.created = 0  # databases, for the session report
        self.dropped = 0
        self.depth = depth
        self._ready: deque[Clone] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._counter = 0
        self._drops: queue.Queue[str | None] = queue.Queue()
        self._kept: list[str] = []
        self._alive: set[str] = set()
        self._pending = 0  # clones being made
        self._makers = [
            threading.Thread(target=self._create_loop, name=f"pgsandbox-clone-maker-{n}", daemon=True)
            for n in range(makers)
        ]
        self._dropper = threading.Thread(target=self._drop_loop, name="pgsandbox-clone-dropper", daemon=True)
        for thread in (*self._makers, self._dropper):
            thread.start()

    # -- test side -------------------------------------------------------------------------------------
    def acquire(self) -> Clone:
        with self._cond:
            while not self._ready and self._error is None:
                self._cond.wait()
            if self._error is not None and not self._ready:
                raise clone_failed(self.template, self._error) from self._error
            clone = self._ready.popleft()
            self._cond.notify_all()
        return clone

    def release(self, name: str, keep: bool = False) -> None:
        if keep:
            self._kept.append(name)
        else:
            self._drops.put(name)

    @property
    def kept(self) -> list[str]:
        return list(self._kept)

    # -- background ------------------------------------------------------------------------------------
    def _create_loop(self) -> None:
        try:
            with self.server.connect(autocommit=True) as conn:
                while True:
                    with self._cond:
                        while len(self._ready) + self._pending >= self.depth and not self._closed:
                            self._cond.wait()
                        if self._closed:
                            return
                        self._counter += 1
                        self._pending += 1
                        name = self.server.database_name(f"t{self._counter}")
                        strategy = self.strategy()
                    clause = sql.SQL(" STRATEGY ") + sql.SQL(strategy) if strategy else None
                    statements = self.server.creation(name, self.template, clause)
                    started = time.perf_counter()
                    conn.execute(statements[0])
                    self._alive.add(name)
                    with self._cond:
                        self.created += 1
                    for statement in statements[1:]:
                        conn.execute(statement)
                    if strategy:
                        with self._cond:
                            self.timings[strategy].append(time.perf_counter() - started)
                    try:
                        test_conn: psycopg.Connection[Any] | None = psycopg.connect(self.server.login_dsn_for(name))
                    except psycopg.Error:
                        test_conn = None
                    with self._cond:
                        self._pending -= 1
                        self._ready.append(Clone(name, test_conn))
                        self._cond.notify_all()
        except BaseException as error:
            with self._cond:
                self._error = error
                self._cond.notify_all()

    def strategy(self) -> str | None:
        return pick_strategy(self.timings)

    def _drop_loop(self) -> None:
        with contextlib.suppress(psycopg.Error), self.server.connect(autocommit=True) as conn:
            while True:
                name = self._drops.get()
                if name is None:
                    return
                self._drop(conn, name)

    def _drop(self, conn: psycopg.Connection[Any], name: str) -> None:
        terminate_connections(conn, name, wait=GONE_WAIT_SECONDS)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        self._alive.discard(name)
        with self._cond:
            self.dropped += 1

    def close(self, drop_all: bool = True) -> None:
        """Stop the threads; drop the unused clones (and every used one still queued) unless ``drop_all``
        is false: a local server about to be removed does not need them dropped."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for maker in self._makers:
            maker.join()
        for clone in self._ready:
            if clone.conn is not None:
                clone.conn.close()
            self._drops.put(clone.name)
        self._ready.clear()
        if not drop_all:
            with contextlib.suppress(queue.Empty):
                while True:
                    self._drops.get_nowait()
        self._drops.put(None)
        self._dropper.join()
        if drop_all:
            # whatever the dropper could not drop (its connection failed): try once more from here
            for name in list(self._alive - set(self._kept)):
                with contextlib.suppress(psycopg.Error):
                    self.server.admin.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                    )


def pick_strategy(timings: dict[str, list[float]]) -> str | None:
    """The strategy for the next clone: each one tried twice, then the fastest by median."""
    if not timings:
        return None
    untried = [s for s, samples in timings.items() if len(samples) < CALIBRATION_SAMPLES]
    if untried:
        return min(untried, key=lambda s: len(timings[s]))
    return min(timings, key=lambda s: statistics.median(timings[s]))
