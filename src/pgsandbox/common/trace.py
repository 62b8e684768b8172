"""Where a run's start-up and end go: named moments on the system's monotonic clock, written as JSON lines to the
file ``PGSANDBOX_TRACE`` names when the process exits (``bench/timeline.py`` reads them next to the moment it
spawned pytest). Off, and free, unless that variable is set: :func:`mark` is then one test of a constant."""

from __future__ import annotations

import atexit
import json
import os
import threading
import time

TRACE_ENV = "PGSANDBOX_TRACE"

_path = os.environ.get(TRACE_ENV) or None
_marks: list[tuple[float, str, str]] = []


def enabled() -> bool:
    return _path is not None


def mark(moment: str) -> None:
    """Record ``moment`` (say "server: copied") with the time and the thread it happened in."""
    if _path is not None:
        _marks.append((time.monotonic(), threading.current_thread().name, moment))


def _write() -> None:
    if _path is None or not _marks:
        return
    with open(_path, "a", encoding="utf-8") as out:
        for at, thread, moment in _marks:
            out.write(json.dumps({"pid": os.getpid(), "at": at, "thread": thread, "moment": moment}) + "\n")


if _path is not None:
    atexit.register(_write)
