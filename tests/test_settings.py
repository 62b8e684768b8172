from __future__ import annotations

from pathlib import Path

import pytest

from pgsandbox import Settings
from pgsandbox.errors import ConfigError
from pgsandbox.settings import BY_NAME, OPTIONS


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
        ({"ini": {"django": "on"}}, "ini pg_django: bad value 'on': expected one of auto, psycopg, psycopg2, off"),
        (
            {"env": {"PGSANDBOX_CREDENTIALS_TIMEOUT": "0"}},
            "PGSANDBOX_CREDENTIALS_TIMEOUT: bad value '0': expected a number of seconds greater than 0",
        ),
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
    pytester.makeini("[pytest]\npg_keep_failed = maybe\n")  # a flag: pytest itself reads it as a bool
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*pgsandbox: ini pg_keep_failed: bad value: invalid truth value 'maybe'; expected true or false.",
            "*What to do: fix ini pg_keep_failed; --pg-keep-failed takes: keep the database of a failed test*",
        ]
    )


@pytest.mark.slow
def test_flags_are_bools_in_the_help(pytester: pytest.Pytester) -> None:
    """pytest's --help names each ini key's type: a flag is a bool, not a string."""
    pytester.makeini("[pytest]\npg_show_sql = yes\n")
    config = pytester.parseconfig()
    assert config.getini("pg_show_sql") is True
    assert {name: config._parser._inidict[f"pg_{name}"][1] for name in ("rebuild", "keep_failed", "show_sql")} == {
        "rebuild": "bool",
        "keep_failed": "bool",
        "show_sql": "bool",
    }


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


# One good value of every option, as text (what the command line, the environment and an ini file give), and
# what it becomes. A new option needs a row here: the test below fails until it has one.
GOOD_VALUES: dict[str, tuple[str, object]] = {
    "server": ("external", "external"),
    "dsn": ("postgresql://app@db/app", "postgresql://app@db/app"),
    "credentials_command": ("vault read -format=json database/creds/ci", "vault read -format=json database/creds/ci"),
    "credentials_timeout": ("45", 45.0),
    "bin": ("/opt/pg/bin", Path("/opt/pg/bin")),
    "version": ("16.4", "16.4"),
    "extensions": ('uuid-ossp, "pgcrypto"', ("uuid-ossp", "pgcrypto")),
    "listen": ("OFF", "none"),
    "port": ("5433", 5433),
    "server_settings": ("work_mem = 64MB;lc_messages='it''s'", (("work_mem", "64MB"), ("lc_messages", "it's"))),
    "initdb_args": ("--data-checksums  -k", ("--data-checksums", "-k")),
    "cache": ("/var/cache/pgsb", Path("/var/cache/pgsb")),
    "cache_max_size": ("1.5G", 1_500_000_000),
    "runtime_dir": ("/run/pgsb", Path("/run/pgsb")),
    "migrations": ("sql:migrations;alembic:alembic.ini", ("sql:migrations", "alembic:alembic.ini")),
    "migrations_inputs": ("data/*.csv", ("data/*.csv",)),
    "seed": ("python:seed:run", ("python:seed:run",)),
    "isolation": ("database", "database"),
    "rebuild": ("yes", True),
    "keep_failed": ("ON", True),
    "keep_alive": ("10 min", 600.0),
    "clone_strategy": ("wal_log", "wal_log"),
    "recycle_clones": ("off", "off"),
    "gc_freeze": ("off", "off"),
    "templates_keep": ("5", 5),
    "role": ("admin", "admin"),
    "reap_grace": ("never", -1.0),
    "statement_timeout": ("30 s", "30s"),
    "lock_timeout": ("500ms", "500ms"),
    "idle_timeout": ("0", "0"),
    "guard": ("warn", "warn"),
    "fence": ("warn", "warn"),
    "fence_allow": ("127.0.0.1:5433, db.internal", ("127.0.0.1:5433", "db.internal")),
    "env_url": ("DATABASE_URL", ("DATABASE_URL",)),
    "data_seed": ("42", "42"),
    "sql_log": ("csvlog", "csvlog"),
    "show_sql": ("1", True),
    "reset_sequences": ("true", True),
    "report": ("json:report.json", "json:report.json"),
    "async_driver": ("psycopg", "psycopg"),
    "session_class": ("sqlmodel:Session", "sqlmodel:Session"),
    "async_session_class": ("sqlmodel.ext.asyncio.session:AsyncSession", "sqlmodel.ext.asyncio.session:AsyncSession"),
    "django": ("psycopg2", "psycopg2"),
}


def test_every_option_is_read_from_the_environment_and_named_after_it() -> None:
    assert sorted(GOOD_VALUES) == sorted(option.name for option in OPTIONS)
    env = {BY_NAME[name].env: text for name, (text, _) in GOOD_VALUES.items()}
    settings = Settings.from_sources(env=env)
    assert {name: getattr(settings, name) for name in GOOD_VALUES} == {
        name: parsed for name, (_, parsed) in GOOD_VALUES.items()
    }
    assert all(settings.source_of(option.name) == option.env for option in OPTIONS)
    option = BY_NAME["keep_failed"]
    assert (option.cli, option.env, option.ini) == ("--pg-keep-failed", "PGSANDBOX_KEEP_FAILED", "pg_keep_failed")


