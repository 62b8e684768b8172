"""Schema once: cache hit, miss and rebuild, every migrator, seed layer, concurrent builders, pruning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pgsandbox import LocalServer, Settings
from pgsandbox.server.external import ExternalServer
from pgsandbox.template.builds import list_templates

# Every build appends a line to BUILD_LOG: the number of lines is the number of times migrations ran.
COUNTING_CONFTEST = """
import os, pathlib

def pytest_pgsandbox_migrate(conn):
    with open(os.environ["BUILD_LOG"], "a") as log:
        log.write("built\\n")
"""

USERS_TEST = """
def test_users(pg):
    assert pg.fetchval("select count(*) from users") == 2
"""


def builds(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def write_project(pytester: pytest.Pytester, ini: str, files: dict[str, str]) -> None:
    pytester.makefile(".toml", pyproject="[tool.pytest.ini_options]\n" + textwrap.dedent(ini))
    for name, content in files.items():
        path = pytester.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(content))


def templates_of(server: LocalServer, project: str) -> list[dict[str, object]]:
    return [t for t in list_templates(server) if t.get("project") == project]


@pytest.mark.slow
def test_local_cache_hit_miss_and_rebuild(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUILD_LOG", str(tmp_path / "builds.log"))
    write_project(
        pytester,
        'pg_migrations = ["sql:migrations"]\n',
        {
            "conftest.py": COUNTING_CONFTEST,
            "migrations/1_users.sql": "create table users (id serial primary key, name text);",
            "migrations/2_rows.sql": "insert into users (name) values ('ada'), ('bob');",
            "test_users.py": USERS_TEST,
        },
    )
    first = pytester.runpytest()
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(["pgsandbox: migrations template * (sql:migrations, hook:*): cache miss, built in * s"])
    assert builds(tmp_path / "builds.log") == 1

    second = pytester.runpytest()
    second.assert_outcomes(passed=1)
    second.stdout.fnmatch_lines(["pgsandbox: migrations template *: cache hit, from the cached cluster, nothing to*"])
    assert builds(tmp_path / "builds.log") == 1  # the second run did not migrate

    (pytester.path / "migrations/2_rows.sql").write_text("insert into users (name) values ('ada'), ('cy');")
    third = pytester.runpytest()
    third.assert_outcomes(passed=1)
    third.stdout.fnmatch_lines(["*cache miss, built in*"])
    assert builds(tmp_path / "builds.log") == 2

    forced = pytester.runpytest("--pg-rebuild", "--pg-report=json")
    forced.assert_outcomes(passed=1)
    forced.stdout.fnmatch_lines(["*(sql:migrations, hook:*): rebuild forced (pg_rebuild), built in*"])
    report = json.loads((pytester.path / "pgsandbox-report.json").read_text())
    assert [t["why_built"] for t in report["templates"]] == ["rebuild forced (pg_rebuild)"]
    assert builds(tmp_path / "builds.log") == 3
    again = pytester.runpytest()
    again.stdout.fnmatch_lines(["*cache hit*"])
    assert builds(tmp_path / "builds.log") == 3


@pytest.mark.slow
def test_external_server_keeps_templates_between_runs(
    pytester: pytest.Pytester, shared: LocalServer, shared_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUILD_LOG", str(tmp_path / "builds.log"))
    write_project(
        pytester,
        'pg_migrations = ["migrations"]\n',
        {
            "conftest.py": COUNTING_CONFTEST,
            "migrations/1.sql": f"-- {pytester.path.name}\ncreate table users (id int);\n"
            "insert into users values (1), (2);",
            "test_users.py": USERS_TEST,
        },
    )
    pytester.runpytest(f"--pg-dsn={shared_dsn}").assert_outcomes(passed=1)
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*cache hit, already on the server, nothing to migrate"])
    assert builds(tmp_path / "builds.log") == 1
    (template,) = templates_of(shared, pytester.path.name)
    assert template["ready"] is True
    # a template takes no connections: a clone fails while anyone is connected to its source
    with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
        shared.connect(str(template["name"]))


@pytest.mark.slow
def test_a_clone_fails_while_its_source_has_a_connection(shared: LocalServer) -> None:
    """Why templates refuse connections (measured here: PostgreSQL refuses, it does not wait)."""
    source = shared.create_database()
    with shared.connect(source), pytest.raises(psycopg.errors.ObjectInUse, match="being accessed by other users"):
        shared.create_database(template=source)
    shared.drop_database(source)


@pytest.mark.slow
def test_a_broken_migration_fails_the_session_once_and_leaves_nothing(
    pytester: pytest.Pytester, shared: LocalServer, shared_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUILD_LOG", str(tmp_path / "builds.log"))
    write_project(
        pytester,
        'pg_migrations = ["sql:db/migrations"]\n',
        {
            "conftest.py": COUNTING_CONFTEST,
            "db/migrations/1_users.sql": "create table users (id int);\n",
            "db/migrations/2_posts.sql": "create table posts (\n  id int,\n  author int refrences users\n);\n",
            "test_a.py": "def test_one(pg): pass\ndef test_two(pg): pass\ndef test_three(pg): pass\n",
        },
    )
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*pgsandbox: migration db/migrations/2_posts.sql failed at line 3, column 14:",
            "*   3 |   author int refrences users",
            '*PostgreSQL: syntax error at or near "refrences"*',
            "*What to do: fix that statement and run again; the template was not kept*",
            "*Interrupted: pgsandbox could not set up the database*",
        ]
    )
    assert str(shared.reveal_password()) not in result.stdout.str()
    assert templates_of(shared, pytester.path.name) == []  # nothing half-built is left behind
    assert builds(tmp_path / "builds.log") == 0  # the hook comes after the broken file: never ran


def slow_project(tmp_path: Path, extra_args: list[str]) -> tuple[Path, list[str]]:
    """A project whose migration logs each build and then waits for a "go" file: two runs started together
    overlap for as long as the test wants."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text('[tool.pytest.ini_options]\npg_migrations = ["python:slow:migrate"]\n')
    (project / "slow.py").write_text(
        textwrap.dedent(
            f"""
            import pathlib, time
            def migrate(conn):
                with open({str(tmp_path / "builds.log")!r}, "a") as log:
                    log.write("built\\n")
                go = pathlib.Path({str(tmp_path / "go")!r})
                while not go.exists():  # held open until the test has seen the other process wait
                    time.sleep(0.01)
                conn.execute("create table users (id int)  -- {tmp_path.name}")
            """
        )
    )
    (project / "test_x.py").write_text("def test_x(pg):\n    assert pg.fetchval('select count(*) from users') == 0\n")
    return project, [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *extra_args]


