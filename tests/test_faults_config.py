"""Bad inputs at start-up get one message each, saying what happened and what to do: never INTERNALERROR,
never a traceback of pgsandbox's own code, never a failure after the tests passed (issue 14, configuration)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgsandbox.binaries import working_psql

pytestmark = pytest.mark.slow  # every test here starts a server or a process

PASSING = "def test_it(pg_conn):\n    assert pg_conn.execute('select count(*) from users').fetchone() == (2,)\n"


def clean(result: pytest.RunResult, warned: bool = False) -> str:
    """The whole output, checked for what a clean message never has (a warning's summary names the line of
    pgsandbox that issued it)."""
    output = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in output and "Traceback" not in output
    assert warned or ("src/pgsandbox" not in output and "site-packages/pgsandbox" not in output)
    return output


# -- pg_listen ----------------------------------------------------------------------------------------------
def test_listen_name_that_does_not_resolve_is_a_usage_error(project: pytest.Pytester) -> None:
    project.makepyfile(test_it=PASSING)
    result = project.runpytest("--pg-listen=nosuch.invalid")
    clean(result)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*pgsandbox: --pg-listen: 'nosuch.invalid' does not resolve to an address (*), so the local server "
            "could not listen on it.",
            "*What to do: set pg_listen to an address of this machine (127.0.0.1, ::1, or * for all of them) or a "
            "name that resolves to one (localhost), or to none*",
        ]
    )


def test_listen_is_not_resolved_for_an_existing_server(project: pytest.Pytester, shared_dsn: str) -> None:
    """pg_listen concerns the local server only: a project that sets it still runs on --pg-dsn."""
    project.makepyfile(test_it=PASSING)
    project.runpytest("--pg-listen=nosuch.invalid", f"--pg-dsn={shared_dsn}").assert_outcomes(passed=1)


# -- pg_runtime_dir -----------------------------------------------------------------------------------------
@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[list[Path]]:
    """Directories to mount a tmpfs on (root only); each is unmounted at teardown."""
    mounts: list[Path] = []
    yield mounts
    for path in reversed(mounts):
        subprocess.run(["umount", str(path)], check=False)


def mount_tmpfs(mounts: list[Path], path: Path, options: str) -> None:
    path.mkdir(exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {out.stderr.strip()}")
    mounts.append(path)


def runtime_error(project: pytest.Pytester, runtime_dir: Path) -> str:
    project.makepyfile(test_it=PASSING)
    result = project.runpytest(f"--pg-runtime-dir={runtime_dir}")
    output = clean(result)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*What to do:*set pg_runtime_dir to a writable directory with room (512 MB or more), or unset it (the "
            "default is /dev/shm when it has room, else the temporary directory).",
        ]
    )
    return output


def test_runtime_dir_under_a_regular_file(project: pytest.Pytester, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    output = runtime_error(project, tmp_path / "afile" / "sub")
    assert (
        f"pgsandbox: the local server cannot keep its data in {tmp_path}/afile/sub (--pg-runtime-dir): "
        f"{tmp_path}/afile is a file, not a directory." in output
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_runtime_dir_read_only(project: pytest.Pytester, tmp_path: Path, mounted: list[Path]) -> None:
    if os.geteuid() == 0:
        mount_tmpfs(mounted, tmp_path / "ro", "ro,size=1m")  # root writes through file modes
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
    output = runtime_error(project, tmp_path / "ro")
    assert f"the local server cannot keep its data in {tmp_path}/ro (--pg-runtime-dir): " in output
    assert "Read-only file system" in output or "Permission denied" in output
    assert list((tmp_path / "ro").iterdir()) == []


@pytest.fixture
def enterable_dir() -> Iterator[Path]:
    """A directory every user can enter (pytest's tmp_path is 0700: as root, the server's user cannot)."""
    path = Path(tempfile.mkdtemp(prefix="pgsandbox-test-runtime-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_runtime_dir_too_small(
    project: pytest.Pytester,
    enterable_dir: Path,
    mounted: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cache: str,
) -> None:
    """Cold: initdb runs in the runtime directory and fails there; warm: the cached cluster's copy fails."""
    small = enterable_dir / "small"
    mount_tmpfs(mounted, small, "size=5m")
    if cache == "cold":
        monkeypatch.setenv("PGSANDBOX_CACHE", str(tmp_path / "cold-cache"))
    else:
        project.makepyfile(test_it=PASSING)
        project.runpytest().assert_outcomes(passed=1)  # the cluster is in the cache now
    output = runtime_error(project, small)
    assert (
        f"pgsandbox: the local server's data does not fit in {small} (--pg-runtime-dir): it has 5 MB free, and a "
        "server needs about 40 MB to start" in output
    )
    assert "What to do: free space there, or set pg_runtime_dir" in output
    assert "No space left on device" not in output  # not one line per file that did not fit
    assert [p.name for p in small.iterdir()] == [f"pgsandbox-{os.geteuid()}"]
    assert list((small / f"pgsandbox-{os.geteuid()}").iterdir()) == []  # the run's directory is gone


