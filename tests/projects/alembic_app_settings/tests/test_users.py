from typing import Any


def test_users_start_empty(pg: Any) -> None:
    assert pg.fetchval("select count(*) from users") == 0
