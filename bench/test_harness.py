"""Checks of bench/ itself (not part of the suite: ``pytest bench -q``, a few seconds, no server started).

The benchmarks share one harness and nothing else; they find PostgreSQL the way pgsandbox does; the reference
schema's fallback is the shared file's text; every script answers ``--help``.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import harness
import pytest

pytestmark = pytest.mark.slow  # the scripts run as processes (--help)

BENCH = Path(__file__).resolve().parent
SCRIPTS = sorted(path for path in BENCH.glob("*.py") if path.name not in {"harness.py", Path(__file__).name})


def test_scripts_import_only_the_harness_among_the_benchmarks() -> None:
    names = {path.stem for path in SCRIPTS}
    for script in SCRIPTS:
        tree = ast.parse(script.read_text())
        imported = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        imported |= {
            node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not imported & names, f"{script.name} imports {imported & names}: share code through harness.py"


def test_no_script_names_a_path_of_one_machine() -> None:
    for script in [*SCRIPTS, BENCH / "harness.py"]:
        text = script.read_text()
        for path in ("/usr/lib/postgresql/", "/root/", "/work/"):
            assert path not in text, f"{script.name} names {path}"


# each script run as `python SCRIPT --help` would run it, all in one process: a process each cost the suite
# half a second of CPU per script
ANSWER_HELP = """
import contextlib, io, json, runpy, sys
sys.path.insert(0, sys.argv[1])
answers = {}
for script in sys.argv[2:]:
    sys.argv, out, code = [script, "--help"], io.StringIO(), None
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exit:
            code = exit.code
    answers[script] = [code, out.getvalue()]
print(json.dumps(answers))
"""


def test_every_script_answers_help() -> None:
    scripts = [str(script) for script in SCRIPTS]
    command = [sys.executable, "-c", ANSWER_HELP, str(BENCH), *scripts]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)
    assert sorted(answers) == sorted(scripts)
    for script, (code, text) in answers.items():
        assert code in (0, None) and text.startswith("usage:"), f"{script}: exit {code}, {text[:200]!r}"


def test_generated_schema_is_the_shared_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    shared, origin = harness.schema_sql()
    monkeypatch.setattr(harness, "SCHEMA_FILE", tmp_path / "schema50.sql")
    generated, generated_origin = harness.schema_sql()
    assert generated_origin.startswith("generated")
    assert generated.count("CREATE TABLE") == harness.TABLES
    if origin != generated_origin:  # the shared file is there: the fallback must be the same SQL
        assert generated == shared


def test_binaries_come_from_pgsandbox_discovery(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from pgsandbox.binaries import find_installations

    found = find_installations().found
    if not found:
        pytest.skip("no PostgreSQL installation on this machine")
    newest = max(found, key=lambda installation: installation.version)
    chosen = harness.chosen_bindir(argparse.Namespace(bin=None, pg_version=None))
    assert chosen is not None and chosen.resolve() == newest.bindir.resolve()
    oldest = min(found, key=lambda installation: installation.version)
    pinned = harness.chosen_bindir(argparse.Namespace(bin=None, pg_version=str(oldest.major)))
    assert pinned is not None and pinned.resolve() in {i.bindir.resolve() for i in found if i.major == oldest.major}
    assert harness.chosen_bindir(argparse.Namespace(bin=tmp_path, pg_version=None)) is None
    said = capsys.readouterr().err
    assert f"--bin points at {tmp_path}" in said and "What to do" in said


def test_raw_primitives_fill_in_placeholders() -> None:
    initdb, start, stop = harness.raw_server_commands("/pg/bin", "{data}", "{sock}", "{log}", fsync=False)
    filled = [part.format(data="/d", sock="/s", log="/l") for part in start]
    assert filled == ["/pg/bin/pg_ctl", "start", "-w", "-D", "/d", "-l", "/l", "-o", "-F -c listen_addresses='' -k /s"]
    assert initdb[0] == "/pg/bin/initdb" and stop[:2] == ["/pg/bin/pg_ctl", "stop"]
