"""`pg.insert`'s values without a server: the simple CHECK constraints pgsandbox reads (as pg_get_constraintdef
writes them), and the values it makes of a column's type within them, the same for the same seed."""

from __future__ import annotations

import pathlib
from decimal import Decimal
from typing import Any

import pytest

from pgsandbox.data.catalog import Catalog, PgType
from pgsandbox.data.values import Bounds, CannotFill, Maker, bounds_from_checks

INT4, TEXT, VARCHAR, NUMERIC, BOOL, TEXT_ARRAY, MOOD, SHORT_CODE, POINT = 23, 25, 1043, 1700, 16, 1009, 9001, 9002, 9003
TYPES = {
    INT4: PgType(INT4, "integer", "int4", "b", "N"),
    TEXT: PgType(TEXT, "text", "text", "b", "S"),
    VARCHAR: PgType(VARCHAR, "character varying", "varchar", "b", "S"),
    NUMERIC: PgType(NUMERIC, "numeric", "numeric", "b", "N"),
    BOOL: PgType(BOOL, "boolean", "bool", "b", "B"),
    TEXT_ARRAY: PgType(TEXT_ARRAY, "text[]", "_text", "b", "A", elem=TEXT),
    MOOD: PgType(MOOD, "mood", "mood", "e", "E", labels=("sad", "ok", "happy")),
    # create domain short_code varchar(6) check (char_length(value) >= 4)
    SHORT_CODE: PgType(
        SHORT_CODE,
        "short_code",
        "short_code",
        "d",
        "S",
        base=VARCHAR,
        base_typmod=4 + 6,
        checks=("CHECK ((char_length((VALUE)::text) >= 4))",),
    ),
    POINT: PgType(POINT, "point", "point", "b", "G"),
}


def maker(seed: str = "tests/test_shop.py::test_order") -> Maker:
    return Maker(Catalog(types=TYPES), seed)


@pytest.mark.parametrize(
    ("checks", "column", "expected"),
    [
        pytest.param(["CHECK ((0 < qty))"], "qty", Bounds(low=Decimal(0), low_inclusive=False), id="constant first"),
        pytest.param(['CHECK (("Odd Name" <= 10))'], "Odd Name", Bounds(high=Decimal(10)), id="a quoted name"),
        pytest.param(
            ["CHECK ((status <> 'gone'::text)) NOT VALID"], "status", Bounds(not_equal={"gone"}), id="not valid"
        ),
        pytest.param(["CHECK ((code = 'x'::text))"], "code", Bounds(choices=["x"]), id="one allowed value"),
        pytest.param(["CHECK ((btrim(name) <> ''::text))"], "name", Bounds(min_length=1), id="not blank"),
        pytest.param(["CHECK ((char_length(c) = 3))"], "c", Bounds(min_length=3, max_length=3), id="exact length"),
        pytest.param(
            ["CHECK (((n >= 1) AND (n <= 10)))", "CHECK ((n > 4))"],
            "n",
            Bounds(low=Decimal(4), low_inclusive=False, high=Decimal(10)),
            id="the narrowest of two checks",
        ),
        pytest.param(["CHECK ((n IS NOT NULL))"], "n", Bounds(), id="is not null says nothing of values"),
        pytest.param(["CHECK (((a > 1) OR (a < -1)))"], "a", Bounds(understood=False), id="OR is not read"),
        pytest.param(["CHECK ((lower(x) = x))"], "x", Bounds(understood=False), id="a function of the column"),
    ],
)
def test_what_a_check_constraint_says_of_a_column(checks: list[str], column: str, expected: Bounds) -> None:
    assert bounds_from_checks(checks, column) == expected


def test_numbers_stay_within_the_bounds_and_unique_ones_run_out() -> None:
    values = maker()
    level = ["CHECK (((level >= 3) AND (level <= 5)))"]
    assert [values.value("t", "level", INT4, -1, False, level) for _ in range(3)] == ["3", "3", "3"]
    assert [values.value("t", "rank", INT4, -1, True, ["CHECK (((rank >= 3) AND (rank <= 5)))"]) for _ in range(3)] == [
        "3",
        "4",
        "5",
    ]
    with pytest.raises(CannotFill, match=r"t\.rank: no unique value left between 3 and 5 \(this test's 4th\)"):
        values.value("t", "rank", INT4, -1, True, ["CHECK (((rank >= 3) AND (rank <= 5)))"])
    numeric_8_2 = (8 << 16 | 2) + 4
    assert values.value("t", "price", NUMERIC, numeric_8_2, False, ["CHECK ((price > (0)::numeric))"]) == "1.00"
    assert values.value("t", "qty", INT4, -1, False, ["CHECK ((0 < qty))", "CHECK ((qty <> 1))"]) == "2"


