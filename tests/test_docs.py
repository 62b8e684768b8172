"""The docs site (issue 19): the generated reference covers the code, the pages agree with it. Fast tier: the
site itself is built by `mkdocs build --strict` in CI (.ci/run)."""

from __future__ import annotations

import configparser
import importlib
import pickle
import pkgutil
import re
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

import pgsandbox
from pgsandbox.errors import DOCS_URL, ConfigError, PgSandboxError, with_link
from pgsandbox.settings import BY_NAME, OPTIONS, Settings

if sys.version_info >= (3, 11):
    import tomllib
else:
    tomllib = pytest.importorskip("tomli")

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


def test_the_options_details_table_names_only_real_options() -> None:
    """The hand-written table of examples goes stale when an option is renamed or removed; a new option is in the
    generated reference at once, and gets a row here when it needs an example."""
    page = (DOCS / "reference/options.md").read_text()
    details = page[page.index("## Details and examples") :]
    named = set(re.findall(r"^\| `--pg-[^`]*`[^|]*\| [^|]*\| `(pg_\w+)[` ]", details, flags=re.MULTILINE))
    assert len(named) >= 37
    assert named <= {option.ini for option in OPTIONS}


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
    assert docs_gen().render("<!-- pgsandbox:runnable -->\n# A guide", "guides/x.md") == "\n# A guide"
    # only the pages marked runnable make the project: a titled block elsewhere is an illustration
    assert set(docs_gen().runnable_files()) == {
        "pyproject.toml",
        "migrations/001_users.sql",
        "migrations/002_orders.sql",
        "myapp/users.py",
        "tests/test_users.py",
        "migrations/003_items.sql",  # security-roles.md: its tests, shown one at a time, are one file
        "tests/test_tenants.py",
        "migrations/004_posts.sql",  # data.md
        "tests/test_factories.py",
        "tests/test_factoryboy.py",
        "tests/test_scoped_data.py",  # isolation.md
        "myapp/models.py",  # client-libraries.md
        "tests/test_model_factories.py",
        "migrations/005_products.sql",  # migrations.md
        "myapp/catalog.py",
        "conftest.py",
        "tests/test_seed.py",
    }
    tenants = docs_gen().runnable_files()["tests/test_tenants.py"]
    assert tenants.startswith("import pytest\n") and tenants.count("\ndef test_") == 3


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


def config_blocks(pages: list[Path]) -> list[tuple[str, dict[str, object]]]:
    """The pytest settings of every toml and ini block of these pages: (where, {key: value})."""
    found: list[tuple[str, dict[str, object]]] = []
    for page in pages:
        for block in docs_gen().code_blocks(page):
            where = f"{block.page}:{block.line}"
            if block.language == "toml":
                table = tomllib.loads(block.text).get("tool", {}).get("pytest", {}).get("ini_options")
                if table is not None:
                    found.append((where, table))
            elif block.language == "ini":
                parser = configparser.ConfigParser()
                parser.read_string(block.text)
                for section in ("pytest", "tool:pytest"):
                    if parser.has_section(section):
                        found.append((where, dict(parser[section])))
    return found


def ini_value(option_kind: str, value: object) -> object:
    if option_kind == "list" and isinstance(value, str):
        return [line for line in value.splitlines() if line.strip()]  # an ini file's list: one per line
    if isinstance(value, bool):
        return str(value).lower()
    return value


def config_problems(pages: list[Path]) -> list[str]:
    """What pgsandbox would refuse in these pages' config blocks: an unknown pg_ option, a bad value."""
    problems = []
    for where, table in config_blocks(pages):
        for key, value in table.items():
            if not key.startswith("pg_"):
                continue
            option = BY_NAME.get(key.removeprefix("pg_"))
            if option is None:
                problems.append(f"{where}: {key} is not an option of pgsandbox")
                continue
            try:
                Settings.from_sources(ini={option.name: ini_value(option.kind, value)}, env={})  # type: ignore[dict-item]
            except ConfigError as error:
                problems.append(f"{where}: {key} = {value!r} is refused: {error}")
    return problems


def test_the_docs_config_blocks_name_real_options_with_valid_values() -> None:
    pages = docs_gen().documented_pages()
    assert len(config_blocks(pages)) >= 4
    assert config_problems(pages) == []


