"""The docs site (issue 19): the generated reference covers the code, the pages agree with it. Fast tier: the
site itself is built by `mkdocs build --strict` in CI (.ci/run)."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pgsandbox.settings import OPTIONS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def docs_gen() -> ModuleType:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("tools.docs_gen")


def test_the_options_reference_has_an_entry_per_option() -> None:
    generated = docs_gen().options_markdown()
    for option in OPTIONS:
        assert f"### `{option.ini}` {{#{option.ini}}}" in generated
        assert option.cli in generated and option.env in generated
    assert "`transaction`" in generated  # a default shown: pg_isolation's


def test_the_options_details_table_names_every_option_and_no_other() -> None:
    page = (DOCS / "reference/options.md").read_text()
    details = page[page.index("## Details and examples") :]
    named = set(re.findall(r"^\| `--pg-[^`]*`[^|]*\| [^|]*\| `(pg_\w+)[` ]", details, flags=re.MULTILINE))
    assert named == {option.ini for option in OPTIONS}


def test_the_fixtures_reference_covers_every_fixture_with_its_docstring() -> None:
    found = docs_gen().fixtures()
    names = {fixture.name for fixture in found}
    assert {"pg", "pg_conn", "pg_engine", "pg_session", "pg_queries", "pg_asyncpg", "pg_login", "pg_admin"} <= names
    for fixture in found:
        assert fixture.doc, f"{fixture.name} has no docstring: the fixtures reference and --fixtures show nothing"
    generated = docs_gen().fixtures_markdown()
    assert "``" not in generated  # reST markup turned into Markdown
    assert "Yields `Database`." in generated


def test_the_cli_reference_shows_every_command_s_help() -> None:
    gen = docs_gen()
    assert {"doctor", "clean", "fetch", "reap"} <= set(gen.cli_commands())
    generated = gen.cli_markdown()
    assert "$ pgsandbox reap --help" in generated and "--include-kept" in generated


def test_a_page_with_an_unknown_marker_fails_the_build() -> None:
    with pytest.raises(ValueError, match="unknown marker"):
        docs_gen().render("<!-- pgsandbox:nonsense -->", "guides/x.md")


def test_the_readme_is_a_short_guide_whose_links_and_contents_hold() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 15_500, "the README is a five-minute guide: move details to docs/"
    headings = re.findall(r"^## (.+)$", readme, flags=re.MULTILINE)
    contents = re.findall(r"^- \[([^]]+)\]\(#([\w-]+)\)$", readme, flags=re.MULTILINE)
    assert [title for title, _ in contents] == [h for h in headings if h != "Contents"]
    for title, anchor in contents:
        assert anchor == re.sub(r"[^\w -]", "", title.lower()).replace(" ", "-")
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", readme):
        assert (ROOT / target).exists(), f"the README links to {target}, which does not exist"
    # the Quick start's two commands, which .ci/run runs
    assert ".venv/bin/pip install -e '.[dev]' && .venv/bin/pytest examples\n.venv/bin/pytest -n auto\n" in readme
