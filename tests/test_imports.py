from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_loading_the_plugin_does_not_import_psycopg() -> None:
    """Every pytest run loads the plugin; only a run that uses the database pays for the driver."""
    code = "import sys, pgsandbox.pytest.plugin; print('psycopg' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_names_resolve_on_first_use() -> None:
    import pgsandbox

    assert pgsandbox.Settings().server == "auto"
    assert pgsandbox.start_server.__module__ == "pgsandbox.server"
    try:
        pgsandbox.no_such_name  # noqa: B018
    except AttributeError as error:
        assert "has no attribute 'no_such_name'" in str(error)
    else:
        raise AssertionError("unknown names must raise AttributeError")