def test_a_config_block_with_an_unknown_option_or_a_bad_value_is_caught(tmp_path: Path) -> None:
    page = tmp_path / "typo.md"
    page.write_text(
        '```toml\n[tool.pytest.ini_options]\npg_isolaton = "database"\n```\n\n'
        "```ini\n[pytest]\npg_isolation = rollback\npg_migrations =\n    sql:migrations\n```\n"
    )
    problems = config_problems([page])
    assert len(problems) == 2
    assert problems[0] == "typo.md:1: pg_isolaton is not an option of pgsandbox"
    assert problems[1].startswith("typo.md:6: pg_isolation = 'rollback' is refused")


def test_every_guide_code_block_compiles_and_names_only_what_pgsandbox_has() -> None:
    """The blocks no test runs (fragments, a FastAPI app, Django) still compile and name real fixtures, options,
    variables and marker keys, so a rename in the code shows up here and not in a reader's copy."""
    gen = docs_gen()
    pages = gen.guide_pages()
    python_blocks = [block for page in pages for block in gen.code_blocks(page) if block.language == "python"]
    assert len(python_blocks) >= 15
    assert gen.guide_problems(pages) == []


def test_a_guide_block_with_a_wrong_name_or_bad_python_is_caught(tmp_path: Path) -> None:
    page = tmp_path / "typo.md"
    page.write_text(
        '```python\n@pytest.mark.pg(isolaton="database")\ndef test_a(pg_connn, pg_tenant): ...\n\n\n'
        "@pytest.fixture\ndef pg_tenant(pg): ...\n\n\n"
        '@pytest.mark.pg(isolation="rollback")\nasync def test_b(pg):\n'
        '    await pg.ainsert("x", using=pg_psycopg)\n```\n'
        "\n```sh\npytest --pg-isolaton=database  # or PGSANDBOX_ISOLATON\n```\n"
        "\n```python\nrow = await pg.ainsert('x')  # a fragment may await\n```\n"
        "\n```python\ndef broken(:\n```\n"
        "\n```python\nfrom pgsandbox import Sandbox\nfrom pgsandbox.data import Factori\n\nSandbox.begin()\n\n"
        "def test_c(pg, pg_login):\n    pg.inserrt('users')\n    assert pg_login.database_uri\n\n\n"
        "def pytest_pgsandbox_seed(session, engine): ...\n\n\ndef pytest_pgsandbox_sed(conn): ...\n```\n"
    )
    problems = docs_gen().guide_problems([page])
    assert [problem.split(" is refused")[0] for problem in problems] == [
        "typo.md:1: pg_connn is not a fixture or an option of pgsandbox",
        "typo.md:1: pg_psycopg is not a fixture or an option of pgsandbox",
        "typo.md:2: @pytest.mark.pg has no key isolaton",
        "typo.md:10: @pytest.mark.pg(isolation=...)",
        "typo.md:15: --pg-isolaton is not an option",
        "typo.md:15: PGSANDBOX_ISOLATON is not a pgsandbox variable",
        "typo.md:24: does not compile: invalid syntax",
        "typo.md:29: pgsandbox.data has no Factori",
        "typo.md:31: Sandbox (Sandbox) has no begin",
        "typo.md:34: pg (Database) has no inserrt",
        "typo.md:35: pg_login (SessionLogin) has no database_uri",
        "typo.md:38: pytest_pgsandbox_seed gets no engine (it passes conn, session, url, dsn)",
        "typo.md:41: pytest_pgsandbox_sed is not a hook of pgsandbox",
    ]
    assert "is not one of transaction, database, schema" in problems[3]  # the option's own message
    with pytest.raises(ValueError, match="pg_connn is not a fixture"):  # the site's build fails on it
        docs_gen().render(page.read_text(), "guides/typo.md")


