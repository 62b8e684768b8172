"""A valid value for a column of any supported type, as the text PostgreSQL reads it, the same on every run.

Values are made from the column's name, a token of the test's seed and a counter kept per column for the test:
two rows of one test never get the same value in a column (which is what unique columns need), and the same
test gets the same values on every run. Simple CHECK constraints (bounds, lists of allowed values, lengths)
are read and kept; what a check says beyond that is left to the server, whose refusal is explained.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal

from pgsandbox.data.catalog import Catalog, PgType
from pgsandbox.errors import PgSandboxError

MAX_LENGTH_TEXT = 40  # a made-up text stays readable


class CannotFill(PgSandboxError):
    """A required column whose value pgsandbox cannot make: the message says why and how to pass it."""


@dataclass
class Bounds:
    """What simple CHECK constraints allow a column (or a domain's VALUE)."""

    low: Decimal | None = None
    low_inclusive: bool = True
    high: Decimal | None = None
    high_inclusive: bool = True
    choices: list[str] | None = None
    min_length: int = 0
    max_length: int | None = None
    not_equal: set[str] = field(default_factory=set)
    understood: bool = True  # False: a check on this column says more than pgsandbox reads

    def merge(self, other: Bounds) -> None:
        if other.low is not None and (self.low is None or other.low > self.low):
            self.low, self.low_inclusive = other.low, other.low_inclusive
        if other.high is not None and (self.high is None or other.high < self.high):
            self.high, self.high_inclusive = other.high, other.high_inclusive
        if other.choices is not None:
            self.choices = [c for c in self.choices if c in other.choices] if self.choices else other.choices
        self.min_length = max(self.min_length, other.min_length)
        if other.max_length is not None:
            self.max_length = other.max_length if self.max_length is None else min(self.max_length, other.max_length)
        self.not_equal |= other.not_equal
        self.understood = self.understood and other.understood


# -- CHECK constraints -----------------------------------------------------------------------------------
_CAST = re.compile(r"::(?:\"[^\"]+\"|[\w.]+)(?:\s+\w+)*(?:\(\d+(?:,\s*\d+)?\))?(?:\[\])?")
_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][\w$]*)'
_CONSTANT = r"(?:-?\d+(?:\.\d+)?|'(?:[^']|'')*')"
_COMPARE = re.compile(rf"^({_IDENT}) (>=|<=|>|<|=|<>|!=) ({_CONSTANT})$")
_COMPARE_REVERSED = re.compile(rf"^({_CONSTANT}) (>=|<=|>|<|=|<>|!=) ({_IDENT})$")
_LENGTH = re.compile(rf"^(?:char_length|length|character_length)\(({_IDENT})\) (>=|<=|>|<|=|<>) (\d+)$")
_NOT_BLANK = re.compile(rf"^(?:btrim|trim|lower|upper)\(({_IDENT})\) <> ''$")
_ANY = re.compile(rf"^({_IDENT}) = ANY \(+ARRAY\[(.*)\]\)+$")
_NOT_NULL = re.compile(rf"^({_IDENT}) IS NOT NULL$")
_FLIP = {">": "<", "<": ">", ">=": "<=", "<=": ">=", "=": "=", "<>": "<>", "!=": "!="}


def _unparen(text: str) -> str:
    text = text.strip()
    while text.startswith("(") and text.endswith(")") and _balanced(text[1:-1]):
        text = text[1:-1].strip()
    return text


def _depths(text: str) -> list[int | None]:
    """The parenthesis depth at each character of ``text``, None inside a string literal."""
    depths: list[int | None] = []
    depth, quoted = 0, False
    for char in text:
        if char == "'":
            quoted = not quoted
        elif not quoted and char == "(":
            depth += 1
        elif not quoted and char == ")":
            depth -= 1
        depths.append(None if quoted else depth)
    return depths


def _balanced(text: str) -> bool:
    depths = [d for d in _depths(text) if d is not None]
    return all(d >= 0 for d in depths) and (not depths or depths[-1] == 0)


