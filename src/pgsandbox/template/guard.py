"""While a template is built, connections to any other database are refused where pgsandbox can see them.

An ``env.py`` or a ``python:`` migration that builds its engine from the app's own settings would otherwise
migrate the database those settings name (a real server), and the build would look like a success. The
guard is a check on the client libraries' connect entry points (common/connect_hooks.py: psycopg 3 sync and
async, psycopg2, asyncpg, and SQLAlchemy's ``do_connect``, which sees every dialect). A connection to a template
being built passes; any other raises :class:`ForeignConnection`, naming the target without its password. The
check goes when the last build ends.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from pgsandbox.common import connect_hooks
from pgsandbox.common.connect_hooks import Target
from pgsandbox.template.base import MigrationError

README_RECIPE = (
    'README, "Alembic with an async env.py": an env.py that builds its engine from the app\'s own setting must '
    "let pgsandbox's URL win"
)


class ForeignConnection(MigrationError):
    """A migration tried to connect to a database other than the template being built."""

    label = ""  # the migrator that tried


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.building: dict[str, str] = {}  # template name -> the label of the migrator building it
        self.remove: Callable[[], None] | None = None
        self.refused: list[ForeignConnection] = []


_state = _State()


@contextlib.contextmanager
def only_template(dbname: str, label: str) -> Iterator[list[ForeignConnection]]:
    """Refuse every connection but to ``dbname`` (and other templates being built) while the block runs.

    Yields the refusals, so that a caller can raise one the migration caught and swallowed."""
    refused: list[ForeignConnection] = []
    with _state.lock:
        if not _state.building:
            _state.remove = connect_hooks.install(check)
        _state.building[dbname] = label
        start = len(_state.refused)
    try:
        yield refused
    finally:
        with _state.lock:
            refused.extend(error for error in _state.refused[start:] if error.label == label)
            del _state.building[dbname]
            if not _state.building and _state.remove is not None:
                _state.remove()
                _state.remove = None
                _state.refused.clear()


def check(target: Target) -> None:
    """Raise :class:`ForeignConnection` unless ``target`` is a template being built."""
    with _state.lock:
        if not _state.building or target.dbname in _state.building:
            return
        label = next(reversed(_state.building.values()))
        template = next(reversed(_state.building))
        error = ForeignConnection(
            f"{label} tried to connect to {target.describe()} through {target.library} while pgsandbox was "
            f"building the template {template}. A migration may reach only the template, so that it cannot "
            "change another database (the one your app's settings name): pgsandbox refused the connection.",
            "make the migration connect where pgsandbox points it. Alembic: in env.py, "
            'url = config.attributes.get("pgsandbox_url", <your setting>), and build the engine from it '
            f"({README_RECIPE}); a python: migration or hook: use the connection it is given, or take a "
            "parameter named url, dsn or session.",
        )
        error.label = label
        _state.refused.append(error)
    raise error