@pytest.mark.slow
def test_the_guides_runnable_blocks_pass_as_one_project(pytester: pytest.Pytester) -> None:
    """Every block with a file name (``title="tests/test_users.py"``) is written where it says, and the tests among
    them run in one in-process pytest run on a local server: each passes. The pages marked runnable (the first
    project, and the data, isolation, migrations, client libraries and roles guides on top of it, each with its
    migration on the page) are one project: one server, one template build, for every guide (pg_queries needs the
    local server's statement log, so not the shared server)."""
    files = docs_gen().runnable_files()
    assert "pyproject.toml" in files and any(name.startswith("tests/test_") for name in files)
    for name, text in files.items():
        path = pytester.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    tests = sum(len(re.findall(r"^\s*def test_", text, flags=re.MULTILINE)) for text in files.values())
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=tests)


def every_error_class() -> set[type[PgSandboxError]]:
    for module in pkgutil.walk_packages(pgsandbox.__path__, "pgsandbox."):
        if not module.name.endswith("idle_watch"):  # a script run by path
            importlib.import_module(module.name)
    found: set[type[PgSandboxError]] = set()
    pending = [PgSandboxError]
    while pending:
        kind = pending.pop()
        found.add(kind)
        pending += kind.__subclasses__()
    return {kind for kind in found if kind.__module__.startswith("pgsandbox.")}


def test_every_error_links_to_its_troubleshooting_entry() -> None:
    page = (DOCS / "troubleshooting.md").read_text()
    for kind in every_error_class():
        anchor = kind.docs_url().rpartition("#")[2]
        assert f"\n## {kind.__name__}\n" in page and anchor == kind.__name__.lower(), kind
        assert f"<!-- pgsandbox:errors {kind.__name__} -->" in page
    error = ConfigError("pg_port: bad value 'x'.", "give a port number.")
    # the link is a note: str(error) stays what it was, and tracebacks, pytest and with_link() add the note
    assert str(error) == "pg_port: bad value 'x'.\n  What to do: give a port number."
    assert with_link(error).splitlines() == [
        "pg_port: bad value 'x'.",
        "  What to do: give a port number.",
        f"  See: {DOCS_URL}troubleshooting/#configerror",
    ]
    assert "".join(traceback.format_exception_only(error)).endswith(f"  See: {DOCS_URL}troubleshooting/#configerror\n")
    one_line = PgSandboxError("the server went away earlier (see the first error).")
    assert with_link(one_line).count("\n") == 0
    assert pickle.loads(pickle.dumps(error)).__notes__ == error.__notes__  # xdist sends errors between processes


def test_the_docs_url_is_the_one_the_project_and_the_site_name() -> None:
    with (ROOT / "pyproject.toml").open("rb") as file:
        urls = tomllib.load(file)["project"]["urls"]
    assert urls["Documentation"] == DOCS_URL
    assert f"site_url: {DOCS_URL}\n" in (ROOT / "mkdocs.yml").read_text()
    assert urls["Changelog"].startswith(urls["Repository"])


def test_the_troubleshooting_page_lists_every_message_of_each_kind() -> None:
    gen = docs_gen()
    rendered = gen.render((DOCS / "troubleshooting.md").read_text(), "troubleshooting.md")
    assert "<!-- pgsandbox:" not in rendered
    raised = gen.raised()
    assert len(raised) > 100  # every raise of a pgsandbox error, and the warnings
    assert "No PostgreSQL binaries found." in rendered
    assert "{settings.source_of('listen')}: {host} does not resolve" in rendered
    assert "{LISTEN_FIX}" not in rendered and "set pg_listen to an address of this machine" in rendered  # a constant
    with pytest.raises(ValueError, match=r"no entry for .*ConfigError"):
        gen.render("# Troubleshooting\n", "troubleshooting.md")


def test_the_changelog_keeps_a_changelog_and_the_classifiers_name_the_python_tested() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[([^]]+)\](.*)$", changelog, flags=re.MULTILINE)
    assert releases[0] == ("Unreleased", "")
    for version, date in releases[1:]:
        assert re.fullmatch(r"\d+\.\d+\.\d+", version) and re.fullmatch(r" - \d{4}-\d{2}-\d{2}", date), version
    for version, _ in releases:
        assert re.search(rf"^\[{re.escape(version)}\]: https://", changelog, flags=re.MULTILINE), version
    for heading in re.findall(r"^### (.+)$", changelog, flags=re.MULTILINE):
        assert heading in ("Added", "Changed", "Deprecated", "Removed", "Fixed", "Security")
    with (ROOT / "pyproject.toml").open("rb") as file:
        classifiers = tomllib.load(file)["project"]["classifiers"]
    running = f"Programming Language :: Python :: {sys.version_info.major}.{sys.version_info.minor}"
    assert running in classifiers, "the suite runs on a Python the classifiers do not name"


