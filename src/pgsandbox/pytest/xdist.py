"""pytest-xdist: one sandbox (server and templates) for every worker.

The controller collects no tests, so it cannot know which need a database: it starts the sandbox when xdist
sets up the first worker. The workers learn the sandbox's description (admin DSN, template names) from a file in
a private directory (their ``workerinput`` says where), and each attaches to it as a session of its own
(``Sandbox.attach``): its own run id, role and databases.

Not in a thread while the workers start, though that saved 0.5 s: building templates compiles Python (pytest's
assertion rewriting of pgsandbox's modules, Alembic's env.py, python: migrations), and CPython 3.11 can fail
with "SystemError: AST constructor recursion depth mismatch" when two threads do that at once (seen here, 1 run
in 4). The file stays: it also carries a start-up error to every worker.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgsandbox.errors import ConnectError, PgSandboxError

if TYPE_CHECKING:
    from pgsandbox.sandbox import Sandbox
    from pgsandbox.settings import Settings
    from pgsandbox.template.base import Migrator

WAIT_SECONDS = 600.0  # the file is written before the workers start; this is for a controller that died


class SharedSandbox:
    """The controller's side: the sandbox, and the lines it printed while it started (shown once a worker has
    collected: xdist's own lines come first)."""

    def __init__(self, start: Callable[[Callable[[str], None]], Sandbox]) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="pgsandbox-xdist-"))  # 0700: the file holds the admin DSN
        self.path = self.directory / "sandbox.json"
        self.lines: list[str] = []
        self.sandbox: Sandbox | None = None
        self.error: PgSandboxError | None = None
        self._start_and_publish(start)

    def _start_and_publish(self, start: Callable[[Callable[[str], None]], Sandbox]) -> None:
        """Start the sandbox, and write its description (or the error) to the file the workers read."""
        payload: dict[str, Any]
        try:
            self.sandbox = start(self.lines.append)
            payload = self.sandbox.handoff()
        except PgSandboxError as error:
            self.error = error
            payload = {"error": str(error)}
        except Exception as error:  # the workers must hear of it, not wait for a file that never comes
            self.error = PgSandboxError(f"the xdist controller could not start the sandbox: {error!r}")
            payload = {"error": str(self.error)}
        staging = self.directory / "sandbox.json.partial"
        staging.write_text(json.dumps(payload))
        staging.chmod(0o600)
        staging.rename(self.path)  # atomic: a worker reads all of it or nothing

    @property
    def worker_input(self) -> dict[str, str]:
        return {"path": str(self.path)}

    def outcome(self) -> Sandbox | PgSandboxError:
        """The sandbox the controller started, or why it could not (it started in ``__init__``)."""
        if self.sandbox is not None:
            return self.sandbox
        assert self.error is not None
        return self.error

    def stop(self) -> None:
        try:
            result = self.outcome()
            if not isinstance(result, PgSandboxError):
                result.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def attach(
    worker_input: dict[str, Any],
    settings: Settings,
    migrators: tuple[Sequence[Migrator], Sequence[Migrator]] | None = None,
) -> Sandbox:
    """The worker's side: wait for the controller's sandbox, then attach to it (in schema isolation, migrating
    a schema of its own with ``migrators``: migrations, seed)."""
    import psycopg

    from pgsandbox.sandbox import Sandbox

    path = Path(worker_input["path"])
    deadline = time.monotonic() + WAIT_SECONDS
    delay = 0.005
    while not path.exists():
        if time.monotonic() > deadline or not path.parent.exists():
            raise PgSandboxError(
                f"the xdist controller did not start the sandbox within {WAIT_SECONDS:.0f} s.",
                "run once without -n to see what the start-up does, or look for a hung migration.",
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    description = json.loads(path.read_text())
    if "error" in description:
        raise PgSandboxError(description["error"])
    try:
        return Sandbox.attach(description, settings, migrators=migrators)
    except (ConnectError, psycopg.OperationalError) as error:
        # a server killed between the worker's connect and its role set-up fails a query, not the connect
        stopped = controller_server_stopped(description, error)
        if stopped is None:
            raise
        raise stopped from None


def controller_server_stopped(description: dict[str, Any], error: Exception) -> PgSandboxError | None:
    """Why a worker cannot reach the controller's local server, when it is because that server is not running
    any more: said with the end of its log, rather than as a connection string to check."""
    from pgsandbox.server import runs
    from pgsandbox.server.launch import log_tail

    if not description.get("run_dir"):
        return None
    run = runs.RunDir(Path(description["run_dir"]))
    if runs.postmaster_serving(run) is not None:
        return None  # it runs: the connection failed for another reason, which the error says
    tail = log_tail(run) if run.path.exists() else "    (its run directory is gone too)"
    what = (
        error.what
        if isinstance(error, ConnectError)
        else (str(error).strip().splitlines() or [type(error).__name__])[0]
    )
    return PgSandboxError(
        f"the xdist controller's local PostgreSQL server is no longer running, so this worker cannot use it "
        f"({what}).\n  The server's log ends with:\n{tail}",
        "a local server stops only when something kills it (kill -9, the out-of-memory killer, a full disk or "
        "/dev/shm): look at its log above, then run again.",
    )
