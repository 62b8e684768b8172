"""Last: what the failed tests kept (then dropped, so that the local server stops with the run)."""


def test_kept_databases_hold_what_the_failed_tests_wrote(pg_sandbox):
    found = []
    for name in pg_sandbox.kept:
        with pg_sandbox.server.connect(name) as conn:
            found += [row[0] for row in conn.execute("SELECT name FROM shop_customer WHERE name LIKE 'kept%'")]
    assert sorted(found) == ["kept by pg.insert", "kept in database isolation", "kept in transaction isolation"]
    for name in pg_sandbox.kept:
        pg_sandbox.server.admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    pg_sandbox.kept._names.clear()  # the user's job after a kept run; here, so that no server is left running