def test_runtime_dir_the_servers_os_user_cannot_enter(project: pytest.Pytester) -> None:
    """As root the server runs as another OS user; `mktemp -d` makes a 0700 directory that user cannot enter.
    This used to fail in initdb ("could not open file .../pwfile") with advice about pg_initdb_args."""
    if os.geteuid() != 0:
        pytest.skip("only root runs the server as another OS user")
    private = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True, check=True).stdout.strip())
    try:
        output = runtime_error(project, private)
        assert (
            f"(PostgreSQL refuses to run as root), which cannot enter {private} (mode 700), on the way to its data "
            f"in {private} (--pg-runtime-dir)." in output
        )
        assert f"What to do: let every user enter it (chmod o+x {private}; `mktemp -d` makes 0700" in output
        assert "pg_initdb_args" not in output and "pwfile" not in output
        assert list(private.iterdir()) == []
    finally:
        subprocess.run(["rm", "-rf", str(private)], check=True)


# -- pg_report ----------------------------------------------------------------------------------------------
def test_report_into_a_missing_directory_is_a_usage_error(project: pytest.Pytester, tmp_path: Path) -> None:
    project.makepyfile(test_it=PASSING)
    result = project.runpytest(f"--pg-report=json:{tmp_path}/missing/report.json")
    clean(result)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            f"*pgsandbox: --pg-report: the report's directory {tmp_path}/missing does not exist.",
            f"*What to do: create {tmp_path}/missing first, or give --pg-report a path in an existing, writable "
            "directory.",
        ]
    )


def test_report_directory_gone_during_the_run_is_one_line(project: pytest.Pytester, tmp_path: Path) -> None:
    """The tests passed: the run passes, and says the report could not be written."""
    (tmp_path / "reports").mkdir()
    project.makepyfile(
        test_it=PASSING + f"\ndef test_removes_the_directory():\n    __import__('shutil').rmtree({str(tmp_path)!r})\n"
    )
    result = project.runpytest(f"--pg-report=json:{tmp_path}/reports/report.json")
    clean(result)
    result.assert_outcomes(passed=2)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [f"pgsandbox could not write the report to {tmp_path}/reports/report.json: No such file or directory; fix*"]
    )


# -- pg_seed, pg_migrations_inputs --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("seed", "message"),
    [
        ("bogus:x", "pgsandbox: pg_seed entry 'bogus:x': unknown kind 'bogus'."),
        ("sql:nodir", "*migrations directory */nodir does not exist (from pg_seed sql:nodir).*"),
        ("python:bad", "*What to do: write pg_seed = python:myapp.db:migrate*"),
    ],
)
def test_bad_seed_entry_is_named_pg_seed(project: pytest.Pytester, seed: str, message: str) -> None:
    project.makepyfile(test_it=PASSING)
    result = project.runpytest(f"--pg-seed={seed}")
    output = clean(result)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([message])
    assert "pg_migrations " not in output and "pg_migrations;" not in output


