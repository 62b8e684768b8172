"""``database`` isolation: every test gets its own database, cloned from the template, dropped after.

Clones are made ahead by a background thread, with a connection already open to each (the first
connection to a new database builds its catalog caches: about 4 ms), so a test rarely waits. Used clones
are dropped by a second thread, after their connections are gone: ``DROP DATABASE`` otherwise sleeps 100 ms
waiting for a backend that is still exiting. On PostgreSQL 15+, a third thread recycles a
used clone instead when its statistics counters say it holds only rows and sequence values the test wrote
(recycle.py): undone in a few milliseconds, against 25 for a drop and a new clone.
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
from pgsandbox.isolation.recycle import (
    NotRecyclable,
    Pristine,
    State,
    fresh_state,
    plan_restore,
    read_pristine,
    read_state,
    restore,
)
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

    def __init__(
        self,
        server: Server,
        template: str,
        strategies: Sequence[str],
        drop_at_close: bool = True,
        recycle: bool | None = None,
    ) -> None:
        """``drop_at_close``: drop the clones left at :meth:`close` (not needed on a local server about to be
        removed). ``recycle``: undo a used clone's writes rather than drop it (recycle.py); by default on
        PostgreSQL 15+ when the tests log in as their own role (never a superuser) and the admin is a superuser
        (checked by the recycling thread, with track_counts)."""
        self.server = server
        if recycle is None:
            recycle = server.version >= (15, 0) and server.login is not None
        self.pool = ClonePool(server, template, strategies, recycle=recycle)
        self._drop_at_close = drop_at_close
        self._given: dict[str, psycopg.Connection[Any]] = {}  # the connections opened ahead, by clone

    @property
    def created(self) -> int:
        return self.pool.created

    @property
    def dropped(self) -> int:
        return self.pool.dropped

    @property
    def recycled(self) -> int:
        """Used clones given to another test after their writes were undone."""
        return self.pool.recycled

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
        # what the admin did there is not for the counters to judge (it may switch them off)
        self.pool.release(dbname, keep=keep_as is not None, recyclable="pg_admin" not in guests.committing)
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
        recycle: bool = False,
    ) -> None:
        """``strategies``: CREATE DATABASE strategies to use; with several, the first clones try each and
        the fastest is kept (what wins depends on the server's storage and load). ``template``'s objects
        already belong to the tests' role (Sandbox._test_template). ``recycle``: used clones go to a recycling
        thread first (recycle.py), and are dropped only when it cannot undo what their test did."""
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
        self.recycled = 0
        self.replaced: deque[str] = deque(maxlen=100)  # why the last used clones were not recycled
        self._recycle = recycle
        self._recycling = 0  # used clones waiting for the recycler or in its hands
        self._recycles: queue.Queue[str | None] = queue.Queue()
        self._baselines: dict[str, State] = {}  # a clone's counters when it was handed out
        self._pristine: Pristine | None = None  # read from the first clone, before any test had it
        self._reading_pristine = False
        self._makers = [
            threading.Thread(target=self._create_loop, name=f"pgsandbox-clone-maker-{n}", daemon=True)
            for n in range(makers)
        ]
        self._dropper = threading.Thread(target=self._drop_loop, name="pgsandbox-clone-dropper", daemon=True)
        self._recycler = threading.Thread(target=self._recycle_loop, name="pgsandbox-clone-recycler", daemon=True)
        for thread in (*self._makers, self._dropper, *([self._recycler] if recycle else [])):
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

    def release(self, name: str, keep: bool = False, recyclable: bool = True) -> None:
        if keep:
            self._kept.append(name)
        elif self._recycle and recyclable and name in self._baselines:
            with self._cond:
                self._recycling += 1
            self._recycles.put(name)
        else:
            self._baselines.pop(name, None)
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
                        while len(self._ready) + self._pending + self._recycling >= self.depth and not self._closed:
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
                    if self._recycle:
                        self._note_fresh(conn, name)
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

    # -- recycling ---------------------------------------------------------------------------------------
    def _note_fresh(self, conn: psycopg.Connection[Any], name: str) -> None:
        """Record a new clone's counters (a new database has none of its relations') and, for the first, what
        every clone holds. Any failure: this clone is not recycled (and, for the first, none is)."""
        try:
            with self._cond:
                first = not self._reading_pristine
                self._reading_pristine = True
            if first:
                with self.server.connect(name, autocommit=True) as clone_conn:
                    pristine = read_pristine(clone_conn)
                if not _gone(conn, name):
                    raise NotRecyclable("the connection that read the template's state did not leave")
                self._pristine = pristine
            self._baselines[name] = fresh_state(conn, name)
        except (psycopg.Error, NotRecyclable):
            self._baselines.pop(name, None)

    def _recycle_loop(self) -> None:
        """Recycle what tests released (or drop it); its connection outliving every test proves the server did
        not restart after a crash, which would have reset the counters."""
        try:
            conn = self.server.connect(autocommit=True)
            row = conn.execute(
                "SELECT current_setting('track_counts')::bool AND rolsuper FROM pg_roles WHERE rolname = current_user"
            ).fetchone()
            usable = bool(row and row[0])
        except psycopg.Error:
            conn, usable = None, False
        while True:
            name = self._recycles.get()
            if name is None:
                break
            clone = None
            if usable and conn is not None and not self._closed:
                try:
                    clone = self._recycled(conn, name)
                except psycopg.OperationalError:
                    usable = False  # the server restarted, or our connection went: nothing is known any more
            with self._cond:
                self._recycling -= 1
                if clone is not None:
                    self.recycled += 1
                    self._ready.append(clone)
                self._cond.notify_all()
            if clone is None:
                self._baselines.pop(name, None)
                self._drops.put(name)
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def _recycled(self, conn: psycopg.Connection[Any], name: str) -> Clone | None:
        """``name`` as its template made it, with the connection that checked and restored it open for its next
        test; None: drop it. ``conn``: the recycler's own, to the admin database."""
        before = self._baselines.pop(name, None)
        pristine = self._pristine
        if before is None or pristine is None:
            return None
        # the test's backends flush their counters as they exit, before they leave pg_stat_activity
        if not _gone(conn, name):
            return None
        try:
            test_conn = psycopg.connect(self.server.login_dsn_for(name), autocommit=True)
        except psycopg.Error:
            return None
        try:
            after, sequences = read_state(test_conn, conn, pristine)
            plan = plan_restore(pristine, before, after, sequences)
            if plan.empty:
                baseline = after
            else:
                restore(test_conn, pristine, plan, before)  # its counters flushed before it answers
                baseline, _ = read_state(test_conn, conn)
            test_conn.autocommit = False
        except (psycopg.Error, NotRecyclable) as error:
            self.replaced.append(f"{name}: {type(error).__name__}: {error}")
            with contextlib.suppress(psycopg.Error):
                test_conn.close()
            conn.execute("SELECT")  # the recycler's connection is alive (else: raise, recycle no more)
            return None
        self._baselines[name] = baseline
        return Clone(name, test_conn)

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
        if self._recycle:
            self._recycles.put(None)
            self._recycler.join()
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


def _gone(conn: psycopg.Connection[Any], name: str) -> bool:
    """End every connection to ``name`` (a finished test's or ours) and say whether they all left in time."""
    terminate_connections(conn, name, wait=GONE_WAIT_SECONDS)
    row = conn.execute("SELECT count(*) = 0 FROM pg_stat_activity WHERE datname = %s", [name]).fetchone()
    return bool(row and row[0])


def pick_strategy(timings: dict[str, list[float]]) -> str | None:
    """The strategy for the next clone: each one tried twice, then the fastest by median."""
    if not timings:
        return None
    untried = [s for s, samples in timings.items() if len(samples) < CALIBRATION_SAMPLES]
    if untried:
        return min(untried, key=lambda s: len(timings[s]))
    return min(timings, key=lambda s: statistics.median(timings[s]))
