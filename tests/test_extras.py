"""Extras hygiene (issue 16): what each extra installs, read from pyproject.toml and resolved over the installed
packages' metadata, and the async fixtures under pytest-asyncio, anyio's plugin, or both."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import UNUSED_PLUGINS

if sys.version_info >= (3, 11):
    import tomllib
else:
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent


@cache
def pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as file:
        return tomllib.load(file)["project"]  # type: ignore[no-any-return]


def extras() -> dict[str, list[str]]:
    return pyproject()["optional-dependencies"]  # type: ignore[return-value]


def installed_by(requirements: list[str]) -> set[str]:
    """The distributions pip installs for ``requirements`` (``pytest-pgsandbox[x]`` among them), resolved over the
    installed metadata: the test suite's virtualenv has every extra (``[dev]``) installed."""
    found: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    pending = [Requirement(text) for text in requirements]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        if name == "pytest-pgsandbox":  # this worktree's, not the installed one's
            pending += [Requirement(text) for text in pyproject()["dependencies"]]  # type: ignore[attr-defined]
            pending += [Requirement(text) for extra in requirement.extras for text in extras()[extra]]
            continue
        if (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        found.add(name)
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{name} is not installed: install the dev extras (pip install -e '.[dev]')")
        for text in distribution.requires or ():
            dependency = Requirement(text)
            wanted = ("", *requirement.extras)
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": e}) for e in wanted):
                dependency.marker = None
                pending.append(dependency)
    return found


def pytest_plugins_of(distributions: set[str]) -> set[str]:
    """The pytest plugins (``pytest11`` entry points) these distributions bring: pytest loads each on every run."""
    return {
        entry_point.name
        for name in distributions
        for entry_point in metadata.distribution(name).entry_points.select(group="pytest11")
    }


CORE = ["pytest-pgsandbox"]
# The pytest plugins an extra may bring beyond the core's: only a plugin its fixtures need. pytest-asyncio is the
# [asyncio] extra's whole point (the async fixtures run under it, or under anyio's plugin, which comes with anyio,
# not with pgsandbox), so [all] has it too. factory_boy requires Faker, whose plugin README.md documents (its
# cost and -p no:faker); [all] leaves factory_boy out, so that Faker's plugin comes only with [factoryboy].
# [django] is pytest-django, whose fixtures pgsandbox's Django integration replaces and extends (a Django project
# under pytest has it anyway); [all] leaves it out.
PLUGINS_AN_EXTRA_MAY_BRING = {
    "asyncio": {"asyncio"},
    "all": {"asyncio"},
    "factoryboy": {"faker"},
    "django": {"django"},
    # the example application's own test plugins (pytest-factoryboy; anyio's comes with FastAPI), for CI's run of
    # the example on the installed wheel: not a set of fixtures a project installs
    "examples": {"asyncio", "faker", "pytest-factoryboy", "anyio"},
}


def test_the_core_brings_no_test_runner_plugin() -> None:
    # pgsandbox's own plugin aside; platformdirs' is one fixture (platformdirs_isolated), imported in about
    # 1.5 ms, and no hook
    assert pytest_plugins_of(installed_by(CORE)) == {"platformdirs"}


@pytest.mark.parametrize("extra", sorted(set(extras()) - {"dev"}))
def test_an_extra_brings_only_the_pytest_plugins_its_fixtures_need(extra: str) -> None:
    core = pytest_plugins_of(installed_by(CORE))
    brought = pytest_plugins_of(installed_by([f"pytest-pgsandbox[{extra}]"])) - core
    assert brought == PLUGINS_AN_EXTRA_MAY_BRING.get(extra, set()), (
        f"[{extra}] brings the pytest plugins {sorted(brought)}: each loads on every run of a project that installs "
        "it (pytest-asyncio warns and can switch on a dormant asyncio_mode = auto; Faker's costs ~770 ms)"
    )


def test_sqlalchemy_brings_no_asyncio_plugin_and_all_no_faker() -> None:
    assert "pytest-asyncio" not in installed_by(["pytest-pgsandbox[sqlalchemy]"])
    assert "pytest-asyncio" not in installed_by(["pytest-pgsandbox[asyncpg]"])
    assert "faker" not in installed_by(["pytest-pgsandbox[all]"])
    # what [all] still gives: every fixture's library
    assert {"alembic", "sqlalchemy", "greenlet", "asyncpg", "psycopg2-binary", "pytest-asyncio"} <= installed_by(
        ["pytest-pgsandbox[all]"]
    )


def test_the_readme_says_which_extra_brings_what() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Dependencies and why") :]
    section = section[: section.index("\n## ", 1)]
    for extra in extras():
        name = "pg14" if re.fullmatch(r"pg1[4-8]", extra) else extra
        assert f"`[{name}]`" in section, f"README's 'Dependencies and why' does not name the extra [{extra}]"
    assert "-p no:faker" in section
    assert "anyio" in section


SCHEMA = "create table items (id serial primary key, name text not null);\n"

ANYIO_CONFTEST = """
    import pytest

    @pytest.fixture(scope="session")
    def anyio_backend():
        return "asyncio"
"""

# A FastAPI-style project whose async tests run on anyio (pytest.mark.anyio), using pgsandbox's async fixtures.
ANYIO_TESTS = """
    import asyncio

    import pytest
    from sqlalchemy import text

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    async def app_loop():
        yield asyncio.get_running_loop()

    async def test_1_writes(pg_aconn, pg_asyncpg, pg_async_session, app_loop):
        assert app_loop is asyncio.get_running_loop()
        await pg_aconn.execute("insert into items (name) values ('aconn')")
        await pg_asyncpg.execute("insert into items (name) values ('asyncpg')")
        async with pg_asyncpg.transaction():
            await pg_asyncpg.execute("insert into items (name) values ('savepoint')")
        await pg_async_session.execute(text("insert into items (name) values ('session')"))
        await pg_async_session.commit()
        # the session runs on the test's asyncpg connection; pg_aconn has a transaction of its own
        assert await pg_asyncpg.fetchval("select count(*) from items") == 3
        assert (await (await pg_aconn.execute("select count(*) from items")).fetchone())[0] == 1

    async def test_2_is_clean(pg_aconn, pg_asyncpg, pg):
        assert await pg_asyncpg.fetchval("select count(*) from items") == 0
        assert (await (await pg_aconn.execute("select count(*) from items")).fetchone())[0] == 0
        assert pg.fetchval("select count(*) from items") == 0

    @pytest.mark.pg(async_driver="psycopg")
    async def test_3_session_on_psycopg(pg_async_session):
        await pg_async_session.execute(text("insert into items (name) values ('x')"))
        await pg_async_session.commit()
        assert await pg_async_session.scalar(text("select count(*) from items")) == 1

    @pytest.mark.parametrize("anyio_backend", ["trio"])
    async def test_4_on_trio(pg_aconn):
        pass
"""

UNMARKED = """
    async def test_not_run_by_any_plugin(pg_aconn):
        pass
"""

ASYNCIO_MARKED = """
    import pytest

    @pytest.mark.asyncio
    async def test_on_pytest_asyncio(pg_aconn, pg_asyncpg):
        await pg_asyncpg.execute("insert into items (name) values ('a')")
        assert await pg_asyncpg.fetchval("select count(*) from items") == 1
"""


def anyio_project(pytester: pytest.Pytester, ini: str) -> None:
    pytester.makefile(".toml", pyproject=f'[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n{ini}')
    (pytester.path / "migrations").mkdir()
    (pytester.path / "migrations/1.sql").write_text(SCHEMA)
    pytester.makeconftest(textwrap.dedent(ANYIO_CONFTEST))
    (pytester.path / "test_app.py").write_text(textwrap.dedent(ANYIO_TESTS))


@pytest.mark.slow
def test_async_fixtures_run_under_anyio_without_pytest_asyncio(
    pytester: pytest.Pytester, shared_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # anyio's plugin loads from its entry point, in the order a real run loads it (the suite's runs leave it out)
    monkeypatch.setenv("PYTEST_ADDOPTS", UNUSED_PLUGINS.replace("-p no:anyio", ""))
    anyio_project(pytester, ini="")
    (pytester.path / "test_unmarked.py").write_text(textwrap.dedent(UNMARKED))
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}", "-p", "no:asyncio", "-p", "no:randomly")
    result.assert_outcomes(passed=3, errors=2)
    output = result.stdout.str()
    assert "pgsandbox: pg_aconn runs on asyncio" in output
    assert "anyio runs this test on trio." in output
    assert 'What to do: run it on asyncio: a fixture `anyio_backend` that returns "asyncio"' in output
    assert "pgsandbox: pg_aconn is an async fixture, and no async test plugin runs this test" in output
    assert "What to do: mark the test @pytest.mark.anyio" in output


@pytest.mark.slow
def test_async_fixtures_follow_the_plugin_that_runs_each_test_when_both_are_loaded(
    pytester: pytest.Pytester, shared_dsn: str
) -> None:
    anyio_project(pytester, ini='asyncio_default_fixture_loop_scope = "function"\n')
    (pytester.path / "test_asyncio_marked.py").write_text(textwrap.dedent(ASYNCIO_MARKED))
    # anyio's plugin registered after pytest-asyncio's (-p): the order in which pytest-asyncio's hook, without
    # pgsandbox's, takes the fixtures of an anyio test onto its own event loop
    result = pytester.runpytest(
        f"--pg-dsn={shared_dsn}", "-p", "anyio", "-p", "no:randomly", "-W", "error::DeprecationWarning"
    )
    result.assert_outcomes(passed=4, errors=1)
    assert "anyio runs this test on trio." in result.stdout.str()


# A sync SQLAlchemy project whose own async tests run on anyio, with an `asyncio_mode = "auto"` left in its
# configuration from an earlier pytest-asyncio (dormant: nothing reads it). Installing pgsandbox's [sqlalchemy]
# must not bring a plugin that wakes it up: with pytest-asyncio loaded, auto mode takes over the anyio fixture and
# the anyio test gets a fixture from another event loop.
SYNC_TESTS = """
    import asyncio

    import pytest
    from sqlalchemy import text

    def test_1_session_commits_inside_the_test(pg_session):
        pg_session.execute(text("insert into items (name) values ('a')"))
        pg_session.commit()
        assert pg_session.scalar(text("select count(*) from items")) == 1

    def test_2_engine_sees_a_clean_table(pg_engine):
        with pg_engine.connect() as conn:
            assert conn.scalar(text("select count(*) from items")) == 0

    @pytest.fixture
    def anyio_backend():
        return "asyncio"

    @pytest.fixture
    async def client_loop():
        yield asyncio.get_running_loop()

    @pytest.mark.anyio
    async def test_3_the_projects_own_async_test(client_loop):
        assert client_loop is asyncio.get_running_loop()
"""


@pytest.mark.slow
def test_a_sync_sqlalchemy_project_gets_no_asyncio_plugin_from_the_extra(
    pytester: pytest.Pytester, shared_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makefile(
        ".toml", pyproject='[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\nasyncio_mode = "auto"\n'
    )
    (pytester.path / "migrations").mkdir()
    (pytester.path / "migrations/1.sql").write_text(SCHEMA)
    (pytester.path / "test_orders.py").write_text(textwrap.dedent(SYNC_TESTS))
    # the plugins this project has: what pgsandbox[sqlalchemy] installs, and anyio (its own, through httpx)
    allowed = pytest_plugins_of(installed_by(["pytest-pgsandbox[sqlalchemy]"])) | {"pgsandbox", "anyio"}
    installed = pytest_plugins_of({canonicalize_name(d.metadata["Name"]) for d in metadata.distributions()})
    # in PYTEST_ADDOPTS, in place of the suite's list: the plugins left load from their entry points, in the
    # order a real run loads them
    monkeypatch.setenv("PYTEST_ADDOPTS", " ".join(f"-p no:{name}" for name in sorted(installed - allowed)))
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    output = result.stdout.str()
    assert "asyncio: mode=" not in output  # pytest-asyncio's header line
    assert "PytestDeprecationWarning" not in output
    # the one warning is pytest's own about the project's dormant key
    result.assert_outcomes(passed=3, warnings=1)
    assert "Unknown config option: asyncio_mode" in output


@pytest.mark.slow
def test_loading_the_plugin_imports_no_async_test_plugin() -> None:
    """pytest-asyncio (28 ms to import) and anyio are imported by their own plugins, when those load: a sync
    project that turned pytest-asyncio off (-p no:asyncio) does not pay for it through pgsandbox."""
    code = (
        "import sys, pgsandbox.pytest.plugin, pgsandbox.pytest.fixtures; "
        "print(sorted({'pytest_asyncio', 'anyio'} & sys.modules.keys()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
