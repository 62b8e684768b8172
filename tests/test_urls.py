"""URLs that existing code can use (issue 13): the test project ``projects/urlapp`` (settings that parse host and
port out of DATABASE_URL, Alembic through ini interpolation, a worker process of the session, every client
library with every form) on the default local server, under pytest-xdist, and, failing, on a socket-only one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("alembic")
pytest.importorskip("asyncpg")
pytest.importorskip("psycopg2")

PROJECT = Path(__file__).parent / "projects" / "urlapp"
PROJECT_TESTS = 13


def urlapp(pytester: pytest.Pytester) -> None:
    shutil.copytree(PROJECT, pytester.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))


def test_the_url_app_passes_on_the_default_local_server(pytester: pytest.Pytester) -> None:
    urlapp(pytester)
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=PROJECT_TESTS)


def test_the_url_app_passes_under_xdist(pytester: pytest.Pytester) -> None:
    urlapp(pytester)
    # a worker's clients get the controller's TCP address, and its own admin connections the socket
    (pytester.path / "tests" / "test_worker_addresses.py").write_text(
        "def test_addresses(pg, pg_server):\n"
        "    assert pg_server.kind == 'external' and pg.params['host'] == pg_server.params['host'] == '127.0.0.1'\n"
        "    assert pg_server.admin.info.host.startswith('/')\n"
    )
    result = pytester.runpytest("-n", "2", "-p", "no:randomly")
    result.assert_outcomes(passed=PROJECT_TESTS + 1)


def test_the_url_app_fails_on_a_socket_only_server(pytester: pytest.Pytester) -> None:
    """What the old default gave: a socket directory in ``?host=%2F...``, which configparser refuses."""
    urlapp(pytester)
    result = pytester.runpytest("--pg-listen=none", "--pg-rebuild", "-p", "no:randomly")
    assert result.ret != 0
    result.stdout.fnmatch_lines(
        ["*python:urlapp.migrate:upgrade failed*InterpolationSyntaxError: '%' must be followed by '%' or '('*%2F*"]
    )
