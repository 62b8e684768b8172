"""No password in any output, by construction (issue 14): every password of a run is recorded, each failure that
used to print one is forced (the postmaster killed, an existing server stopped, the session database dropped, a
test raising with every connection form in its frame, keep-failed on an existing server), and everything is
searched: the terminal at ``-v -s -rA --tb=long --showlocals``, junitxml, the JSON report, the server's logs.

"By construction": the same runs with pgsandbox's masking switched off (no registered secret, no DSN pattern)
print no password either, because no DSN, URL, parameter or frame local pgsandbox makes holds one. asyncpg is the
exception it cannot construct away: it reads the passfile into its own connection parameters (a namedtuple in its
frames), so a failed asyncpg connect is checked with the masking on (the second line of defence)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from conftest import StartLocal
from pgsandbox import LocalServer
from pgsandbox.server import runs

pytestmark = pytest.mark.slow  # every test here starts a server or a process

pytest.importorskip("asyncpg")
pytest.importorskip("psycopg2")

OPTIONS = ("-v", "-s", "-rA", "--tb=long", "--showlocals", "-p", "no:randomly", "-p", "no:cacheprovider")

RECORDER = """
import json, os, re, shutil
from pathlib import Path

import pytest

if os.environ.get("SECRETS_UNMASKED"):
    # masking off: what is not printed must not be there in the first place
    import pgsandbox.common.redact as redaction

    class _Forgetful(set):
        def add(self, item):
            pass

    redaction._secrets = _Forgetful()
    redaction._KEYWORD = re.compile(r"(?!)(x)(x)")
    redaction._URL_USERINFO = re.compile(r"(?!)(x)(x)(x)")

OUT = Path(os.environ["SECRETS_OUT"])


@pytest.fixture(scope="session", autouse=True)
def record_secrets(pg_sandbox):
    server = pg_sandbox.server
    if hasattr(server, "reveal_password"):
        found = [server.reveal_password(), server.login_password()]
    else:  # before the passfile (to see this test fail without it)
        found = [server.params.get("password"), server.login and server.login.password]
    (OUT / "secrets.json").write_text(json.dumps([str(secret) for secret in found if secret]))
    (OUT / "passfile.txt").write_text(str(getattr(server, "passfile", None) and server.passfile.path))
    yield
    run = getattr(server, "run", None)
    if run is not None:  # a local server's logs, before the run's directory goes
        for path in [run.log, *sorted((run.path / "log").glob("*"))]:
            if path.is_file():
                shutil.copy(path, OUT / f"log-{path.name}")
"""

FRAMES = """
import pytest


@pytest.fixture
def app_config(pg):
    dsn, url, sqlalchemy_url, env, params = pg.dsn, pg.database_url, pg.url("asyncpg"), pg.env, pg.params
    yield {"DATABASE_URL": url}


def test_1_raises_with_every_form_in_its_frame(pg, app_config):
    dsn, url, sqlalchemy_url, env, params = pg.dsn, pg.database_url, pg.url(), pg.env, pg.params
    print("the app's settings:", dsn, url, sqlalchemy_url, env, params)
    raise RuntimeError(f"the app could not start with {dsn} and {url}")


@pytest.fixture
def broken_fixture(pg, pg_server, pg_login):
    dsn, admin, login = pg.dsn, pg_server.dsn, pg_login.database_url
    raise RuntimeError("the fixture's own failure")


def test_2_own_exception_through_a_fixture_frame(broken_fixture):
    pass


def test_3_drops_the_session_database(pg, pg_server):
    pg_server.admin.execute(f'drop database "{pg.name}" with (force)')
    pg.fetchval("select 1")


def test_4_after_the_drop(pg):
    assert pg.fetchval("select 1") == 1
"""

KILL = """
import os, signal, time

import psutil
import psycopg
import pytest


def test_1_kills_the_server(pg):
    postmaster = psutil.Process(int(os.environ["KILL_PID"]))
    for process in [*postmaster.children(recursive=True), postmaster]:
        process.kill()
    # not wait(): the postmaster is the outer test's child, a zombie until that process reaps it
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if postmaster.status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    pg.fetchval("select 1")


