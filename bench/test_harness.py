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


def test_timeline_plugin_notes_hooks_and_wrapped_calls(tmp_path: Path) -> None:
    (tmp_path / f"{harness.TIMELINE_PLUGIN_NAME}.py").write_text(harness.TIMELINE_PLUGIN)
    (tmp_path / "test_one.py").write_text("def test_one():\n    from pgsandbox.server import keepalive\n")
    events = tmp_path / "events.json"
    env = {**harness.clean_env(), harness.TIMELINE_ENV: str(events), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", harness.TIMELINE_PLUGIN_NAME]
    out = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    names = [name for name, _ in json.loads(events.read_text())]
    for name in ("pytest_configure", "pytest_runtest_setup >", "pytest_unconfigure <", "atexit"):
        assert name in names
    assert names.index("import pgsandbox.server >") < names.index("import pgsandbox.server <")


def test_timeline_medians(capsys: pytest.CaptureFixture[str]) -> None:
    runs = [
        harness.timeline_of([("start", 10.1), ("end", 10.5), ("start", 10.9)], 10.0, 1.0),
        harness.timeline_of([("start", 20.3), ("end", 20.7)], 20.0, 1.2),
    ]
    assert runs[0] == pytest.approx({"start": 100.0, "end": 500.0, "process exit": 1000.0})
    medians = harness.print_timeline("a case", {"db": runs, "plain": [{"start": 150.0, "process exit": 900.0}]})
    assert medians["end"] == pytest.approx({"db": 600.0})
    assert medians["process exit"] == pytest.approx({"db": 1100.0, "plain": 900.0})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[3:6]] == ["start", "end", "process"]  # in the order of the first
    assert lines[5].split()[-1] == "200"  # db minus plain