def test_migrations_inputs_glob_that_matches_nothing_warns(project: pytest.Pytester) -> None:
    """A warning, not an error: the run is right (its hash has every file that exists), but a typo would leave
    the files meant out of the hash, and a template would go stale without a word when they change."""
    project.makepyfile(test_it=PASSING)
    (project.path / "data").mkdir()
    (project.path / "data/prices.csv").write_text("1,2\n")
    result = project.runpytest("--pg-migrations-inputs=data/*.csv", "--pg-migrations-inputs=dta/*.csv")
    clean(result, warned=True)
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "*PgSandboxWarning: pg_migrations_inputs: 'dta/*.csv' matches no file under *, so no file of it is in "
            "the template's hash. Fix the glob (relative to the rootdir) if it is meant to match something."
        ]
    )
    assert "'data/*.csv' matches" not in result.stdout.str()
    strict = project.runpytest("-W", "error::pgsandbox.errors.PgSandboxWarning", "--pg-migrations-inputs=dta/*.csv")
    clean(strict)
    assert strict.ret == pytest.ExitCode.USAGE_ERROR
    strict.stderr.fnmatch_lines(["*pgsandbox: pg_migrations_inputs: 'dta/*.csv' matches no file under *"])


# -- the pg marker ------------------------------------------------------------------------------------------
def test_positional_marker_argument_fails_without_a_traceback(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_it="""
        import pytest

        @pytest.mark.pg("database")
        def test_it(pg_conn):
            pass
        """
    )
    result = project.runpytest()
    clean(result)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "pgsandbox: @pytest.mark.pg got 'database' without a name; it takes keyword options only, such as "
            "@pytest.mark.pg(isolation='database'): isolation, keep_failed, *"
        ]
    )


def test_every_marker_value_is_checked_by_its_options_parser(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_it="""
        import pytest

        @pytest.mark.pg(keep_failed="yes please")
        def test_keep(pg_conn):
            pass

        @pytest.mark.pg(async_driver="aiopg")
        def test_driver_of_a_test_that_uses_no_async_fixture(pg_conn):
            pass

        @pytest.mark.pg(isolation=2)
        def test_not_a_string(pg_conn):
            pass

        @pytest.mark.pg(keep_failed="yes", isolation=" database ", guard="warn")
        def test_good_values(pg_conn):
            pass

        @pytest.mark.pg(isolation=None)  # not set here: the command line's
        def test_none_leaves_the_option_to_the_command_line(pg):
            assert pg.isolation == "transaction"
        """
    )
    result = project.runpytest("-p", "no:randomly")
    output = clean(result)
    result.assert_outcomes(passed=2, errors=3)
    result.stdout.fnmatch_lines(
        [
            "pgsandbox: @pytest.mark.pg(keep_failed='yes please'): expected true or false.",
            "  What to do: keep_failed takes: keep the database of a failed test*",
            "pgsandbox: @pytest.mark.pg(async_driver='aiopg') is not one of asyncpg, psycopg.",
            "  What to do: async_driver takes: driver of pg_async_engine/pg_async_session*",
            "pgsandbox: @pytest.mark.pg(isolation=2): expected a string.",
        ]
    )
    assert "During handling" not in output


# -- Alembic ------------------------------------------------------------------------------------------------
ALEMBIC_ENV = """\
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

BAD_REVISION = """\
from alembic import op
revision = "a1"
down_revision = None
def upgrade():
    op.execute("create table users (id int)")
    op.execute("insert into nosuch values (1)")
def downgrade():
    pass