def test_2_pg_after_the_kill(pg):
    pass


@pytest.mark.pg(isolation="database")
def test_3_psycopg2_after_the_kill(pg_psycopg2):
    pass


def test_4_own_connect_after_the_kill(pg):
    psycopg.connect(pg.dsn)
"""

KILL_ASYNCPG = """

async def test_5_asyncpg_after_the_kill(pg_asyncpg):
    pass


async def test_6_own_asyncpg_connect_after_the_kill(pg):
    import asyncpg

    await asyncpg.connect(pg.database_url)
"""

KEEP = """
def test_fails(pg):
    pg.execute("insert into users (name) values ('evidence')")
    assert False
"""


def setup_project(project: pytest.Pytester, tests: str, out: Path) -> None:
    project.makeconftest(RECORDER)
    project.makepyfile(test_faults=tests)
    with (project.path / "pyproject.toml").open("a") as ini:
        ini.write('\nasyncio_mode = "auto"\nasyncio_default_fixture_loop_scope = "function"\n')
    out.mkdir(exist_ok=True)


def run_project(
    project: pytest.Pytester, out: Path, *args: str, unmasked: bool = False, env: dict[str, str] | None = None
) -> str:
    """Run the project in a process of its own, as a user would; everything it wrote, as one text."""
    environ = {**os.environ, "SECRETS_OUT": str(out), **(env or {})}
    environ.pop("SECRETS_UNMASKED", None)
    if unmasked:
        environ["SECRETS_UNMASKED"] = "1"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *OPTIONS,
            f"--junitxml={out / 'junit.xml'}",
            f"--pg-report=json:{out / 'report.json'}",
            *args,
        ],
        cwd=project.path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.stdout + result.stderr


def everything(output: str, out: Path, *logs: Path) -> str:
    """The terminal, junitxml, the JSON report and the server's logs."""
    texts = [output]
    for path in [*sorted(out.glob("*")), *logs]:
        if path.is_file() and path.name not in ("secrets.json", "passfile.txt"):
            texts.append(path.read_text(errors="replace"))
    return "\n".join(texts)


def assert_no_secret(text: str, secrets: list[str]) -> None:
    assert secrets, "nothing recorded: the check would be vacuous"
    for secret in secrets:
        assert secret not in text, f"a password of the run was printed: ...{text[text.index(secret) - 300 :][:600]}"


def recorded(out: Path) -> list[str]:
    secrets: list[str] = json.loads((out / "secrets.json").read_text())
    return secrets


@pytest.mark.parametrize("unmasked", [False, True], ids=["masked", "unmasked"])
def test_no_password_when_frames_fail_and_the_session_database_is_dropped(
    project: pytest.Pytester, tmp_path: Path, unmasked: bool
) -> None:
    out = tmp_path / "out"
    setup_project(project, FRAMES, out)
    output = run_project(project, out, unmasked=unmasked)
    # the failures happened, with their frames' locals shown
    assert "FAILED test_faults.py::test_1_raises_with_every_form_in_its_frame" in output, output
    assert "the fixture's own failure" in output and "sqlalchemy_url = " in output
    assert "passfile=" in output  # each form names the passfile instead
    assert "test_4_after_the_drop" in output
    assert (out / "junit.xml").exists() and (out / "report.json").exists()
    assert any(path.name.startswith("log-") for path in out.iterdir())
    assert_no_secret(everything(output, out), recorded(out))


@pytest.mark.parametrize("unmasked", [False, True], ids=["masked", "unmasked"])
def test_no_password_when_the_local_postmaster_is_killed(
    project: pytest.Pytester, tmp_path: Path, unmasked: bool
) -> None:
    out = tmp_path / "out"
    # the test kills its own local server: it learns the pid from the recorder's view of pg_server
    project.makeconftest(RECORDER)
    tests = KILL.replace('int(os.environ["KILL_PID"])', "pg.server.process.pid")
    if not unmasked:
        tests += KILL_ASYNCPG
    setup_project(project, tests, out)
    output = run_project(project, out, unmasked=unmasked)
    assert "FAILED test_faults.py::test_1_kills_the_server" in output, output
    assert "test_4_own_connect_after_the_kill" in output
    if not unmasked:
        assert "test_6_own_asyncpg_connect_after_the_kill" in output
    assert_no_secret(everything(output, out), recorded(out))


