"""What a test's teardown found: a :class:`Finding` (a kind, counted by the session report, and a text, warned
about or failed on), the texts themselves, written once for both isolation modes, and :class:`IsolationError`,
raised when a test's writes escaped. No server here: the texts are plain functions of what was found."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pgsandbox.errors import PgSandboxError
from pgsandbox.server.admin import Session

# kinds, as the session report names and counts them
ESCAPED = "commits that escaped the rollback"
LEFT_OPEN = "connections left open"
IDLE_IN_TRANSACTION = "sessions left idle in transaction"
ADVISORY = "advisory locks left held"
PREPARED = "prepared transactions left"
OUTSIDE = "objects created outside the test's database"
LOGGING_CHANGED = "server logging changed"

# where a test's leftovers were: what the texts say
SESSION_DB = "the session database"
OWN_DB = "its database"
# a left-open connection in transaction mode: why it matters there, and what to use instead
TRANSACTION_ADVICE = (
    " In transaction mode only the connections pgsandbox gives (pg, pg_conn, pg_session, "
    "pg_asyncpg...) are rolled back: use those, or isolation='database'."
)


@dataclass(frozen=True)
class Finding:
    """Something a test left or changed that its isolation does not undo, which pgsandbox undid."""

    kind: str
    text: str

    def __str__(self) -> str:
        return self.text


class IsolationError(PgSandboxError):
    """A test broke its isolation (a commit escaped the rollback); the database was restored."""


def left_open(test_id: str, sessions: Sequence[Session], where: str, advice: str = "") -> list[Finding]:
    """Connections a test left open on ``where`` (pgsandbox terminates them): those idle in a transaction they
    never ended apart, as they also held locks and a snapshot."""
    idle = [session for session in sessions if session.idle_in_transaction]
    other = [session for session in sessions if not session.idle_in_transaction]
    findings: list[Finding] = []
    if idle:
        findings.append(
            Finding(
                IDLE_IN_TRANSACTION,
                f"{test_id} left {len(idle)} session(s) idle in transaction on {where} "
                f"({'; '.join(map(str, idle))}): a transaction was begun and never committed or rolled back (its "
                "locks and snapshot were held until then); pgsandbox terminated them." + advice,
            )
        )
    if other:
        findings.append(
            Finding(
                LEFT_OPEN,
                f"{test_id} left {len(other)} connection(s) open to {where} ({'; '.join(map(str, other))}); "
                "pgsandbox terminated them." + advice,
            )
        )
    return findings


def prepared_left(test_id: str, gids: Sequence[str], where: str) -> Finding:
    """Transactions a test prepared (PREPARE TRANSACTION outlives its session, and a rollback): rolled back."""
    why = ", where PREPARE TRANSACTION outlives the test's rollback" if where == SESSION_DB else ""
    return Finding(
        PREPARED,
        f"{test_id} left {len(gids)} prepared transaction(s) ({', '.join(gids)}) in {where}{why}; "
        "pgsandbox rolled them back.",
    )


def advisory_left(test_id: str, count: int) -> Finding:
    return Finding(
        ADVISORY,
        f"{test_id} left {count} advisory lock(s) held on its connection (pg_advisory_lock without "
        "pg_advisory_unlock; a rollback does not release session-level locks); pgsandbox released them.",
    )


def created_outside(test_id: str, names: str, outcome: str) -> Finding:
    """Databases, roles or tablespaces (``names``) a test created on the server; ``outcome``: what pgsandbox did."""
    return Finding(
        OUTSIDE,
        f"{test_id} created {names} on the server, outside its database, where neither a rollback nor a "
        f"dropped clone undoes it; {outcome}. Create such objects in a migration (template), or drop them "
        "in the test's own teardown.",
    )


def logging_changed(test_id: str, settings: Sequence[str]) -> Finding:
    return Finding(
        LOGGING_CHANGED,
        f"{test_id} changed the server's logging with ALTER SYSTEM ({', '.join(settings)}), which pgsandbox's "
        "statement log needs (the SQL of failed tests, pg_queries); pgsandbox reset it (ALTER SYSTEM RESET, "
        "pg_reload_conf()). To run the local server with other settings, use pg_server_settings "
        "(--pg-server-settings name=value) rather than a test.",
    )


def escaped(
    test_id: str,
    changes: Sequence[str],
    *,
    own: bool,
    guests: Sequence[str] = (),
    committed: Sequence[str] = (),
    others: bool = False,
    restored: str = "pgsandbox cloned the session database again from the template",
    own_connections: str = "use @pytest.mark.pg(isolation='database')",
) -> IsolationError:
    """A test's committed writes escaped its transaction, changing ``changes``: through its ``own`` connection,
    its driver connections (``guests``, by label) whose transaction a COMMIT replaced, connections of its outside
    any transaction that ``committed`` (pg_admin), or ``others`` on the session database."""
    causes = []
    if own:
        causes.append("its transaction was ended by a COMMIT (or END) statement run on the test's connection")
    causes.extend(
        f"the transaction of its {label} connection was ended by a COMMIT (or END) statement" for label in guests
    )
    causes.extend(f"its {label} connection, outside the test's transaction, committed" for label in committed)
    if others:
        causes.append("another connection to the session database committed")
    return IsolationError(
        f"{test_id} committed outside its transaction, so its writes escaped the rollback: "
        + "; ".join(causes)
        + ".\n  Changed: "
        + ", ".join(changes)
        + f".\n  {restored}: the next test starts clean.",
        "call conn.commit() on the connection pgsandbox gave you (it becomes a savepoint) instead of running "
        f"COMMIT; for code that opens its own connections, {own_connections}.",
    )


def session_db_dropped(test_id: str, dropped: str, fresh: str) -> IsolationError:
    return IsolationError(
        f"the session database {dropped} was dropped during {test_id} (DROP DATABASE through another "
        "connection, such as pg_server.connect() or a framework's own teardown); pgsandbox cloned a new one "
        f"from the template ({fresh}): the next test starts clean.",
        "leave the session database to pgsandbox; a test that drops its database needs one of its own: "
        "@pytest.mark.pg(isolation='database').",
    )


def clone_failed(template: str, error: BaseException) -> PgSandboxError:
    return PgSandboxError(
        f"pgsandbox could not clone the template {template}: {type(error).__name__}: {error}",
        "check the server's log; if the template was dropped by hand, run again (it is rebuilt).",
    )


# -- scoped data (pg_module, pg_class, pg_package, pg_session_data) ------------------------------------------
SCOPED_FIXTURES = "pg_module, pg_class, pg_package or pg_session_data"


def scope_lost(test_id: str, scope_id: str, reason: str) -> IsolationError:
    """A test (or a scoped fixture) ended the transaction that held a scope's data: the tests left in that scope
    would run without it."""
    return IsolationError(
        f"{test_id} cannot run inside the data of {scope_id}: it is gone, because {reason}. The data made once for "
        "that scope lived in the session database's open transaction, which was ended.",
        "keep the session database's transaction open: call conn.commit() on the connection pgsandbox gave you "
        "(it becomes a savepoint) instead of running COMMIT or ROLLBACK, and give code that must really commit "
        "@pytest.mark.pg(isolation='database') in a module without scoped data.",
    )


def scope_of_other_mode(test_id: str, mode: str, scope_id: str) -> IsolationError:
    """A test (or a scope) in one isolation inside scoped data made in the other, whose databases do not have it."""
    other = "transaction" if mode == "database" else "database"
    where = (
        "the session database's open transaction, which a database clone would not have"
        if other == "transaction"
        else "a database of its own, which the session database does not have"
    )
    return IsolationError(
        f"{test_id} asks for {mode} isolation, but it runs inside the data that {scope_id} made once in "
        f"{other} isolation ({where}).",
        f"give it {other} isolation like its scope (@pytest.mark.pg(isolation={other!r})), or move it to a module "
        f"(or class) that uses no {SCOPED_FIXTURES}.",
    )


def not_kept_in_schema(test_id: str) -> Finding:
    return Finding(
        "failed databases not kept",
        f"{test_id} failed, but its data was not kept (keep_failed): in schema isolation the tests share the "
        "session's schema, which keeping would commit for the tests after it. Use transaction or database "
        "isolation on a server where the role may create databases to keep it.",
    )


def not_kept_in_scope(test_id: str, scope_id: str) -> Finding:
    return Finding(
        "failed databases not kept",
        f"{test_id} failed, but its database was not kept (keep_failed): it ran inside the data of {scope_id}, "
        "which keeping would commit and end for the scope's other tests. Run the test alone (-k) to keep it.",
    )