"""


def test_alembic_failure_names_the_revision_and_line(pytester: pytest.Pytester, shared_dsn: str) -> None:
    pytest.importorskip("alembic")
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\npg_migrations = ["alembic:alembic.ini"]\n')
    pytester.makefile(".ini", alembic="[alembic]\nscript_location = %(here)s/migrations\n")
    (pytester.path / "migrations/versions").mkdir(parents=True)
    (pytester.path / "migrations/env.py").write_text(ALEMBIC_ENV)
    (pytester.path / "migrations/script.py.mako").write_text("")
    (pytester.path / "migrations/versions/a1_bad.py").write_text(BAD_REVISION)
    pytester.makepyfile(test_it="def test_it(pg):\n    pass\n")
    result = pytester.runpytest(f"--pg-dsn={shared_dsn}")
    output = clean(result)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            'pgsandbox: alembic:alembic.ini: `alembic upgrade head` failed: ProgrammingError: *relation "nosuch" '
            "does not exist",
            "  at env.py, line 10, in <module>: context.run_migrations()",
            '  at versions/a1_bad.py, line 6, in upgrade: op.execute("insert into nosuch values (1)")',
            "  What to do: fix versions/a1_bad.py, line 6 and run again; the template was not kept.",
        ]
    )
    assert "traceback above" not in output
    assert shared_dsn.split(":")[2].split("@")[0] not in output  # the password


# -- pg_dsn -------------------------------------------------------------------------------------------------
def test_dsn_with_a_port_that_is_not_a_number(project: pytest.Pytester) -> None:
    project.makepyfile(test_it=PASSING)
    result = project.runpytest("--pg-dsn=postgresql://ada:s3cret-pw@localhost:abc/postgres")
    output = clean(result)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "pgsandbox: the port 'abc' in --pg-dsn is not a port number.",
            "  What to do: give a port from 1 to 65535 in --pg-dsn (postgresql://user@host:5432/dbname), or leave "
            "it out for 5432.",
        ]
    )
    assert "resolve" not in output and "s3cret-pw" not in output


def test_pgport_that_is_not_a_number(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPORT", "54x2")
    project.makepyfile(test_it=PASSING)
    result = project.runpytest("--pg-dsn=postgresql://ada@localhost/postgres")
    clean(result)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["pgsandbox: the port '54x2' in PGPORT is not a port number."])


# -- a psql that runs ---------------------------------------------------------------------------------------
BROKEN_PSQL = """\
#!/bin/sh
echo "Error: You must install at least one postgresql-client-<version> package" >&2
exit 1
"""


@pytest.mark.usefixtures("machine_wide_servers")  # its kept run: `pgsandbox clean` elsewhere would take it
def test_kept_database_command_uses_a_psql_that_runs(
    project: pytest.Pytester, shared_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian's /usr/bin/psql is a wrapper that fails once the postgresql-client package is gone (as with
    /usr/lib/postgresql hidden): the printed command must name a psql that opens the kept database."""
    wrapper = tmp_path / "bin" / "psql"
    wrapper.parent.mkdir()
    wrapper.write_text(BROKEN_PSQL)
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    working_psql.cache_clear()
    try:
        project.makepyfile(
            test_it="def test_fails(pg_conn):\n    pg_conn.execute(\"insert into users (name) values ('kept')\")\n"
            "    assert False\n"
        )
        result = project.runpytest(f"--pg-dsn={shared_dsn}", "--pg-keep-failed")
        result.assert_outcomes(failed=1)
        commands = {line.strip() for line in result.stdout.lines if line.strip().startswith("PGPASSFILE=")}
        assert len(commands) == 1
        (command,) = commands
        env_part, rest = command.split(" ", 1)
        argv = shlex.split(rest)
        assert argv[0] != str(wrapper) and argv[0] != "psql", command
        try:
            out = subprocess.run(
                [*argv, "-qAtc", "select string_agg(name, ',' order by name) from users"],
                env={**os.environ, "PGPASSFILE": env_part.split("=", 1)[1]},
                capture_output=True,
                text=True,
            )
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == "ada,bob,kept"
        finally:
            dbname = argv[1].rsplit("dbname=", 1)[1]
            import psycopg

            with psycopg.connect(shared_dsn, autocommit=True) as admin:
                admin.execute(f'drop database if exists "{dbname}" with (force)')
    finally:
        working_psql.cache_clear()


def test_working_psql_skips_a_broken_wrapper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wrapper = tmp_path / "psql"
    wrapper.write_text(BROKEN_PSQL)
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    working_psql.cache_clear()
    try:
        found = working_psql()
        assert found != str(wrapper)
        if found is not None:  # the wheel's, or a system installation's
            assert subprocess.run([found, "--version"], capture_output=True).returncode == 0
    finally:
        working_psql.cache_clear()
