"""The layers of docs/architecture.md and no import cycles: the import-linter contracts of pyproject.toml, which
count function-level and TYPE_CHECKING imports too. CI also runs them as `lint-imports`."""

from __future__ import annotations

import contextlib
import io
import sys
import textwrap
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).parents[1]


def lint(config: Path, *path: Path) -> tuple[int, str]:
    """Run the contracts of ``config`` with ``path`` first on sys.path; (exit status, what it printed)."""
    out = io.StringIO()
    sys.path[:0] = [str(p) for p in path]
    try:
        with contextlib.redirect_stdout(out):
            status = lint_imports(config_filename=str(config), no_cache=True, no_logo=True)
    finally:
        del sys.path[: len(path)]
    return status, out.getvalue()


def test_pgsandbox_keeps_its_layers_and_has_no_import_cycle() -> None:
    status, printed = lint(ROOT / "pyproject.toml", ROOT / "src")
    assert status == 0, printed
    assert "2 kept, 0 broken" in printed


@pytest.mark.parametrize(
    ("module", "source", "broken"),
    [
        # a lower layer importing a higher one inside a function
        (
            "server/base.py",
            "def f():\n    from toy.pytest import plugin\n",
            "toy.server is not allowed to import toy.pytest",
        ),
        # a cycle through a TYPE_CHECKING import
        (
            "server/local.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from toy.server import base\n",
            "toy.server",
        ),
    ],
)
def test_the_contracts_catch_a_layer_break_and_a_cycle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, source: str, broken: str
) -> None:
    """The same contracts on a toy package: a function-level import upwards, or a cycle hidden under
    TYPE_CHECKING, breaks them."""
    package = tmp_path / "toy"
    for name in ("pytest", "server"):
        (package / name).mkdir(parents=True)
        (package / name / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "pytest/plugin.py").write_text("from toy.server import base\n")
    (package / "server/base.py").write_text("from toy.server import local\n")
    (package / "server/local.py").write_text("")
    (package / module).write_text((package / module).read_text() + source)
    config = tmp_path / "contracts.toml"
    config.write_text(
        textwrap.dedent(
            """
            [tool.importlinter]
            root_package = "toy"

            [[tool.importlinter.contracts]]
            name = "layers"
            type = "layers"
            layers = ["toy.pytest", "toy.server"]

            [[tool.importlinter.contracts]]
            name = "acyclic"
            type = "acyclic_siblings"
            ancestors = ["toy"]
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    status, printed = lint(config, tmp_path)
    assert status != 0
    assert broken in printed
    assert "BROKEN" in printed