def _split_and(text: str) -> list[str]:
    depths = _depths(text)
    cuts = [i for i in range(len(text)) if depths[i] == 0 and text.startswith(" AND ", i)]
    bounds = [0, *(cut for i in cuts for cut in (i, i + 5)), len(text)]
    return [_unparen(text[bounds[k] : bounds[k + 1]]) for k in range(0, len(bounds), 2)]


def _name(ident: str) -> str:
    return ident[1:-1].replace('""', '"') if ident.startswith('"') else ident


def _constant(text: str) -> str:
    return text[1:-1].replace("''", "'") if text.startswith("'") else text


def bounds_from_checks(definitions: list[str], column: str) -> Bounds:
    """What the CHECK constraints ``definitions`` (as pg_get_constraintdef writes them) say of ``column``
    (``VALUE`` for a domain)."""
    bounds = Bounds()
    for definition in definitions:
        body = definition.strip()
        body = body[len("CHECK ") :] if body.startswith("CHECK ") else body
        body = _CAST.sub("", _unparen(body.replace(" NOT VALID", "")))
        for term in _split_and(_unparen(body)):
            term = re.sub(rf"(?<![\w$])\(({_IDENT}|{_CONSTANT})\)", r"\1", term)  # (price) > (0): price > 0
            _read_term(term, column, bounds)
    return bounds


def _read_term(term: str, column: str, bounds: Bounds) -> None:
    if (match := _NOT_NULL.match(term)) and _name(match[1]) == column:
        return
    if (match := _NOT_BLANK.match(term)) and _name(match[1]) == column:
        bounds.min_length = max(bounds.min_length, 1)
        return
    if (match := _LENGTH.match(term)) and _name(match[1]) == column:
        op, number = match[2], int(match[3])
        if op in (">", ">="):
            bounds.min_length = max(bounds.min_length, number + (op == ">"))
        elif op in ("<", "<="):
            limit = number - (op == "<")
            bounds.max_length = limit if bounds.max_length is None else min(bounds.max_length, limit)
        elif op == "=":
            bounds.min_length = bounds.max_length = number
        return
    if (match := _ANY.match(term)) and _name(match[1]) == column:
        items = re.findall(_CONSTANT, match[2])
        bounds.merge(Bounds(choices=[_constant(item) for item in items]))
        return
    match = _COMPARE.match(term)
    if match and _name(match[1]) == column:
        _compare(bounds, match[2], match[3])
        return
    match = _COMPARE_REVERSED.match(term)
    if match and _name(match[3]) == column:
        _compare(bounds, _FLIP[match[2]], match[1])
        return
    mentioned = re.findall(_IDENT, re.sub(_CONSTANT, "", term))
    if column in (_name(m) for m in mentioned):
        bounds.understood = False


def _compare(bounds: Bounds, op: str, constant: str) -> None:
    value = _constant(constant)
    if op in ("<>", "!="):
        bounds.not_equal.add(value)
        if value == "":
            bounds.min_length = max(bounds.min_length, 1)
        return
    if op == "=":
        bounds.merge(Bounds(choices=[value]))
        return
    try:
        number = Decimal(value)
    except ArithmeticError:
        bounds.understood = False
        return
    if op in (">", ">="):
        bounds.merge(Bounds(low=number, low_inclusive=op == ">="))
    else:
        bounds.merge(Bounds(high=number, high_inclusive=op == "<="))


# -- values ------------------------------------------------------------------------------------------------
INTEGERS = {"int2": 32767, "int4": 2147483647, "int8": 9223372036854775807, "oid": 4294967295}
FLOATS = ("float4", "float8")
TEXTS = ("text", "varchar", "bpchar", "name", "citext")
BASE_DATE = date(2024, 1, 1)