@pytest.fixture
def external(start_local: StartLocal) -> Iterator[LocalServer]:
    yield start_local()


@pytest.mark.parametrize("unmasked", [False, True], ids=["masked", "unmasked"])
def test_no_password_when_the_existing_server_stops(
    project: pytest.Pytester, tmp_path: Path, external: LocalServer, unmasked: bool
) -> None:
    """The real ``--pg-dsn`` password: in the DSN given, moved to the run's passfile at start."""
    assert external.tcp is not None
    password = str(external.reveal_password())
    dsn = f"postgresql://postgres:{password}@127.0.0.1:{external.tcp[1]}/postgres"
    out = tmp_path / "out"
    setup_project(project, KILL + ("" if unmasked else KILL_ASYNCPG), out)
    output = run_project(project, out, f"--pg-dsn={dsn}", unmasked=unmasked, env={"KILL_PID": str(external.pid)})
    assert "FAILED test_faults.py::test_1_kills_the_server" in output, output
    assert "test_4_own_connect_after_the_kill" in output
    logs = [external.log_path, *sorted((external.run.path / "log").glob("*"))]
    assert_no_secret(everything(output, out, *logs), [password, *recorded(out)])


@pytest.mark.usefixtures("machine_wide_servers")  # its kept run: `pgsandbox clean` elsewhere would take it
def test_keep_failed_on_an_existing_server_keeps_its_passfile_with_the_run_until_reaped(
    project: pytest.Pytester, tmp_path: Path, shared: LocalServer, shared_dsn: str
) -> None:
    """No ``/tmp/pgsandbox-pgpass-*`` left for good: the passfile is in the run's own directory, marked kept,
    and ``pgsandbox reap --include-kept`` removes it with the kept database."""
    out = tmp_path / "out"
    setup_project(project, KEEP, out)
    output = run_project(project, out, f"--pg-dsn={shared_dsn}", "--pg-keep-failed")
    assert "the database of this test is kept as" in output, output
    assert_no_secret(everything(output, out), [str(shared.reveal_password()), *recorded(out)])
    (passfile,) = {line.split("PGPASSFILE=")[1].split()[0] for line in output.splitlines() if "PGPASSFILE=" in line}
    assert passfile == (out / "passfile.txt").read_text()  # the run's own, not a /tmp/pgsandbox-pgpass-* for good
    path = Path(passfile)
    run = runs.RunDir(path.parent)
    assert path.parent.name.startswith("run-") and runs.is_kept(run)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # it opens the kept database, as the command says
    kept = next(line for line in output.splitlines() if "is kept as" in line).split("is kept as ")[1].split(";")[0]
    params = shared.params
    with psycopg.connect(
        host="127.0.0.1", port=params["port"], user="postgres", dbname=kept, passfile=passfile
    ) as conn:
        assert conn.execute("select count(*) from users where name = 'evidence'").fetchone() == (1,)
    # a later run leaves it (it is kept), reap --include-kept drops the database and removes the file
    assert run.path not in {leftover.run.path for leftover in runs.find_leftovers(runs.search_bases())}
    # what `pgsandbox reap --include-kept` does, for this run only (other tests' runs share the server)
    from pgsandbox.server import reaper

    (dead,) = [found for found in reaper.runs_on(shared.admin).values() if f"run-{found.run_id}" == run.path.name]
    assert dead.kept == [kept]
    reaper.drop_dead_runs(shared.admin, [dead])
    assert run.path.exists()  # without --include-kept the kept database, and its passfile, stay
    reaper.drop_dead_runs(shared.admin, [dead], include_kept=True)
    assert not run.path.exists()
    assert not shared.admin.execute("select 1 from pg_database where datname = %s", [kept]).fetchall()


