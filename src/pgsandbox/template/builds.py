"""The template cache: one database per hash of its inputs, built once under an advisory lock.

A template is named ``pgsandbox_tpl_<hash>``. Its builder holds an advisory lock so that concurrent
sessions, workers and machines sharing the server build it once and the others wait. It becomes a template
(``IS_TEMPLATE``, ``ALLOW_CONNECTIONS false``) only after every migration succeeded, so a half-built one is
never cloned, and no connection to it stays open: ``CREATE DATABASE ... TEMPLATE`` fails while anyone is
connected to its source. Every session holds a shared "in use" lock on its templates; pruning drops the
older templates of a project only when it can take that lock exclusively.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgsandbox._version import __version__
from pgsandbox.common.progress import Progress
from pgsandbox.common.urls import sqlalchemy_url
from pgsandbox.errors import ConfigError
from pgsandbox.server import roles
from pgsandbox.server.admin import lock_id, terminate_connections
from pgsandbox.server.base import Server
from pgsandbox.template import guard, reads
from pgsandbox.template.base import SETTING_OF_LAYER, Migrator, Target, fingerprint, naming_setting

PREFIX = "pgsandbox_tpl_"
LAYOUT = "2"  # bump when templates built by older versions must not be reused (2: objects handed over)
NO_CLAUSE = sql.SQL("")


@dataclass(frozen=True)
class Layer:
    """Migrators applied together on top of the previous layer: ``migrations``, then ``seed``."""

    kind: str
    migrators: tuple[Migrator, ...]


@dataclass
class TemplateInfo:
    layer: str
    name: str
    key: str  # hash of the inputs alone, the same on every server
    hit: bool = False
    seconds: float = 0.0
    labels: tuple[str, ...] = ()
    stale: tuple[str, ...] = ()  # files the previous build read that changed since: why it was rebuilt
    watched: tuple[str, ...] = ()  # files this build read beyond its inputs: a change to them rebuilds it
    handed_over: bool = False  # its objects belong to pgsandbox_owner (roles.py), not to the admin
    forced_by: str = ""  # built although the cache had it: pg_rebuild, or the layer it is built on

    @property
    def why_built(self) -> str:
        """Why it was built: what changed, a forced rebuild, or a cache miss."""
        if self.stale:
            return f"{', '.join(self.stale)} changed since the last build"
        return self.forced_by or "cache miss"

    @property
    def short_hash(self) -> str:
        return self.name.removeprefix(PREFIX)[:12]


@dataclass
class Chain:
    """The layers with their input hashes, computed before any server is involved."""

    layers: tuple[Layer, ...]
    keys: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        keys, parent = [], f"layout {LAYOUT}; pgsandbox {__version__}"
        for layer in self.layers:
            with naming_setting(SETTING_OF_LAYER.get(layer.kind, "pg_migrations")):
                parent = fingerprint(layer.migrators, layer.kind, parent)
            keys.append(parent)
        self.keys = tuple(keys)

    @property
    def final_key(self) -> str:
        return self.keys[-1]


def chain_of(migrations: Sequence[Migrator], seed: Sequence[Migrator]) -> Chain | None:
    """The layers of a session's templates (migrations, then seed; None when there is neither)."""
    layers = [Layer(kind, tuple(ms)) for kind, ms in (("migrations", migrations), ("seed", seed)) if ms]
    return Chain(tuple(layers)) if layers else None


def snapshot_keys(chain: Chain | None, rebuild: bool) -> list[str]:
    """The cached clusters a local server may start from, most complete first (none when rebuilding)."""
    return [] if rebuild or chain is None else list(reversed(chain.keys))


def _server_traits(server: Server, hand_over: bool) -> str:
    row = server.admin.execute(
        "SELECT pg_encoding_to_char(encoding), datcollate, datctype FROM pg_database WHERE datname = 'template0'"
    ).fetchone()
    # whether the objects are handed over to pgsandbox_owner (roles.py) depends on the admin's rights
    return json.dumps([server.version[0], *(row or ()), hand_over])


def template_name(key: str, traits: str) -> str:
    return PREFIX + hashlib.sha256(f"{key}\0{traits}".encode()).hexdigest()[:20]


