"""The fast tier (`pytest -m "not slow"`) holds only tests that start no server and no process: the suite's
conftest fails a test that does either without the `slow` marker."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_a_test_that_starts_a_process_or_a_server_must_be_marked_slow(pytester: pytest.Pytester) -> None:
    shutil.copy(Path(__file__).parent / "conftest.py", pytester.path / "conftest.py")
    pytester.makeini(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\nmarkers =\n    slow: starts a server or a process\n"
    )
    pytester.makepyfile(
        """
        import subprocess, sys
        import pytest

        def test_unmarked_process():
            subprocess.run([sys.executable, "-c", "pass"], check=True)

        def test_unmarked_pytester(pytester):
            pass

        def test_unmarked_pure():
            assert sum([1, 2]) == 3

        @pytest.mark.slow
        def test_marked_process():
            subprocess.run([sys.executable, "-c", "pass"], check=True)
        """
    )
    result = pytester.runpytest("-p", "no:randomly", "-p", "no:pgsandbox")
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines_random(
        [
            "*test_unmarked_process started a process (subprocess.Popen*) but is not marked slow*",
            "*test_unmarked_pytester uses pytester but is not marked slow: add @pytest.mark.slow",
        ]
    )
