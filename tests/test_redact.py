from __future__ import annotations

import pytest

from pgsandbox.common.redact import redact, register_secret


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host=x password=hunter2 user=u", "host=x password=*** user=u"),
        ("host=x password='a b\\'c' user=u", "host=x password=*** user=u"),
        ("postgresql://app:s3cr%40t@db:5432/app", "postgresql://app:***@db:5432/app"),
        (
            "postgresql+psycopg://app:pw@db/app?sslmode=require",
            "postgresql+psycopg://app:***@db/app?sslmode=require",
        ),
        ("postgresql://app@db/app", "postgresql://app@db/app"),
        ("url?password=abc&x=1", "url?password=***&x=1"),
        # a dict's repr, as in a traceback's arguments of psycopg's connect() frame
        (
            "kwargs = {'user': 'app', 'password': 's3cr\\'t', 'port': 5}",
            "kwargs = {'user': 'app', 'password': '***', 'port': 5}",
        ),
        ('{"password": "abc"}', "{\"password\": '***'}"),
        ("{'password': ''}", "{'password': ''}"),
    ],
)
def test_redact_dsns_and_urls(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_registered_secrets_are_masked_anywhere() -> None:
    register_secret("Zq9-very-secret-token")
    assert redact("the server said: Zq9-very-secret-token is wrong") == "the server said: *** is wrong"


def test_an_empty_password_next_to_a_passfile_is_not_masked() -> None:
    assert redact("host=x password='' passfile=/run/pgpass") == "host=x password='' passfile=/run/pgpass"


def test_a_secret_is_text_with_a_masked_repr() -> None:
    from pgsandbox.common.redact import Secret

    secret = Secret("Zq9-another-secret")
    assert secret == "Zq9-another-secret" and f"{secret}" == "Zq9-another-secret"
    assert repr(secret) == "'***'" and "Zq9" not in repr({"password": secret}) and "Zq9" not in repr([secret])
