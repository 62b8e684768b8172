"""What a test changed in a database, found when one of its commits may have escaped: rows per table (and those
written since the test began) and catalog objects created, dropped or altered, against a fresh clone of the
template. Forensics: it explains an escape, it isolates nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pgsandbox.common.words import counted
from pgsandbox.server.base import Server
from pgsandbox.server.tags import INTERNAL, OURS_PREFIX


@dataclass(frozen=True)
class Contents:
    """Rows per table, those written from a transaction id on, and the number of relations: enough to say what a
    test changed."""

    rows: dict[str, int] = field(default_factory=dict)
    relations: int = 0
    written: dict[str, int] = field(default_factory=dict)


def contents(conn: psycopg.Connection[Any], since_xid: int = 0) -> Contents:
    """Count the rows of every table, and those inserted or updated by transactions from ``since_xid`` on, in one
    scan per table (autocommit connection). Only run when an escape is suspected."""
    tables = conn.execute(
        "SELECT format('%I.%I', n.nspname, c.relname) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' ORDER BY 1"
    ).fetchall()
    rows: dict[str, int] = {}
    written: dict[str, int] = {}
    since = sql.Literal(since_xid % (1 << 32))
    for start in range(0, len(tables), 200):
        chunk = [t[0] for t in tables[start : start + 200]]
        query = sql.SQL(" UNION ALL ").join(
            sql.SQL("SELECT {}, count(*), count(*) FILTER (WHERE xmin::text::bigint >= {}) FROM {}").format(
                sql.Literal(name), since, sql.SQL(name)
            )
            for name in chunk
        )
        for name, count, new in conn.execute(query).fetchall():
            rows[name], written[name] = count, new
    relations = conn.execute("SELECT count(*) FROM pg_class").fetchone()
    return Contents(rows, int(relations[0]) if relations else 0, written)


# What else a commit can leave in a database: the objects of its catalogs (a function, a schema, a view, a
# trigger, a policy, a grant...). A clone keeps the template's object ids, so the session database and a fresh
# clone are compared by (catalog, oid), and only what differs is named. Only user objects (oid >=
# FirstNormalObjectId), not those PostgreSQL made as part of another (a dependency of type internal: a table's
# row type, a view's rule, a range's constructors) or of an extension (which is named), and not the temporary
# schemas a connection leaves behind nor what is in them (``temp``).
_OBJECT_CATALOGS: tuple[tuple[str, str], ...] = (
    # (pg_user_mapping is not here: only superusers may read it)
    ("pg_namespace", "t.oid NOT IN (SELECT oid FROM temp)"),
    ("pg_class", "relnamespace NOT IN (SELECT oid FROM temp)"),
    ("pg_proc", "pronamespace NOT IN (SELECT oid FROM temp)"),
    ("pg_type", "typnamespace NOT IN (SELECT oid FROM temp)"),
    ("pg_constraint", "connamespace NOT IN (SELECT oid FROM temp)"),
    ("pg_collation", "collnamespace NOT IN (SELECT oid FROM temp)"),
    *(
        (catalog, "true")
        for catalog in (
            *("pg_trigger", "pg_policy", "pg_rewrite", "pg_attrdef", "pg_event_trigger", "pg_operator"),
            *("pg_opclass", "pg_opfamily", "pg_cast", "pg_conversion", "pg_ts_config", "pg_ts_dict"),
            *("pg_ts_parser", "pg_ts_template", "pg_extension", "pg_publication", "pg_statistic_ext"),
            *("pg_default_acl", "pg_foreign_data_wrapper", "pg_foreign_server"),
            *("pg_language", "pg_am", "pg_transform", "pg_largeobject_metadata"),
        )
    ),
)
_CLASS_OF = {"pg_largeobject_metadata": "pg_largeobject"}  # the class pg_identify_object knows them by
_OBJECT_ROWS = (
    INTERNAL
    + "WITH temp AS (SELECT oid FROM pg_namespace WHERE nspname LIKE 'pg\\_temp\\_%' OR nspname LIKE 'pg\\_toast%') "
    + " UNION ALL ".join(
        f"SELECT '{_CLASS_OF.get(catalog, catalog)}'::regclass::oid, t.oid, t.xmin::text::bigint "
        f"FROM {catalog} t WHERE t.oid >= 16384 AND {condition}"
        for catalog, condition in _OBJECT_CATALOGS
    )
)
_IDENTIFY = (
    INTERNAL + "SELECT s.classid, s.objid, o.type, o.identity, "
    "EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = s.classid AND d.objid = s.objid "
    "AND d.deptype IN ('i', 'e')), p.type, p.identity "
    "FROM unnest(%s::oid[], %s::oid[]) s(classid, objid) "
    "CROSS JOIN LATERAL pg_identify_object(s.classid, s.objid, 0) o "
    # the object it goes with (an index or a sequence with its table, a default with its column's table)
    "LEFT JOIN LATERAL (SELECT r.type, r.identity "
    "FROM pg_depend d, pg_identify_object(d.refclassid, d.refobjid, 0) r "
    "WHERE d.classid = s.classid AND d.objid = s.objid AND d.deptype = 'a' LIMIT 1) p ON true"
)
MAX_NAMED = 30  # objects named in a message; the rest are counted

CatalogRow = tuple[int, int]  # (catalog, oid)
ObjectKey = tuple[str, str]  # (type, identity), as pg_identify_object gives them


@dataclass(frozen=True)
class Described:
    """An object of the catalogs, named."""

    key: ObjectKey
    made_with_another: bool  # PostgreSQL made it as part of another object, or it is an extension's
    part_of: ObjectKey | None  # the object it goes with (an index with its table...)


def catalog_rows(conn: psycopg.Connection[Any]) -> dict[CatalogRow, int]:
    """The database's user objects, with the transaction that last wrote each one's catalog row (its raw
    ``xmin``, which freezing keeps: the same in every clone of a template). Only run when an escape is
    suspected (autocommit connection)."""
    return {(int(classid), int(objid)): int(xid) for classid, objid, xid in conn.execute(_OBJECT_ROWS).fetchall()}


def identify_objects(conn: psycopg.Connection[Any], rows: list[CatalogRow]) -> list[Described]:
    """What the objects of ``rows`` are (in ``conn``'s database), in one query."""
    if not rows:
        return []
    found = conn.execute(_IDENTIFY, [[r[0] for r in rows], [r[1] for r in rows]]).fetchall()
    return [
        Described((str(kind), str(identity)), bool(made_with), (str(of_kind), str(of)) if of_kind else None)
        for _, _, kind, identity, made_with, of_kind, of in found
    ]


def object_changes(now: psycopg.Connection[Any], then: psycopg.Connection[Any], tables: set[str]) -> list[str]:
    """Objects created, dropped or altered (its catalog row written again: another ``xmin`` than the template's)
    in ``now``'s database compared with ``then``'s (a fresh clone); not those created or dropped with the object
    they go with, nor the ``tables`` whose rows already say so. About 10 ms for 50 tables (550 objects)."""
    rows_now, rows_then = catalog_rows(now), catalog_rows(then)
    came = [row for row in rows_now if row not in rows_then]
    went = [row for row in rows_then if row not in rows_now]
    altered = [row for row, xid in rows_now.items() if row in rows_then and xid != rows_then[row]]
    created = {d.key: d for d in identify_objects(now, came) if not d.made_with_another}
    dropped = {d.key: d for d in identify_objects(then, went) if not d.made_with_another}
    changed = {d.key for d in identify_objects(now, altered) if not d.made_with_another}
    changed |= set(created) & set(dropped)  # dropped and made again
    new_or_gone = set(created) | set(dropped)
    found = []
    for key in sorted(new_or_gone | changed):
        kind, identity = key
        if key in changed:
            found.append(f"{kind} {identity} (altered)")
            continue
        part_of = (created.get(key) or dropped[key]).part_of
        if (kind == "table" and identity in tables) or (part_of is not None and part_of in new_or_gone):
            continue  # its rows, or the object it goes with, say so
        found.append(f"{kind} {identity} ({'created' if key in created else 'dropped'})")
    return found


def what_changed(server: Server, current_db: str, fresh: str, since_xid: int) -> list[str]:
    """What differs between ``current_db`` and ``fresh``, a clone of the template: rows, and catalog
    objects (functions, schemas, views...). Both are read as the admin, who may read what an escaped
    commit made (a table pg_admin created) and whom row-level security does not hide rows from."""
    # the second is named: its end (the database may be dropped as it exits) is not the test's in the log
    with (
        server.connect(fresh, autocommit=True) as pristine,
        server.connect(current_db, autocommit=True, application_name=OURS_PREFIX) as current,
    ):
        then = contents(pristine)
        now = contents(current, since_xid)
        objects = object_changes(current, pristine, set(now.rows) | set(then.rows))
    found: list[str] = []
    for table in sorted(set(now.rows) | set(then.rows)):
        before, after = then.rows.get(table), now.rows.get(table)
        if before is None:
            found.append(f"{table} (created, {counted(after or 0, 'row')})")
        elif after is None:
            found.append(f"{table} (dropped)")
        else:
            written = now.written[table]
            if after != before or written:
                delta = counted(after - before, "row", signed=True) if after != before else "same row count"
                found.append(f"{table} ({delta}, {counted(written, 'row')} written)")
    found += objects
    if not found and now.relations != then.relations:
        found.append(f"the schema ({now.relations - then.relations:+d} relations)")
    if len(found) > MAX_NAMED:
        found[MAX_NAMED:] = [f"and {len(found) - MAX_NAMED} more"]
    return found