@dataclass
class Maker:
    """Makes the values of one test: ``seed`` (the test id, or ``pg_data_seed`` and the test id) decides them."""

    catalog: Catalog
    seed: str
    counters: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(self.seed.encode()).digest()
        self.token = digest[:3].hex()  # in every made-up text: another seed, other values
        self.offset = int.from_bytes(digest[3:6], "big") % 9000 + 1000

    def next(self, key: str) -> int:
        number = self.counters.get(key, 0) + 1
        self.counters[key] = number
        return number

    def value(self, table: str, column: str, type_oid: int, typmod: int, unique: bool, checks: list[str]) -> str:
        """The text of a value for ``table.column``; ``unique``: distinct from every other made in this test."""
        number = self.next(f"{table}.{column}")
        bounds = bounds_from_checks(checks, column) if checks else Bounds()
        return self._make(f"{table}.{column}", column, type_oid, typmod, unique, number, bounds)

    def _make(
        self, where: str, column: str, type_oid: int, typmod: int, unique: bool, number: int, bounds: Bounds
    ) -> str:
        pgtype = self.catalog.type(type_oid)
        if pgtype.kind == "d":  # a domain: its base type, within the domain's own checks too
            bounds.merge(bounds_from_checks(list(pgtype.checks), "VALUE"))
            base_typmod = pgtype.base_typmod if typmod < 0 else typmod
            return self._make(where, column, pgtype.base, base_typmod, unique, number, bounds)
        if bounds.choices is not None:
            allowed = [c for c in bounds.choices if c not in bounds.not_equal]
            if not allowed:
                raise CannotFill(f"{where}: its CHECK constraints allow no value pgsandbox can see.", "")
            if unique and number > len(allowed):
                raise CannotFill(
                    f"{where} is unique and its CHECK constraint allows only {len(allowed)} value(s); this test "
                    f"already used them all.",
                    "",
                )
            return allowed[(number - 1) % len(allowed)] if unique else allowed[0]
        if pgtype.kind == "e":
            labels = list(pgtype.labels)
            if unique and number > len(labels):
                raise CannotFill(f"{where} is unique and its enum {pgtype.name} has only {len(labels)} labels.", "")
            return labels[(number - 1) % len(labels)] if unique else labels[0]
        if pgtype.category == "A" and pgtype.elem:
            element = self._make(where, column, pgtype.elem, -1, unique, number, Bounds())
            return "{" + json.dumps(element) + "}"  # a quoted array element: JSON's string quoting is the same
        if pgtype.kind == "r":
            return "empty"  # every range type has it
        return self._base(where, column, pgtype, typmod, unique, number, bounds)

    def _base(
        self, where: str, column: str, pgtype: PgType, typmod: int, unique: bool, number: int, bounds: Bounds
    ) -> str:
        name = pgtype.typname
        if name in INTEGERS:
            return str(self._number(where, unique, number, bounds, Decimal(INTEGERS[name]), scale=0))
        if name == "numeric":
            precision, scale = ((typmod - 4) >> 16) & 0xFFFF, (typmod - 4) & 0xFFFF
            limit = Decimal(10) ** (precision - scale) - 1 if typmod >= 4 else Decimal(10**9)
            return str(self._number(where, unique, number, bounds, limit, scale=scale if typmod >= 4 else 2))
        if name in FLOATS or name == "money":
            return str(self._number(where, unique, number, bounds, Decimal(10**9), scale=2))
        if name == "bool":
            if unique and number > 2:
                raise CannotFill(f"{where} is a unique boolean: this test already used both values.", "")
            return "true" if number % 2 else "false"
        if name in TEXTS or pgtype.category == "S":
            length = typmod - 4 if name in ("varchar", "bpchar") and typmod >= 4 else None
            return self._text(where, column, number, bounds, length)
        if name == "uuid":
            digest = hashlib.sha256(f"{self.seed}:{where}:{number}".encode()).digest()
            return str(uuid.UUID(bytes=digest[:16], version=4))
        if name == "date":
            return (BASE_DATE + timedelta(days=self.offset % 365 + number)).isoformat()
        if name in ("timestamp", "timestamptz"):
            moment = datetime(2024, 1, 1, 12) + timedelta(days=self.offset % 365, minutes=number)
            return moment.isoformat(sep=" ") + ("+00" if name == "timestamptz" else "")
        if name in ("time", "timetz"):
            return f"{(9 + number // 60) % 24:02d}:{number % 60:02d}:00" + ("+00" if name == "timetz" else "")
        if name == "interval":
            return f"{number} minutes"
        if name in ("json", "jsonb"):
            return json.dumps({column: f"{self.token}-{number}"})
        if name == "bytea":
            return "\\x" + f"{self.token}{number:06x}"
        if name in ("inet", "cidr"):
            return f"10.{(self.offset >> 8) % 256}.{number // 256 % 256}.{number % 256}" + (
                "/32" if name == "cidr" else ""
            )
        if name in ("macaddr", "macaddr8"):
            octets = [
                0x02,
                int(self.token[:2], 16),
                int(self.token[2:4], 16),
                number >> 16 & 255,
                number >> 8 & 255,
                number & 255,
            ]
            return ":".join(f"{o:02x}" for o in octets + ([0, 0] if name == "macaddr8" else []))
        if name in ("bit", "varbit"):
            length = typmod if typmod > 0 else 8
            return format(number % (1 << length), f"0{length}b") if name == "bit" else format(number, "b")
        if name == "xml":
            return f"<{column}>{self.token}-{number}</{column}>"
        if name == "tsvector":
            return f"{column} {self.token}"
        raise CannotFill(
            f"{where} is of type {pgtype.name}, which pgsandbox cannot make a value of.",
            "",
        )

    def _number(self, where: str, unique: bool, number: int, bounds: Bounds, limit: Decimal, scale: int) -> Decimal:
        low, high = -limit, limit
        if bounds.low is not None:
            low = max(low, bounds.low if bounds.low_inclusive else bounds.low + _step(scale))
        if bounds.high is not None:
            high = min(high, bounds.high if bounds.high_inclusive else bounds.high - _step(scale))
        start = max(low, Decimal(1)) if low <= 1 <= high or low > 1 else low
        span = high - start
        if unique:
            base = Decimal(self.offset) if span > self.offset + 10**6 else Decimal(0)
            value = start + base + number - 1
        else:
            value = start + (number - 1) % 100 if span >= 100 else start
        while str(value.quantize(_step(scale))) in bounds.not_equal:
            value += 1
        if value > high or value < low:
            raise CannotFill(
                f"{where}: no {'unique ' if unique else ''}value left between {low} and {high} (this test's "
                f"{number}th).",
                "",
            )
        return value.quantize(_step(scale))

    def _text(self, where: str, column: str, number: int, bounds: Bounds, length: int | None) -> str:
        most = min(x for x in (length, bounds.max_length, MAX_LENGTH_TEXT) if x is not None)
        suffix = f"-{self.token}-{number}"
        text = f"{column}{suffix}"
        if len(text) > most:
            text = f"{column[: max(most - len(suffix), 1)]}{suffix}"
        if len(text) > most:
            text = f"{column[: max(most - len(str(number)) - 1, 1)]}-{number}"
        if len(text) > most:  # a short code: letters counted from the seed's offset
            text = _letters(self.offset + number, most)
        if len(text) < bounds.min_length:
            text = text + "x" * (bounds.min_length - len(text))
        if len(text) > most or len(text) < bounds.min_length:
            raise CannotFill(f"{where}: no text of {bounds.min_length} to {most} characters fits.", "")
        return text


def _letters(number: int, width: int) -> str:
    """``number`` in base 26 (a-z), its last ``width`` letters: distinct for 26**width numbers in a row."""
    letters = []
    for _ in range(width):
        number, digit = divmod(number, 26)
        letters.append(chr(ord("a") + digit))
    return "".join(reversed(letters))


def _step(scale: int) -> Decimal:
    return Decimal(1).scaleb(-scale)