def test_an_existing_server_run_leaves_no_secret_on_disk(
    project: pytest.Pytester, tmp_path: Path, shared: LocalServer, shared_dsn: str
) -> None:
    out = tmp_path / "out"
    setup_project(project, "def test_ok(pg):\n    assert pg.fetchval('select 1') == 1\n", out)
    output = run_project(project, out, f"--pg-dsn={shared_dsn}")
    assert "1 passed" in output, output
    passfile = Path((out / "passfile.txt").read_text())
    assert passfile.parent.name.startswith("run-") and not passfile.parent.exists()  # it went with the run


PGPASSWORD_SET = """
import psycopg
import pytest


def test_pg(pg):
    assert pg.fetchval("select 1") == 1


def test_own_connection_on_the_dsn(pg):
    with psycopg.connect(pg.dsn) as conn:
        assert conn.execute("select current_user").fetchone() == (pg.info.user,)


def test_psycopg2(pg_psycopg2):
    with pg_psycopg2.cursor() as cursor:
        cursor.execute("select 1")


async def test_asyncpg(pg_asyncpg):
    assert await pg_asyncpg.fetchval("select 1") == 1


@pytest.mark.pg(isolation="database")
def test_engine_in_database_isolation(pg_engine):
    with pg_engine.connect() as conn:
        assert conn.exec_driver_sql("select 1").scalar() == 1


@pytest.mark.pg(isolation="database", async_driver="asyncpg")
async def test_async_engine_on_asyncpg_in_database_isolation(pg_async_engine):
    async with pg_async_engine.connect() as conn:
        assert (await conn.exec_driver_sql("select 1")).scalar() == 1
"""


@pytest.mark.parametrize("server", ["local", "existing"])
def test_a_pgpassword_in_the_environment_does_not_beat_the_passfile(
    project: pytest.Pytester, tmp_path: Path, shared_dsn: str, server: str
) -> None:
    """libpq and asyncpg take PGPASSWORD before a passfile: pgsandbox's DSNs say ``password=''`` (libpq then reads
    the passfile) and its asyncpg connections get the password from the passfile themselves."""
    out = tmp_path / "out"
    setup_project(project, PGPASSWORD_SET, out)
    args = [f"--pg-dsn={shared_dsn}"] if server == "existing" else []
    output = run_project(project, out, *args, env={"PGPASSWORD": "not-the-password"})
    assert "6 passed" in output, output


def test_no_form_parameter_or_description_holds_a_password(
    tmp_path: Path, shared: LocalServer, shared_dsn: str
) -> None:
    """What pgsandbox hands out, or keeps where a traceback shows it, names the passfile instead."""
    from pgsandbox import Sandbox, Settings

    settings = Settings(dsn=shared_dsn)
    with Sandbox.start(settings, root=tmp_path) as sandbox:
        login = sandbox.session_login()
        with sandbox.database("transaction") as db:
            secrets = [str(shared.reveal_password()), str(db.reveal_password())]
            assert secrets[1] != secrets[0] and len(secrets[1]) >= 24  # the tests' own role
            handed = [
                db.dsn,
                db.database_url,
                db.url(),
                db.url("asyncpg"),
                repr(db.env),
                repr(db.params),
                login.dsn,
                login.database_url,
                repr(login.params),
                json.dumps(sandbox.handoff()),  # what xdist's workers get
                sandbox.server.dsn,
                sandbox.server.admin_dsn,
                repr(sandbox.server),
                repr(settings),
                repr(db.reveal_password()),
            ]
            for text in handed:
                assert "passfile" in text.lower() or "***" in text or text == repr(settings), text
                for secret in secrets:
                    assert secret not in text, text
            passfile = Path(db.passfile)
            assert stat.S_IMODE(passfile.stat().st_mode) == 0o600
            assert stat.S_IMODE(passfile.parent.stat().st_mode) == 0o700
    assert not passfile.parent.exists()  # the run's secrets went with it