def ensure_templates(
    server: Server,
    chain: Chain,
    *,
    project: str,
    rebuild: bool = False,
    keep: int = 3,
    clone_clause: sql.Composable = NO_CLAUSE,
    progress: Progress | None = None,
    root: Path | None = None,
) -> list[TemplateInfo]:
    """Make sure every layer's template exists on ``server``; build the missing ones (and those after them).

    A ready template whose build read a file that changed since (see ``reads.py``) is rebuilt; ``root``
    is what the recorded paths are relative to."""
    hand_over = roles.can_manage_roles(server.admin)
    traits = _server_traits(server, hand_over)
    infos: list[TemplateInfo] = []
    parent = "template0"
    rebuild_from_here = rebuild
    forced_by = "rebuild forced (pg_rebuild)" if rebuild else ""
    for layer, key in zip(chain.layers, chain.keys, strict=True):
        info = TemplateInfo(
            layer.kind,
            template_name(key, traits),
            key,
            labels=tuple(m.label for m in layer.migrators),
            handed_over=hand_over,
        )
        hold_in_use(server, info.name)
        ready = not rebuild_from_here and _state(server, info.name) == "ready"
        if ready:
            info.stale = tuple(reads.changed(_recorded_reads(server, info.name), root))
        if ready and not info.stale:
            info.hit = True
        else:
            force = rebuild_from_here or bool(info.stale)
            info.forced_by = forced_by if rebuild_from_here else ""
            with naming_setting(SETTING_OF_LAYER.get(layer.kind, "pg_migrations")):
                built = _build(server, layer, info, parent, project, force, clone_clause, progress, hand_over, root)
            if built and not rebuild:  # a rebuilt parent means its children are stale
                rebuild_from_here = True
                if info.stale or info.forced_by:  # else a new parent: its children are new too (their keys)
                    forced_by = f"its {layer.kind} template was rebuilt"
            if built and keep:
                prune(server, project, layer.kind, keep)
        infos.append(info)
        parent = info.name
    return infos


def hold_in_use(server: Server, name: str) -> None:
    """A shared lock for this session's lifetime: pruning by another session will not drop this template."""
    server.admin.execute("SELECT pg_advisory_lock_shared(%s)", [lock_id(name, "use")])


def _state(server: Server, name: str) -> str | None:
    row = server.admin.execute("SELECT datistemplate FROM pg_database WHERE datname = %s", [name]).fetchone()
    if row is None:
        return None
    return "ready" if row[0] else "partial"


@contextlib.contextmanager
def _build_lock(server: Server, info: TemplateInfo, progress: Progress | None) -> Iterator[None]:
    key = lock_id(info.name, "build")
    admin = server.admin
    row = admin.execute("SELECT pg_try_advisory_lock(%s)", [key]).fetchone()
    if not (row and row[0]):
        if progress:
            progress(f"waiting for another session building the {info.layer} template {info.short_hash}")
        admin.execute("SELECT pg_advisory_lock(%s)", [key])
    try:
        yield
    finally:
        admin.execute("SELECT pg_advisory_unlock(%s)", [key])