def run_two_builders(tmp_path: Path, extra_args: list[str], wait_line: str) -> list[str]:
    """Start two runs together; once one is building and the other has printed ``wait_line``, let the
    build finish. Returns both outputs."""
    project, command = slow_project(tmp_path, extra_args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runs = [
        subprocess.Popen(command, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for _ in range(2)
    ]
    outputs: list[list[str]] = [[], []]
    readers = [
        threading.Thread(target=lambda run=run, lines=lines: lines.extend(run.stdout or ()), daemon=True)
        for run, lines in zip(runs, outputs, strict=True)
    ]
    for reader in readers:
        reader.start()

    def other_waits() -> bool:
        return any(wait_line in line for lines in outputs for line in list(lines))

    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (builds(tmp_path / "builds.log") == 1 and other_waits()):
            time.sleep(0.01)
        assert builds(tmp_path / "builds.log") == 1 and other_waits(), outputs
        (tmp_path / "go").touch()
        for run in runs:
            run.wait(timeout=60)
        for reader in readers:
            reader.join(timeout=10)
    finally:
        for run in runs:
            run.kill()
    texts = ["".join(lines) for lines in outputs]
    assert [run.returncode for run in runs] == [0, 0], texts
    assert builds(tmp_path / "builds.log") == 1
    return texts


@pytest.mark.slow
def test_concurrent_builders_on_a_shared_server_build_once(shared_dsn: str, tmp_path: Path) -> None:
    """Two pytest processes start together: one builds, the other waits on the advisory lock and reuses it."""
    wait_line = "waiting for another session building the migrations template"
    outputs = run_two_builders(tmp_path, [f"--pg-dsn={shared_dsn}"], wait_line)
    built = [out for out in outputs if "cache miss, built in" in out]
    waited = [out for out in outputs if wait_line in out]
    assert len(built) == 1 and len(waited) == 1, outputs
    assert "cache hit, already on the server" in waited[0]


@pytest.mark.slow
def test_concurrent_local_runs_build_once(tmp_path: Path) -> None:
    """Two runs with local servers: the second waits for the first's cluster snapshot and starts from it."""
    wait_line = "waiting for another run that is building the same templates"
    outputs = run_two_builders(tmp_path, ["--pg-server=local"], wait_line)
    built = [out for out in outputs if "cache miss, built in" in out]
    waited = [out for out in outputs if wait_line in out]
    assert len(built) == 1 and len(waited) == 1, outputs
    assert "cache hit, from the cached cluster, nothing to migrate" in waited[0]


@pytest.mark.slow
def test_python_migrator_hashes_its_inputs(
    pytester: pytest.Pytester, shared_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUILD_LOG", str(tmp_path / "builds.log"))
    write_project(
        pytester,
        """
        pg_migrations = ["python:app.schema:create"]
        pg_migrations_inputs = ["data/*.csv"]
        """,
        {
            "app/__init__.py": "",
            "app/schema.py": f"""
                import os, pathlib
                def create(conn):
                    open(os.environ["BUILD_LOG"], "a").write("built\\n")
                    conn.execute("create table users (name text)  -- {pytester.path.name}")
                    for name in pathlib.Path("data/users.csv").read_text().split():
                        conn.execute("insert into users values (%s)", [name])
            """,
            "data/users.csv": "ada\nbob\n",
            "test_users.py": USERS_TEST,
        },
    )
    pytester.runpytest(f"--pg-dsn={shared_dsn}").assert_outcomes(passed=1)
    pytester.runpytest(f"--pg-dsn={shared_dsn}").stdout.fnmatch_lines(["*(python:app.schema:create): cache hit*"])
    assert builds(tmp_path / "builds.log") == 1
    (pytester.path / "data/users.csv").write_text("ada\ncy\n")
    pytester.runpytest(f"--pg-dsn={shared_dsn}").stdout.fnmatch_lines(["*cache miss*"])
    assert builds(tmp_path / "builds.log") == 2


@pytest.mark.slow
def test_python_migrator_errors(pytester: pytest.Pytester, shared_dsn: str) -> None:
    write_project(
        pytester,
        'pg_migrations = ["python:broken:migrate"]\n',
        {
            "broken.py": "def migrate(conn):\n    conn.execute('create table t (x int)')\n    raise ValueError('no')\n",
            "test_x.py": "def test_x(pg): pass\n",
        },
    )
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*python:broken:migrate failed (*broken.py, line 3): ValueError: no"])
    write_project(pytester, 'pg_migrations = ["python:nosuch.module:migrate"]\n', {})
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.stdout.fnmatch_lines(["*python:nosuch.module:migrate: cannot import nosuch.module*"])
    write_project(pytester, 'pg_migrations = ["flyway:db"]\n', {})
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.stdout.fnmatch_lines(["*unknown kind 'flyway'*", "*use sql:DIR, alembic:PATH/alembic.ini*"])


ALEMBIC_ENV = """
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config
section = config.get_section(config.config_ini_section)
engine = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
"""

ALEMBIC_REVISION = """
from alembic import op
revision = {rev!r}
down_revision = {down!r}
def upgrade():
    op.execute({sql!r})
def downgrade():
    pass
"""


@pytest.mark.slow
def test_alembic_migrator(
    pytester: pytest.Pytester, shared_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("alembic")
    write_project(
        pytester,
        'pg_migrations = ["alembic:alembic.ini"]\n',
        {
            "alembic.ini": "[alembic]\nscript_location = %(here)s/migrations\n",
            "migrations/env.py": ALEMBIC_ENV,
            "migrations/script.py.mako": "",
            "migrations/versions/a1_users.py": ALEMBIC_REVISION.format(
                rev="a1", down=None, sql=f"create table users (id int) -- {pytester.path.name}"
            ),
            "test_users.py": "def test_users(pg):\n    assert pg.fetchval('select count(*) from users') == 0\n",
        },
    )
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*(alembic:alembic.ini): cache miss*"])
    pytester.runpytest(f"--pg-dsn={shared_dsn}").stdout.fnmatch_lines(["*(alembic:alembic.ini): cache hit*"])
    (pytester.path / "migrations/versions/a2_rows.py").write_text(
        ALEMBIC_REVISION.format(rev="a2", down="a1", sql="insert into users values (1), (2)")
    )
    (pytester.path / "test_users.py").write_text(USERS_TEST)
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*cache miss*"])
    (pytester.path / "migrations/versions/a3_bad.py").write_text(
        ALEMBIC_REVISION.format(rev="a3", down="a2", sql="insert into nosuch values (1)")
    )
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*alembic:alembic.ini: `alembic upgrade head` failed: ProgrammingError*nosuch*"])


@pytest.mark.slow
def test_seed_layer_on_top_of_migrations(pytester: pytest.Pytester, shared_dsn: str) -> None:
    write_project(
        pytester,
        """
        pg_migrations = ["sql:migrations"]
        pg_seed = ["sql:seed"]
        """,
        {
            "migrations/1.sql": f"create table users (name text) -- {pytester.path.name}",
            "seed/1.sql": "insert into users values ('ada'), ('bob')",
            "test_users.py": USERS_TEST,
        },
    )
    first = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(["*migrations template *: cache miss*", "*seed template *(sql:seed): cache miss*"])
    (pytester.path / "seed/1.sql").write_text("insert into users values ('ada'), ('cy')")
    second = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    second.assert_outcomes(passed=1)
    second.stdout.fnmatch_lines(["*migrations template *: cache hit*", "*seed template *: cache miss*"])


@pytest.mark.slow
def test_seed_hook(pytester: pytest.Pytester, shared_dsn: str) -> None:
    write_project(
        pytester,
        'pg_migrations = ["sql:migrations"]\n',
        {
            "migrations/1.sql": f"create table users (name text) -- {pytester.path.name}",
            "conftest.py": """
                def pytest_pgsandbox_seed(conn):
                    conn.execute("insert into users values ('ada'), ('bob')")
            """,
            "test_users.py": USERS_TEST,
        },
    )
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*seed template *(hook:pytest_pgsandbox_seed): cache miss*"])


@pytest.mark.slow
def test_old_templates_are_pruned(pytester: pytest.Pytester, shared: LocalServer, shared_dsn: str) -> None:
    write_project(
        pytester, 'pg_migrations = ["sql:m"]\npg_templates_keep = "2"\n', {"test_x.py": "def test_x(pg): pass"}
    )
    names = []
    for version in range(4):
        (pytester.path / "m").mkdir(exist_ok=True)
        (pytester.path / "m/1.sql").write_text(f"create table t{version} (x int)")
        pytester.runpytest(f"--pg-dsn={shared_dsn}").assert_outcomes(passed=1)
        names.append({str(t["name"]) for t in templates_of(shared, pytester.path.name)})
    assert [len(n) for n in names] == [1, 2, 2, 2]
    assert names[3] - names[2] and not names[0] & names[3]  # the newest two survive


@pytest.mark.slow
def test_plain_api_without_pytest(tmp_path: Path, shared_dsn: str) -> None:
    from pgsandbox.sandbox import Sandbox

    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations/1.sql").write_text(f"create table users (name text) -- {tmp_path.name}")
    settings = Settings(dsn=shared_dsn, migrations=("sql:migrations",))
    with Sandbox.start(settings, root=tmp_path) as sandbox:
        assert isinstance(sandbox.server, ExternalServer)
        for isolation in ("transaction", "database", "transaction"):
            with sandbox.database(isolation) as db:
                assert db.fetchval("select count(*) from users") == 0
                db.execute("insert into users values ('x')")
                assert db.fetchval("select count(*) from users") == 1


@pytest.mark.slow
def test_rebuild_refuses_a_template_another_session_uses(tmp_path: Path, shared_dsn: str) -> None:
    from pgsandbox.errors import ConfigError
    from pgsandbox.sandbox import Sandbox

    (tmp_path / "m").mkdir()
    (tmp_path / "m/1.sql").write_text(f"create table t (x int) -- {tmp_path.name}")
    settings = Settings(dsn=shared_dsn, migrations=("sql:m",))
    with Sandbox.start(settings, root=tmp_path):
        with pytest.raises(ConfigError) as caught:
            Sandbox.start(settings.replace(rebuild=True), root=tmp_path)
        assert "1 other session(s) are using it" in str(caught.value)
        assert "What to do: let them finish" in str(caught.value)
    with Sandbox.start(settings.replace(rebuild=True), root=tmp_path) as rebuilt:
        assert not rebuilt.templates[0].hit


def test_alembic_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pgsandbox.template import MigrationError, load_migrators

    (missing,) = load_migrators(["alembic:nowhere/alembic.ini"], [], tmp_path)
    with pytest.raises(MigrationError) as caught:
        list(missing.inputs())
    assert "alembic:nowhere/alembic.ini: no alembic.ini or Alembic script directory (with env.py)" in str(caught.value)
    assert "What to do: point pg_migrations at the alembic.ini file" in str(caught.value)

    monkeypatch.setitem(sys.modules, "alembic", None)
    monkeypatch.setitem(sys.modules, "alembic.config", None)
    (without,) = load_migrators(["alembic:alembic.ini"], [], tmp_path)
    with pytest.raises(MigrationError) as caught:
        list(without.inputs())
    assert "pg_migrations has an alembic: entry, but Alembic is not installed." in str(caught.value)
    assert "pip install 'pytest-pgsandbox[alembic]'" in str(caught.value)


@pytest.mark.slow
def test_a_broken_migration_on_the_local_server_leaves_nothing_to_wait_for(pytester: pytest.Pytester) -> None:
    """The build lock is released and no snapshot is stored: the next run builds (and fails) again at once."""
    write_project(
        pytester,
        'pg_migrations = ["sql:migrations"]\n',
        {
            "migrations/1.sql": f"-- {pytester.path.name}\ncreate table t (x nosuchtype);\n",
            "test_x.py": "def test_x(pg): pass\n",
        },
    )
    for _ in range(2):
        result = pytester.runpytest_subprocess("--pg-server=local", timeout=120)
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(["*migration migrations/1.sql failed at line 2, column 19:*"])
    (pytester.path / "migrations/1.sql").write_text("create table t (x int);\n")
    fixed = pytester.runpytest_subprocess("--pg-server=local", timeout=120)
    fixed.assert_outcomes(passed=1)
    fixed.stdout.fnmatch_lines(["*cache miss, built in*"])


@pytest.mark.slow
def test_the_template_line_comes_before_the_first_test(pytester: pytest.Pytester, shared_dsn: str) -> None:
    write_project(
        pytester,
        'pg_migrations = ["sql:m"]\n',
        {
            "m/1.sql": f"create table t (x int) -- {pytester.path.name}",
            "test_a.py": "import pytest\n\ndef test_a(pg): pass\n\n@pytest.mark.skip('later')\ndef test_b(pg): pass\n",
        },
    )
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        ["collected 2 items", "pgsandbox: migrations template *: cache miss, built in * s", "", "test_a.py .s*"]
    )
    # only skipped tests: the sandbox started after collection is stopped at the end all the same
    (pytester.path / "test_a.py").write_text("import pytest\n\n@pytest.mark.skip('later')\ndef test_b(pg): pass\n")
    skipped = pytester.runpytest_subprocess(f"--pg-dsn={shared_dsn}")
    skipped.assert_outcomes(skipped=1)
    # and neither run left a database behind on the server, only templates
    assert [name for name in shared_databases(shared_dsn) if not name.startswith("pgsandbox_tpl_")] == []
    # collecting only starts nothing
    collect = pytester.runpytest("--co", f"--pg-dsn={shared_dsn}")
    assert "pgsandbox: migrations template" not in collect.stdout.str()


def shared_databases(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [row[0] for row in conn.execute("select datname from pg_database where datname like 'pgsandbox\\_%'")]


@pytest.mark.slow
def test_a_slow_first_clone_says_so(
    pytester: pytest.Pytester, shared_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pgsandbox.sandbox.core

    monkeypatch.setattr(pgsandbox.sandbox.core, "SLOW_CLONE_SECONDS", 0.0)  # every first clone counts as slow
    write_project(
        pytester,
        'pg_migrations = ["sql:m"]\n',
        {
            "m/1.sql": f"create table t (x int) -- {pytester.path.name}",
            "test_a.py": "import pytest\n\ndef test_a(pg): pass\n\n"
            "@pytest.mark.pg(isolation='database')\ndef test_b(pg): pass\n",
        },
    )
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "pgsandbox: cloned the session database from the template in * s (transaction isolation)",
            "pgsandbox: cloned the first database of a test from the template in * s (database isolation)",
        ],
        consecutive=False,
    )
    assert "cloned" not in pytester.runpytest(f"--pg-dsn={shared_dsn}", "-q").stdout.str()
