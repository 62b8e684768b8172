"""What runs that died left on a shared server: their databases and roles, found and dropped.

Every run holds a session-level advisory lock for its lifetime (``Server._hold_run_lock``) and names what it
creates ``pgsandbox_<run id>_...``; its databases carry a comment saying when the run started. A run whose
lock is free is gone (the server released the lock with its connection): its databases and role are stale
once the run started longer ago than the grace period. Kept databases (of failed tests) stay unless asked.
Schema isolation's schemas (``pgsandbox_<run id>_schema``, in the database the admin connects to) go too.
Nothing whose name does not match the run pattern is ever touched: not the templates (``pgsandbox_tpl_``,
pruned by the template cache), not ``pgsandbox_owner``, not anyone else's.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pgsandbox.server.admin import lock_id, terminate_connections
from pgsandbox.server.runs import remove_run_dirs, search_bases

RUN_NAME = re.compile(r"^pgsandbox_([0-9a-f]{8})_")


@dataclass
class Run:
    run_id: str
    databases: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    schemas: list[str] = field(default_factory=list)  # schema isolation's, in the admin's database
    started: float | None = None  # from the comments; None when nothing says
    host: str = ""
    pid: int | None = None

    def describe(self, now: float) -> str:
        age = f"started {now - self.started:.0f} s ago" if self.started is not None else "start unknown"
        where = f" on {self.host} (pid {self.pid})" if self.host else ""
        return f"run {self.run_id}{where}, {age}"


def _label(comment: str | None) -> dict[str, Any]:
    if not comment:
        return {}
    with contextlib.suppress(ValueError):
        value = json.loads(comment)
        if isinstance(value, dict):
            return value
    return {}


def runs_on(admin: psycopg.Connection[Any]) -> dict[str, Run]:
    """Every run that has databases or roles on this server, by run id."""
    found: dict[str, Run] = {}
    rows = admin.execute(
        "SELECT 'database', datname, shobj_description(oid, 'pg_database') FROM pg_database "
        "WHERE datname LIKE 'pgsandbox\\_%' "
        "UNION ALL SELECT 'role', rolname, shobj_description(oid, 'pg_authid') FROM pg_roles "
        "WHERE rolname LIKE 'pgsandbox\\_%' "
        "UNION ALL SELECT 'schema', nspname, obj_description(oid, 'pg_namespace') FROM pg_namespace "
        "WHERE nspname LIKE 'pgsandbox\\_%'"
    ).fetchall()
    for kind, name, comment in rows:
        match = RUN_NAME.match(name)
        if not match:
            continue
        run = found.setdefault(match.group(1), Run(match.group(1)))
        label = _label(comment)
        if kind == "role":
            run.roles.append(name)
        elif kind == "schema":
            run.schemas.append(name)
        else:
            (run.kept if label.get("kept") else run.databases).append(name)
        if label.get("started") is not None:
            started = float(label["started"])
            if run.started is None or started < run.started:
                run.started, run.host, run.pid = started, str(label.get("host", "")), label.get("pid")
    return found


def alive(admin: psycopg.Connection[Any], run_id: str) -> bool:
    """Whether the run still holds its lock (taking it for a moment tells)."""
    key = lock_id(run_id, "run")
    row = admin.execute("SELECT pg_try_advisory_lock(%s)", [key]).fetchone()
    if row and row[0]:
        admin.execute("SELECT pg_advisory_unlock(%s)", [key])
        return False
    return True


def stale_runs(
    admin: psycopg.Connection[Any], grace_seconds: float, own_run: str | None = None, now: float | None = None
) -> list[Run]:
    """Runs that are gone and started longer than ``grace_seconds`` ago (or whose start nobody recorded)."""
    now = time.time() if now is None else now
    stale = []
    for run in runs_on(admin).values():
        if run.run_id == own_run or alive(admin, run.run_id):
            continue
        if grace_seconds > 0 and run.started is not None and now - run.started < grace_seconds:
            continue
        stale.append(run)
    return sorted(stale, key=lambda run: run.run_id)


def drop_dead_runs(
    admin: psycopg.Connection[Any],
    runs: list[Run],
    include_kept: bool = False,
    say: Callable[[str], None] | None = None,
) -> list[str]:
    """Drop the databases (kept ones too with ``include_kept``) and roles of ``runs``; return what was dropped."""
    dropped: list[str] = []
    for run in runs:
        done = []
        for name in [*run.databases, *(run.kept if include_kept else [])]:
            terminate_connections(admin, name)
            with contextlib.suppress(psycopg.Error):
                admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
                done.append(name)
        for name in run.schemas:
            with contextlib.suppress(psycopg.Error):
                admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
                done.append(name)
        if not run.kept or include_kept:  # otherwise its role still owns the kept databases
            for name in run.roles:
                with contextlib.suppress(psycopg.Error):
                    admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
                    done.append(name)
        if not run.kept or include_kept:  # its secrets (passfile.py) go with the last of its databases
            remove_run_dirs(run.run_id, search_bases())
        if say and done:
            say(f"reaped what {run.describe(time.time())} left behind: {', '.join(done)}")
        dropped += done
    return dropped