def _build(
    server: Server,
    layer: Layer,
    info: TemplateInfo,
    parent: str,
    project: str,
    rebuild: bool,
    clone_clause: sql.Composable,
    progress: Progress | None,
    hand_over: bool,
    root: Path | None = None,
) -> bool:
    """Build the template unless another session did while we waited; True when this session built it."""
    with _build_lock(server, info, progress):
        state = _state(server, info.name)
        if state == "ready" and not rebuild:
            info.hit = True
            return False
        if state is not None:
            _require_unused(server, info)
            drop_template(server, info.name)
        if progress:
            why = f": {', '.join(info.stale)} changed since it was built" if info.stale else ""
            progress(f"building the {info.layer} template {info.short_hash} ({', '.join(info.labels)}){why}")
        started = time.perf_counter()
        name = sql.Identifier(info.name)
        server.admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(name, sql.Identifier(parent)) + clone_clause
        )
        try:
            meta: dict[str, Any] = {
                "project": project,
                "layer": layer.kind,
                "created": time.time(),
                "labels": list(info.labels),
            }
            server.admin.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(name, sql.Literal(json.dumps(meta))))
            target = Target(
                info.name, server.dsn_for(info.name), sqlalchemy_url({**server.params, "dbname": info.name})
            )
            opened: set[str] = set()
            for migrator in layer.migrators:
                migrate_step(server, migrator, target, opened)
            files = reads.watched(opened, [p for m in layer.migrators for p in m.input_paths()])
            if files:
                meta["reads"] = reads.record(files, root)
                info.watched = tuple(meta["reads"])
                server.admin.execute(
                    sql.SQL("COMMENT ON DATABASE {} IS {}").format(name, sql.Literal(json.dumps(meta)))
                )
            with server.connect(info.name, autocommit=True) as conn:
                if hand_over:
                    with roles.changing_roles(server.admin):
                        roles.ensure_owner(server.admin)
                    roles.hand_over(conn)
                # frozen rows and fresh statistics, once, instead of hint-bit writes and guesses in every clone
                conn.execute("VACUUM (FREEZE, ANALYZE)")
            server.connect(info.name).close()  # see warm_relcache
            terminate_connections(server.admin, info.name)
            server.admin.execute(
                sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false").format(name)
            )
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                drop_template(server, info.name)
            raise
        info.seconds = time.perf_counter() - started
        return True


def migrate_step(server: Server, migrator: Migrator, target: Target, opened: set[str]) -> None:
    """One step, with connections elsewhere refused and the files it reads recorded; a step running the app's
    code must change something in the template (else it most likely migrated another database)."""
    if not migrator.runs_app_code:  # sql:, sqlalchemy: connect to the template only and read only their inputs
        migrator.migrate(target)
        return
    since = next_xid(server)
    refused: list[guard.ForeignConnection] = []
    try:
        with reads.recording() as read, guard.only_template(target.dbname, migrator.label) as refused:
            migrator.migrate(target)
        opened |= read
    except Exception as error:
        if refused and refused[0] is not error:  # the refusal, whatever a library or the migrator made of it
            raise refused[0] from None
        raise
    if refused:  # the migration caught the refusal and went on: it still tried to change another database
        raise refused[0]
    if not changed_since(server, target.dbname, since):
        migrator.unchanged(target)


def next_xid(server: Server) -> int:
    """The first transaction id not yet assigned on the server: what a step writes carries one at least as new."""
    row = server.admin.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetchone()
    return int(row[0]) if row else 0


def changed_since(server: Server, dbname: str, xid: int) -> bool:
    """Whether a transaction since ``xid`` wrote to ``dbname``'s catalogs (DDL, grants, comments) or to a row
    of its tables (data), those the admin may read (pg_statistic is a superuser's; schema isolation shares the
    database with others' tables): every new tuple version carries its writer's transaction id (``xmin``), a deleted
    one its deleter's (``xmax``); ``age()`` compares them with ``xid`` across 32-bit wraparound. The catalogs
    of a template being built are small (a few ms); tables are read only when the catalogs did not change
    (a seed), and ``EXISTS`` stops at the first new row."""
    since = sql.Literal(str(xid % 2**32))
    new = sql.SQL("age(xmin) <= age({0}::xid) OR (xmax <> '0'::xid AND age(xmax) <= age({0}::xid))").format(since)
    with server.connect(dbname, autocommit=True) as conn:
        catalogs = conn.execute(
            "SELECT c.oid::regclass::text FROM pg_class c WHERE c.relnamespace = 'pg_catalog'::regnamespace "
            "AND c.relkind = 'r' AND NOT c.relisshared AND has_table_privilege(c.oid, 'SELECT')"
        ).fetchall()
        tables = conn.execute(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
            "AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_(catalog$|toast|temp_)' "
            "AND has_table_privilege(c.oid, 'SELECT')"
        ).fetchall()
        for group in (catalogs, tables):
            if not group:
                continue
            exists = [sql.SQL("EXISTS (SELECT FROM {} WHERE {})").format(sql.SQL(table), new) for (table,) in group]
            row = conn.execute(sql.SQL("SELECT ") + sql.SQL(" OR ").join(exists)).fetchone()
            if row and row[0]:
                return True
    return False