def test_allowed_values_are_taken_in_turn_for_a_unique_column() -> None:
    values = maker()
    kinds = ["CHECK ((kind = ANY (ARRAY['a'::text, 'b''s'::text])))"]
    assert [values.value("t", "kind", TEXT, -1, True, kinds) for _ in range(2)] == ["a", "b's"]
    with pytest.raises(CannotFill, match=r"allows only 2 value\(s\); this test already used them all"):
        values.value("t", "kind", TEXT, -1, True, kinds)
    none_left = ["CHECK ((c = 'x'::text))", "CHECK ((c <> 'x'::text))"]
    with pytest.raises(CannotFill, match="its CHECK constraints allow no value pgsandbox can see"):
        values.value("t", "c", TEXT, -1, False, none_left)


def test_texts_fit_the_type_length_and_the_checks() -> None:
    values = maker()
    name = values.value("t", "name", TEXT, -1, True, [])
    assert name.startswith("name-") and name.endswith("-1")
    assert values.value("t", "name", TEXT, -1, True, []) == name[:-1] + "2"
    assert len(values.value("t", "code", VARCHAR, 4 + 5, True, [])) <= 5
    padded = values.value("t", "pin", TEXT, -1, False, ["CHECK ((char_length(pin) >= 30))"])
    assert len(padded) >= 30
    short = values.value("t", "sc", SHORT_CODE, -1, False, [])  # the domain's varchar(6) and its check
    assert 4 <= len(short) <= 6
    with pytest.raises(CannotFill, match=r"t\.tag: no text of 7 to 5 characters fits"):
        values.value("t", "tag", VARCHAR, 4 + 5, False, ["CHECK ((length(tag) > 6))"])


def test_enums_booleans_and_arrays() -> None:
    values = maker()
    assert [values.value("t", "mood", MOOD, -1, True, []) for _ in range(3)] == ["sad", "ok", "happy"]
    with pytest.raises(CannotFill, match=r"t\.mood is unique and its enum mood has only 3 labels"):
        values.value("t", "mood", MOOD, -1, True, [])
    assert [values.value("t", "flag", BOOL, -1, True, []) for _ in range(2)] == ["true", "false"]
    with pytest.raises(CannotFill, match="a unique boolean: this test already used both values"):
        values.value("t", "flag", BOOL, -1, True, [])
    tags = values.value("t", "tags", TEXT_ARRAY, -1, False, [])
    assert tags.startswith('{"tags-') and tags.endswith('"}')


def test_the_same_seed_makes_the_same_values_and_another_seed_others() -> None:
    first, again, other = maker(), maker(), maker("tests/test_shop.py::test_refund")
    made = [first.value("t", column, TEXT, -1, True, []) for column in ("a", "b")]
    assert [again.value("t", column, TEXT, -1, True, []) for column in ("a", "b")] == made
    assert [other.value("t", column, TEXT, -1, True, []) for column in ("a", "b")] != made
    assert first.value("t", "id", INT4, -1, True, []) == again.value("t", "id", INT4, -1, True, [])


def test_a_type_without_a_value_is_named() -> None:
    with pytest.raises(CannotFill, match=r"t\.p is of type point, which pgsandbox cannot make a value of"):
        maker().value("t", "p", POINT, -1, False, [])


def test_a_catalog_known_from_another_cache_directory_is_stored_in_this_one(tmp_path: pathlib.Path) -> None:
    """A process that ran sessions on two cache directories (pytester, scripts) knew the template's catalog from
    the first: the second directory gets its file too (the next process would otherwise read the catalogs)."""
    from pgsandbox.data import catalog

    def never(sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
        raise AssertionError("the catalog is known: nothing is read")

    known = catalog.Catalog(search_path=("app", "public"))
    catalog._memory["pgsandbox_tpl_test_two_caches"] = known
    try:
        for directory in (tmp_path / "first", tmp_path / "second"):
            assert catalog.for_template("pgsandbox_tpl_test_two_caches", directory, never) is known
            stored = catalog.Catalog.load((directory / "pgsandbox_tpl_test_two_caches.json").read_text())
            assert stored == known
    finally:
        del catalog._memory["pgsandbox_tpl_test_two_caches"]
