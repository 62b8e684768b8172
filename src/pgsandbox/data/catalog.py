"""What the data factories know of the schema: tables, columns, types, keys and checks, read from the catalogs.

Read once per template (the schema every test starts from) and kept with it: in memory for the session, and in
the cache directory under the template's name, which is a hash of everything that made it. A table the template
does not have (one a test created) is read from the test's own connection when first asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgsandbox.errors import PgSandboxError

LAYOUT = 2  # bump when what is read changes: cached catalogs of another layout are read again


Query = Callable[[str, list[Any]], list[tuple[Any, ...]]]  # runs a catalog query, returns its rows


class UnknownTable(PgSandboxError):
    """``pg.insert`` named a table the database does not have."""


@dataclass(frozen=True)
class PgType:
    oid: int
    name: str  # as SQL writes it, qualified when not on the search path
    typname: str  # the bare name in pg_type (int4, varchar, ...)
    kind: str  # pg_type.typtype: b base, e enum, d domain, r range, c composite, m multirange, p pseudo
    category: str  # pg_type.typcategory: N numeric, S string, A array, D date/time...
    elem: int = 0  # an array's element type
    base: int = 0  # a domain's base type
    base_typmod: int = -1  # a domain's typmod on its base type (varchar(20) under a domain)
    not_null: bool = False  # a domain declared NOT NULL
    labels: tuple[str, ...] = ()  # an enum's labels, in order
    checks: tuple[str, ...] = ()  # a domain's CHECK constraints (pg_get_constraintdef)


@dataclass(frozen=True)
class Column:
    name: str
    type: int
    typmod: int
    sql_type: str  # format_type(type, typmod): what a value is cast to
    not_null: bool
    has_default: bool
    identity: str = ""  # 'a' always, 'd' by default
    generated: str = ""  # 's': GENERATED ALWAYS AS (...) STORED

    @property
    def required(self) -> bool:
        """A value must be given or made: NOT NULL with nothing to fill it."""
        return self.not_null and not self.has_default and not self.identity and not self.generated

    @property
    def writable(self) -> bool:
        return self.generated == "" and self.identity != "a"


@dataclass(frozen=True)
class ForeignKey:
    name: str
    columns: tuple[str, ...]
    table: str  # the referenced table's key (schema.name)
    references: tuple[str, ...]


@dataclass(frozen=True)
class Check:
    name: str
    definition: str  # pg_get_constraintdef: CHECK ((price > (0)::numeric))
    columns: tuple[str, ...]


def quoted(name: str) -> str:
    """``name`` as an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...] = ()
    uniques: tuple[tuple[str, ...], ...] = ()
    foreign_keys: tuple[ForeignKey, ...] = ()
    checks: tuple[Check, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def identifier(self) -> str:
        return f"{quoted(self.schema)}.{quoted(self.name)}"

    @functools.cached_property
    def _by_name(self) -> dict[str, Column]:
        return {column.name: column for column in self.columns}

    @functools.cached_property
    def _unique(self) -> frozenset[str]:
        return frozenset(self.primary_key).union(*self.uniques)

    def column(self, name: str) -> Column | None:
        return self._by_name.get(name)

    def unique(self, column: str) -> bool:
        """Whether ``column`` is part of the primary key or of a unique constraint or index."""
        return column in self._unique


@dataclass
class Catalog:
    tables: dict[str, Table] = field(default_factory=dict)  # by schema.name
    types: dict[int, PgType] = field(default_factory=dict)
    search_path: tuple[str, ...] = ("public",)

    def find(self, name: str) -> Table | None:
        """``schema.table``, or a bare name looked up along the search path, then in any schema if only one
        has it."""
        if "." in name:
            return self.tables.get(name)
        for schema in self.search_path:
            if f"{schema}.{name}" in self.tables:
                return self.tables[f"{schema}.{name}"]
        found = [table for table in self.tables.values() if table.name == name]
        return found[0] if len(found) == 1 else None

    def type(self, oid: int) -> PgType:
        return self.types[oid]

    # -- the cache file --------------------------------------------------------------------------------
    def dump(self) -> str:
        return json.dumps({"layout": LAYOUT, **dataclasses.asdict(self)})

    @classmethod
    def load(cls, text: str) -> Catalog | None:
        data = json.loads(text)
        if data.get("layout") != LAYOUT:
            return None
        tables = {
            key: Table(
                schema=t["schema"],
                name=t["name"],
                columns=tuple(Column(**c) for c in t["columns"]),
                primary_key=tuple(t["primary_key"]),
                uniques=tuple(tuple(u) for u in t["uniques"]),
                foreign_keys=tuple(
                    ForeignKey(f["name"], tuple(f["columns"]), f["table"], tuple(f["references"]))
                    for f in t["foreign_keys"]
                ),
                checks=tuple(Check(c["name"], c["definition"], tuple(c["columns"])) for c in t["checks"]),
            )
            for key, t in data["tables"].items()
        }
        types = {
            int(oid): PgType(**{**t, "labels": tuple(t["labels"]), "checks": tuple(t["checks"])})
            for oid, t in data["types"].items()
        }
        return cls(tables, types, tuple(data["search_path"]))


_TABLES = """
SELECT c.oid, n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp%%'
  {only}
"""
_COLUMNS = """
SELECT a.attrelid, a.attname, a.atttypid, a.atttypmod, format_type(a.atttypid, a.atttypmod),
       a.attnotnull, a.atthasdef, a.attidentity::text, a.attgenerated::text
FROM pg_attribute a
WHERE a.attrelid = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""
_CONSTRAINTS = """
SELECT k.conrelid, k.contype::text, k.conname,
       ARRAY(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY u(n, i)
             JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.i),
       k.confrelid,
       ARRAY(SELECT a.attname FROM unnest(k.confkey) WITH ORDINALITY u(n, i)
             JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.n ORDER BY u.i),
       pg_get_constraintdef(k.oid)
FROM pg_constraint k
WHERE k.conrelid = ANY(%s) AND k.contype IN ('p', 'u', 'f', 'c')
UNION ALL
SELECT i.indrelid, 'i', c.relname,
       ARRAY(SELECT a.attname FROM unnest(i.indkey::int2[]) WITH ORDINALITY u(n, j)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = u.n ORDER BY u.j),
       0, ARRAY[]::name[], ''
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
WHERE i.indrelid = ANY(%s) AND i.indisunique AND i.indexprs IS NULL AND i.indpred IS NULL
  AND NOT EXISTS (SELECT FROM pg_constraint k WHERE k.conindid = i.indexrelid)
"""
_TYPES = """
SELECT t.oid, format_type(t.oid, NULL), t.typname, t.typtype::text, t.typcategory::text, t.typelem,
       t.typbasetype, t.typtypmod, t.typnotnull,
       ARRAY(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder),
       ARRAY(SELECT pg_get_constraintdef(k.oid) FROM pg_constraint k
             WHERE k.contypid = t.oid AND k.contype = 'c' ORDER BY k.conname)
FROM pg_type t WHERE t.oid = ANY(%s)
"""


def read(query: Query, only: str | None = None) -> Catalog:
    """The catalog of the database ``query`` runs on (``only``: one table, schema-qualified or bare)."""
    condition, params = "", []
    if only is not None:
        condition = "AND c.oid = to_regclass(%s)"
        params = [only]
    rows = query(_TABLES.format(only=condition), params)
    names = {int(oid): (str(schema), str(name)) for oid, schema, name in rows}
    oids = list(names)
    columns: dict[int, list[Column]] = {oid: [] for oid in oids}
    for relid, name, typ, typmod, sql_type, not_null, has_default, identity, generated in query(_COLUMNS, [oids]):
        columns[int(relid)].append(
            Column(
                str(name),
                int(typ),
                int(typmod),
                str(sql_type),
                bool(not_null),
                bool(has_default),
                identity or "",
                generated or "",
            )
        )
    keys: dict[int, dict[str, Any]] = {oid: {"p": (), "u": [], "f": [], "c": []} for oid in oids}
    referenced: set[int] = set()
    for relid, kind, name, cols, ref, refcols, definition in query(_CONSTRAINTS, [oids, oids]):
        entry = keys[int(relid)]
        cols = tuple(str(c) for c in cols)
        if kind == "p":
            entry["p"] = cols
        elif kind in ("u", "i"):
            entry["u"].append(cols)
        elif kind == "f":
            entry["f"].append((str(name), cols, int(ref), tuple(str(c) for c in refcols)))
            referenced.add(int(ref))
        else:
            entry["c"].append(Check(str(name), str(definition), cols))
    missing = sorted(referenced - set(names))
    if missing:  # a table outside the schemas read (or of another table when reading one)
        for oid, schema, name in query(
            "SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE c.oid = ANY(%s)",
            [missing],
        ):
            names[int(oid)] = (str(schema), str(name))
    types = _types(query, {c.type for cols in columns.values() for c in cols})
    for oid, cols in columns.items():  # a domain declared NOT NULL makes its columns so
        columns[oid] = [dataclasses.replace(c, not_null=True) if _not_null(types, c.type) else c for c in cols]
    tables = {}
    for oid in oids:
        schema, name = names[oid]
        entry = keys[oid]
        foreign = tuple(
            ForeignKey(fk_name, cols, ".".join(names[ref]), refcols) for fk_name, cols, ref, refcols in entry["f"]
        )
        tables[f"{schema}.{name}"] = Table(
            schema, name, tuple(columns[oid]), entry["p"], tuple(entry["u"]), foreign, tuple(entry["c"])
        )
    search_path = tuple(str(row[0]) for row in query("SELECT unnest(current_schemas(false))", []))
    return Catalog(tables, types, search_path)


def _not_null(types: dict[int, PgType], oid: int) -> bool:
    pgtype = types.get(oid)
    while pgtype is not None and pgtype.kind == "d":
        if pgtype.not_null:
            return True
        pgtype = types.get(pgtype.base)
    return False


def _types(query: Query, wanted: set[int]) -> dict[int, PgType]:
    """The types of the columns, and the types those are made of (array elements, domain bases)."""
    found: dict[int, PgType] = {}
    while wanted:
        for row in query(_TYPES, [sorted(wanted)]):
            oid, name, typname, kind, category, elem, base, base_typmod, not_null, labels, checks = row
            found[int(oid)] = PgType(
                int(oid),
                str(name),
                str(typname),
                str(kind),
                str(category),
                int(elem),
                int(base),
                int(base_typmod),
                bool(not_null),
                tuple(labels),
                tuple(checks),
            )
        wanted = {t.elem for t in found.values() if t.elem} | {t.base for t in found.values() if t.base}
        wanted -= set(found)
        wanted.discard(0)
    return found


# -- kept with the template --------------------------------------------------------------------------
_memory: dict[str, Catalog] = {}


def for_template(template: str, cache_dir: Path | None, query: Query) -> Catalog:
    """The catalog of ``template`` (every database cloned from it has the same): from memory, the cache
    directory, or read through ``query`` (a connection to a clone) and stored in both."""
    found = _memory.get(template)
    path = cache_dir / f"{template}.json" if cache_dir else None
    stored = path is not None and path.is_file()
    if found is None and path is not None and stored:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            found = Catalog.load(path.read_text())
    if found is None:
        found = read(query)
    # also when this process knew it already: from a session on another cache directory
    if path is not None and not stored:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".partial") as out:
                out.write(found.dump())
            os.replace(out.name, path)  # another process may write the same: whole files only
    _memory[template] = found
    return found