def _recorded_reads(server: Server, name: str) -> dict[str, str]:
    row = server.admin.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", [name]
    ).fetchone()
    try:
        recorded = json.loads(row[0] or "{}").get("reads") if row else None
    except (ValueError, AttributeError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def warm_relcache(server: Server, name: str) -> None:
    """Have PostgreSQL write the template's relation cache file (``pg_internal.init``) by connecting once.

    Clones copy it, so their first connection skips rebuilding it (about 4 ms instead of 10). A restart
    deletes these files, so a private (local) server warms its template at every start; on a shared
    server the connection would make concurrent clones fail, and the build's own connection wrote it.
    """
    ident = sql.Identifier(name)
    server.admin.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(ident))
    try:
        server.connect(name).close()
        terminate_connections(server.admin, name)
    finally:
        server.admin.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(ident))


def _require_unused(server: Server, info: TemplateInfo) -> None:
    """Before dropping a template for a rebuild: nobody else may be using it (we hold a shared lock too)."""
    key = lock_id(info.name, "use") & 0xFFFFFFFFFFFFFFFF
    row = server.admin.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND mode = 'ShareLock' AND granted "
        "AND pid <> pg_backend_pid() AND classid = %s::bigint::oid AND objid = %s::bigint::oid AND objsubid = 1",
        [key >> 32, key & 0xFFFFFFFF],
    ).fetchone()
    if row and row[0] and info.stale:
        raise ConfigError(
            f"cannot rebuild the {info.layer} template {info.name}: its build read {', '.join(info.stale)}, which "
            f"changed since, and {row[0]} other session(s) are using it.",
            "list the file(s) in pg_migrations_inputs: then each version gets a template of its own (sessions on a "
            "shared server may differ); or let the other sessions finish and run again.",
        )
    if row and row[0]:
        raise ConfigError(
            f"cannot rebuild the {info.layer} template {info.name}: {row[0]} other session(s) are using it.",
            "let them finish (or stop them), then run with --pg-rebuild again.",
        )


def drop_template(server: Server, name: str) -> None:
    if not name.startswith(PREFIX):  # never touch what pgsandbox did not name
        raise ConfigError(f"refusing to drop {name!r}: not a pgsandbox template.", "")
    ident = sql.Identifier(name)
    with contextlib.suppress(psycopg.errors.InvalidCatalogName):
        server.admin.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(ident))
    server.admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


def list_templates(server: Server) -> list[dict[str, Any]]:
    rows = server.admin.execute(
        "SELECT datname, datistemplate, shobj_description(oid, 'pg_database') FROM pg_database "
        "WHERE datname LIKE 'pgsandbox\\_tpl\\_%' ORDER BY datname"
    ).fetchall()
    templates = []
    for name, ready, comment in rows:
        try:
            meta = json.loads(comment or "{}")
        except ValueError:
            meta = {}
        templates.append({"name": name, "ready": ready, **meta})
    return templates


def prune(server: Server, project: str, layer: str, keep: int) -> list[str]:
    """Drop this project's older templates of one layer beyond the newest ``keep``, unless in use."""
    mine = [t for t in list_templates(server) if t.get("project") == project and t.get("layer") == layer and t["ready"]]
    mine.sort(key=lambda t: float(t.get("created") or 0), reverse=True)
    dropped = []
    for template in mine[keep:]:
        key = lock_id(template["name"], "use")
        row = server.admin.execute("SELECT pg_try_advisory_lock(%s)", [key]).fetchone()
        if not (row and row[0]):
            continue
        try:
            drop_template(server, template["name"])
            dropped.append(template["name"])
        except psycopg.Error:
            pass
        finally:
            server.admin.execute("SELECT pg_advisory_unlock(%s)", [key])
    return dropped


def release(server: Server, infos: Sequence[TemplateInfo]) -> None:
    for info in infos:
        with contextlib.suppress(psycopg.Error):
            server.admin.execute("SELECT pg_advisory_unlock_shared(%s)", [lock_id(info.name, "use")])
