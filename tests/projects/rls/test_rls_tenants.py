"""The tenant policy, tested as the app runs: as app_rw, with app.tenant_id set, in both isolation modes."""

import psycopg
import pytest

MODES = ("transaction", "database")


def in_each_mode(**marker):
    return pytest.mark.parametrize(
        "mode", [pytest.param(mode, marks=pytest.mark.pg(isolation=mode, **marker)) for mode in MODES]
    )


@in_each_mode()
def test_tenant_a_sees_only_its_rows(pg, mode):
    with pg.as_role("app_rw", settings={"app.tenant_id": "a"}):
        names = [row["name"] for row in pg.fetch("SELECT name FROM items ORDER BY name")]
    assert "banana" not in names  # tenant b's row
    assert names == ["apple"]


@in_each_mode()
def test_tenant_a_cannot_write_a_row_of_tenant_b(pg, mode):
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege) as refused,
        pg.as_role("app_rw", settings={"app.tenant_id": "a"}),
    ):
        pg.execute("INSERT INTO items (tenant_id, name) VALUES ('b', 'bogus')")
    said = "\n".join(refused.value.__notes__)
    assert "as role app_rw (settings: app.tenant_id = 'a')" in said, said
    assert "tenant_isolation (permissive, FOR ALL, TO app_rw): WITH CHECK" in said, said


@in_each_mode(role="app_rw", role_settings={"app.tenant_id": "b"})
def test_the_whole_test_as_tenant_b(pg, mode):
    with pg.as_role(None):  # the tests' own role, which owns the table, writes a row of tenant a
        pg.execute("INSERT INTO items (tenant_id, name) VALUES ('a', 'avocado')")
        assert pg.fetchval("SELECT count(*) FROM items") == 3
    assert pg.fetchval("SELECT current_user") == "app_rw"
    assert [row["name"] for row in pg.fetch("SELECT name FROM items")] == ["banana"]
    pg.execute("INSERT INTO items (tenant_id, name) VALUES ('b', 'blueberry')")
    assert pg.fetchval("SELECT count(*) FROM items") == 2