@pytest.mark.parametrize("name", [option.name for option in OPTIONS if option.kind != "flag"])
def test_every_option_is_read_alike_from_the_command_line_and_the_ini_file(name: str) -> None:
    text, parsed = GOOD_VALUES[name]
    option = BY_NAME[name]
    # ini and command line give lists as lists (one line, or one --pg-x, per item); the environment splits text
    items = [item for item in text.split(option.env_separator) if item.strip()]
    raw: str | list[str] = items if option.kind == "list" else text
    assert getattr(Settings.from_sources(cli={name: raw}, env={}), name) == parsed
    assert getattr(Settings.from_sources(ini={name: raw}, env={}), name) == parsed


def test_an_empty_or_unset_value_falls_through_to_the_next_source() -> None:
    settings = Settings.from_sources(
        cli={"version": "", "keep_failed": False, "migrations": []},
        env={"PGSANDBOX_VERSION": "  ", "PGSANDBOX_KEEP_FAILED": "true", "PGSANDBOX_MIGRATIONS": ";"},
        ini={"version": "15", "migrations": ["sql:m"]},
    )
    assert (settings.version, settings.source_of("version")) == ("15", "ini pg_version")
    assert (settings.keep_failed, settings.source_of("keep_failed")) == (True, "PGSANDBOX_KEEP_FAILED")
    assert (settings.migrations, settings.source_of("migrations")) == (("sql:m",), "ini pg_migrations")
    assert Settings.from_sources(env={}).source_of("version") == "pg_version"  # the default: where to set it


KEEP_ALIVE = "expected a duration such as 30s, 10min or 1h (0 or off: the server stops with the run)"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("extensions", "uuid ossp", "expected an extension name as in CREATE EXTENSION, such as uuid-ossp or pgcrypto"),
        ("version", "16beta", "expected a PostgreSQL version such as 16 or 16.4"),
        ("port", "-1", "expected a port number from 0 (pick a free one) to 65535"),
        ("cache_max_size", "2 parsecs", "expected a size such as 500MB, 2GB or 1.5G (0 or none: no bound)"),
        ("reap_grace", "-5", "expected a number of seconds (0: at once; -1 or never: never)"),
        ("reap_grace", "soon", "expected a number of seconds (0: at once; -1 or never: never)"),
        ("statement_timeout", "5 minutes", "expected a duration such as 500ms, 30s, 5min or 1h (0: no timeout)"),
        (
            "keep_alive",
            "10",
            KEEP_ALIVE + "; a unit is needed: 10s or 10min?",
        ),
        (
            "keep_alive",
            "5 weeks",
            KEEP_ALIVE + "; unknown unit 'weeks' (ms, s, min, h or d)",
        ),
        (
            "keep_alive",
            "-30s",
            KEEP_ALIVE,
        ),
        (
            "keep_alive",
            "10ms",
            KEEP_ALIVE + "; at least 1s",
        ),
        ("report", "json:", "expected term (the default), json, json:PATH or off"),
        ("session_class", "sqlmodel.Session", "expected module:Class, such as sqlmodel:Session"),
        ("templates_keep", "three", "expected a whole number of at least 1"),
        ("isolation", "tables", "expected one of transaction, database, schema"),
        ("role", "owner", "expected one of own, createdb, admin"),
        ("guard", "fail", "expected one of error, warn, off"),
        ("sql_log", "stderr", "expected one of auto, jsonlog, csvlog, off"),
        ("async_driver", "aiopg", "expected one of asyncpg, psycopg"),
        ("show_sql", "2", "expected true or false"),
        ("server_settings", "=64MB", "'=64MB' is not of the form name=value (for example work_mem=64MB)"),
    ],
)
def test_a_bad_value_of_each_kind_says_what_the_option_takes(name: str, value: str, expected: str) -> None:
    option = BY_NAME[name]
    with pytest.raises(ConfigError) as error:
        Settings.from_sources(env={option.env: value})
    message = str(error.value)
    assert f"{option.env}: bad value {value.strip()!r}: {expected}." in message
    assert f"What to do: fix {option.env}; {option.cli} takes: {option.help}." in message


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("10min", 600.0), ("1.5h", 5400.0), ("1d", 86400.0), ("2 sec", 2.0), ("0", 0.0), ("OFF", 0.0)],
)
def test_keep_alive_takes_a_duration_with_a_unit_or_off(text: str, seconds: float) -> None:
    assert Settings.from_sources(env={"PGSANDBOX_KEEP_ALIVE": text}).keep_alive == seconds
    assert Settings().keep_alive == 0.0  # the default: the server stops with the run
