from __future__ import annotations

from pathlib import Path

import pytest

from pgsandbox import Settings
from pgsandbox.errors import ConfigError


def test_precedence_is_cli_then_env_then_ini_then_default() -> None:
    settings = Settings.from_sources(
        cli={"version": "16"},
        env={"PGSANDBOX_VERSION": "15", "PGSANDBOX_PORT": "5555"},
        ini={"version": "14", "port": "4444", "listen": "127.0.0.1"},
    )
    assert settings.version == "16"
    assert settings.port == 5555
    assert settings.listen == "127.0.0.1"
    assert settings.server == "auto"
    assert settings.source_of("version") == "--pg-version"
    assert settings.source_of("port") == "PGSANDBOX_PORT"
    assert settings.source_of("listen") == "ini pg_listen"


def test_listen_defaults_to_loopback_and_none_means_the_socket_alone() -> None:
    from pgsandbox.settings import listens_on_tcp

    assert Settings.from_sources(env={}).listen == "127.0.0.1"
    for word in ("none", "None", "off", "NO"):
        listen = Settings.from_sources(env={"PGSANDBOX_LISTEN": word}).listen
        assert listen == "none" and not listens_on_tcp(listen)
    assert listens_on_tcp(Settings.from_sources(cli={"listen": "*"}).listen)
    assert not listens_on_tcp(None)


def test_lists_and_paths_are_parsed() -> None:
    settings = Settings.from_sources(
        env={"PGSANDBOX_SERVER_SETTINGS": "work_mem=64MB;search_path='a, b'", "PGSANDBOX_BIN": "~/pg/bin"},
        ini={"initdb_args": ["--data-checksums"]},
    )
    assert settings.server_settings == (("work_mem", "64MB"), ("search_path", "a, b"))
    assert settings.bin == Path.home() / "pg" / "bin"
    assert settings.initdb_args == ("--data-checksums",)


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        (
            {"cli": {"server": "remote"}},
            "--pg-server: bad value 'remote': expected one of auto, local, external",
        ),
        ({"env": {"PGSANDBOX_PORT": "70000"}}, "PGSANDBOX_PORT: bad value '70000': expected a port number"),
        (
            {"ini": {"version": "sixteen"}},
            "ini pg_version: bad value 'sixteen': expected a PostgreSQL version",
        ),
        ({"ini": {"server_settings": ["work_mem"]}}, "'work_mem' is not of the form name=value"),
        ({"env": {"PGSANDBOX_REBUILD": "maybe"}}, "PGSANDBOX_REBUILD: bad value 'maybe': expected true or false"),
        (
            {"ini": {"templates_keep": "0"}},
            "ini pg_templates_keep: bad value '0': expected a whole number of at least 1",
        ),
        ({"cli": {"clone_strategy": "reflink"}}, "expected one of auto, file_copy, wal_log"),
    ],
)
def test_bad_values_name_the_source_and_the_fix(sources: dict[str, dict[str, object]], expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        Settings.from_sources(**{"env": {}, **sources})  # type: ignore[arg-type]
    assert expected in str(error.value)
    assert "What to do: fix" in str(error.value)


@pytest.mark.slow
def test_bad_option_stops_pytest_with_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("--pg-port=abc")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*pgsandbox: --pg-port: bad value 'abc': expected a port number*"])


@pytest.mark.slow
def test_ini_options_reach_the_plugin(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\npg_version = 16\npg_server_settings =\n    work_mem=7MB\n")
    pytester.makepyfile(
        """
        from pgsandbox.pytest.plugin import settings
        def test_settings(request):
            s = settings(request.config)
            assert s.version == "16"
            assert s.server_settings == (("work_mem", "7MB"),)
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_migrations_isolation_and_flags() -> None:
    settings = Settings.from_sources(
        cli={"rebuild": True, "migrations": ["sql:a", "python:b:c"]},
        env={"PGSANDBOX_KEEP_FAILED": "yes", "PGSANDBOX_MIGRATIONS_INPUTS": "data/*.csv;seed.json"},
        ini={"isolation": "database", "rebuild": "false", "seed": ["sql:seed"]},
    )
    assert settings.migrations == ("sql:a", "python:b:c")
    assert settings.migrations_inputs == ("data/*.csv", "seed.json")
    assert settings.seed == ("sql:seed",)
    assert settings.isolation == "database"
    assert settings.rebuild is True and settings.keep_failed is True
    assert Settings.from_sources(cli={"rebuild": None}, env={}, ini={"rebuild": "true"}).rebuild is True
    defaults = Settings.from_sources(env={})
    assert (defaults.isolation, defaults.rebuild, defaults.keep_failed, defaults.templates_keep) == (
        "transaction",
        False,
        False,
        3,
    )
