"""pytest glue: options, ini keys, the ``pg`` marker, progress lines. Fixtures live in fixtures.py."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import pytest

from pgsandbox.errors import ConfigError
from pgsandbox.settings import OPTIONS, Settings

pytest_plugins = ["pgsandbox.fixtures"]

SETTINGS_KEY = pytest.StashKey[Settings]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pgsandbox", "pgsandbox: a PostgreSQL database for every test")
    for option in OPTIONS:
        env = f" [env {option.env}, ini {option.ini}]"
        if option.kind == "list":
            group.addoption(
                option.cli,
                action="append",
                dest=f"pg_{option.name}",
                default=None,
                metavar="VALUE",
                help=option.help + " (repeatable)" + env,
            )
            parser.addini(option.ini, option.help, type="linelist", default=[])
        else:
            group.addoption(option.cli, dest=f"pg_{option.name}", default=None, help=option.help + env)
            parser.addini(option.ini, option.help, default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "pg(**options): per-test pgsandbox options (they take precedence over the command line)"
    )
    try:
        config.stash[SETTINGS_KEY] = Settings.from_sources(
            cli={o.name: config.getoption(f"pg_{o.name}") for o in OPTIONS},
            env=os.environ,
            ini={o.name: config.getini(o.ini) for o in OPTIONS},
        )
    except ConfigError as error:
        raise pytest.UsageError(f"pgsandbox: {error}") from None


def settings(config: pytest.Config) -> Settings:
    return config.stash[SETTINGS_KEY]


def progress_writer(config: pytest.Config) -> Callable[[str], None] | None:
    """One line per long step (initdb, binary copy), quiet under -q."""
    if config.get_verbosity() < 0:
        return None
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return None

    capture = config.pluginmanager.get_plugin("capturemanager")

    def write(message: str) -> None:
        # the server starts inside a fixture, where output is captured: write past the capture
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.ensure_newline()
            reporter.write_line(f"pgsandbox: {message}")

    return write
