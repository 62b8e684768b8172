from pgsandbox.common.words import counted


def test_a_count_of_one_takes_the_singular() -> None:
    assert [counted(n, "row") for n in (0, 1, 2)] == ["0 rows", "1 row", "2 rows"]
    assert [counted(n, "row", signed=True) for n in (-1, 1, 3)] == ["-1 row", "+1 row", "+3 rows"]
    assert counted(2, "index", "indexes") == "2 indexes"


def test_each_fixture_says_what_it_is_in_its_first_paragraph() -> None:
    """``pytest --fixtures`` prints a fixture's first paragraph: it must say what the fixture is, not end by
    announcing an example (``::``) that is not shown."""
    import inspect

    from pgsandbox.pytest import fixtures

    docs = {name: inspect.getdoc(getattr(fixtures, name)) for name in dir(fixtures) if name.startswith("pg")}
    firsts = {name: doc.split("\n\n")[0] for name, doc in docs.items() if doc}
    assert "pg_queries" in firsts and "pg_conn" in firsts
    assert [name for name, first in firsts.items() if first.rstrip().endswith("::")] == []