def ci_recipes() -> list[tuple[str, dict[str, Any], str]]:
    """The YAML blocks of the CI recipes: (where, parsed, text)."""
    page = DOCS / "guides/ci-recipes.md"
    return [
        (f"{block.page}:{block.line}", yaml.safe_load(block.text), block.text)
        for block in docs_gen().code_blocks(page)
        if block.language == "yaml"
    ]


def commands_of(recipe: dict[str, Any]) -> list[str]:
    """The shell commands of a GitHub Actions workflow (steps' run) or a GitLab CI file (jobs' script)."""
    commands: list[str] = []
    for job in (recipe.get("jobs") or recipe).values():
        if not isinstance(job, dict):
            continue
        commands += [step["run"] for step in job.get("steps", ()) if "run" in step]
        commands += list(job.get("script", ()))
    return commands


def recipe_problems(where: str, recipe: dict[str, Any], text: str) -> list[str]:
    """What would make a recipe fail: a job without the keys its CI system requires, an option, variable or
    pgsandbox command that does not exist."""
    problems = []
    if "jobs" in recipe:  # GitHub Actions
        if not ({"on", True} & set(recipe)):
            problems.append(f"{where}: a workflow needs `on`")
        for name, job in recipe["jobs"].items():
            if "runs-on" not in job or not job.get("steps"):
                problems.append(f"{where}: job {name} needs runs-on and steps")
            if "services" in job:
                problems.append(f"{where}: job {name} declares a service container")
    else:  # GitLab CI: every job has a script
        for name, job in recipe.items():
            if isinstance(job, dict) and not name.startswith(".") and "script" not in job:
                problems.append(f"{where}: job {name} has no script")
    options = {option.cli for option in OPTIONS}
    for used in re.findall(r"--pg-[a-z-]+", text):
        if used not in options:
            problems.append(f"{where}: {used} is not an option")
    for variable in re.findall(r"\bPGSANDBOX_[A-Z_]+", text):
        if variable not in {option.env for option in OPTIONS}:
            problems.append(f"{where}: {variable} is not a pgsandbox variable")
    gen = docs_gen()
    for command in commands_of(recipe):
        for match in re.finditer(r"\bpgsandbox (\w+)((?: --?[\w-]+(?: \d+)?)*)", command):
            if match[1] not in gen.cli_commands():
                problems.append(f"{where}: pgsandbox {match[1]} is not a command")
                continue
            help_text = gen._help_of(match[1])
            problems += [
                f"{where}: pgsandbox {match[1]} has no {flag}"
                for flag in re.findall(r"--[\w-]+", match[2])
                if flag not in help_text
            ]
    return problems


def test_the_ci_recipes_parse_and_use_only_real_options_and_commands() -> None:
    recipes = ci_recipes()
    assert len(recipes) == 3  # GitHub Actions, GitLab CI, the sharded matrix on a shared server
    for where, recipe, text in recipes:
        assert recipe_problems(where, recipe, text) == []
        assert commands_of(recipe), f"{where} runs nothing"
    assert any("pgsandbox reap" in command for _, recipe, _ in recipes for command in commands_of(recipe))


def test_a_recipe_with_a_wrong_option_or_command_is_caught() -> None:
    text = "jobs:\n  t:\n    runs-on: x\n    services: {pg: {image: postgres}}\n    steps:\n"
    text += "      - run: pytest --pg-isolaton=database\n      - run: pgsandbox reap --forever\n"
    text += "      - run: pgsandbox vacuum\n    env: {PGSANDBOX_CACH: x}\n"
    problems = recipe_problems("x.md:1", yaml.safe_load(text), text)
    assert problems == [
        "x.md:1: a workflow needs `on`",
        "x.md:1: job t declares a service container",
        "x.md:1: --pg-isolaton is not an option",
        "x.md:1: PGSANDBOX_CACH is not a pgsandbox variable",
        "x.md:1: pgsandbox reap has no --forever",
        "x.md:1: pgsandbox vacuum is not a command",
    ]
