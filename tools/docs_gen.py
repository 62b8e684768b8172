"""The docs site's generated parts, made from the code at every build so that they cannot go stale.

`mkdocs.yml` loads this module as a hook: a page holds a marker (``<!-- pgsandbox:options -->``,
``<!-- pgsandbox:fixtures -->``, ``<!-- pgsandbox:cli -->``, ``<!-- pgsandbox:errors ClassName -->``) and the
build puts the generated Markdown in its place; ``<!-- pgsandbox:runnable -->`` marks a page whose titled code
blocks are files of a project the test suite runs. A guide whose code blocks name a fixture, option or marker
key pgsandbox does not have, or whose Python does not compile, fails the build. Guides that appear under
``docs/guides/`` are added to the navigation. The functions are plain, so that tests call them too.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import importlib
import inspect
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "src" / "pgsandbox"
MARKER = re.compile(r"<!-- pgsandbox:(\w+)(?: (\w+))? -->")
FIXTURE_MODULES = ("pgsandbox.pytest.fixtures", "pgsandbox.pytest.django", "pgsandbox.pytest.plugin")


def markdown_of_rest(text: str) -> str:
    """Docstrings are reST (``code``, a trailing ``::``); the site is Markdown."""
    text = text.replace("``", "`")
    return re.sub(r"::(\s*)$", r":\1", text, flags=re.MULTILINE)


# -- options ---------------------------------------------------------------------------------------------------


def _default_of(name: str) -> str:
    from pgsandbox.settings import Settings

    value = {field.name: field.default for field in dataclasses.fields(Settings)}.get(name)
    if value in (None, (), "", dataclasses.MISSING):
        return ""
    if name == "cache_max_size" and isinstance(value, int):
        return f"{value // 10**9}GB"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def options_markdown() -> str:
    """One entry per option of settings.OPTIONS: its three spellings, its default, its help."""
    from pgsandbox.settings import OPTIONS

    lines = [
        "| ini (`pyproject.toml`, `pytest.ini`) | command line | environment | default |",
        "|---|---|---|---|",
    ]
    for option in OPTIONS:
        default = _default_of(option.name)
        shown = f"`{default}`" if default else ""
        lines.append(f"| [`{option.ini}`](#{option.ini}) | `{option.cli}` | `{option.env}` | {shown} |")
    lines.append("")
    for option in OPTIONS:
        lines.append(f"### `{option.ini}` {{#{option.ini}}}")
        lines.append("")
        lines.append(option.help[0].upper() + option.help[1:] + ".")
        lines.append("")
        if option.kind == "list":
            separator = {";": "`;`", ",": "commas", " ": "spaces"}[option.env_separator]
            lines.append(
                f"A list: a TOML list or one value per line in an ini file, `{option.cli}` repeated, "
                f"`{option.env}` separated by {separator}."
            )
        elif option.kind == "flag":
            lines.append(f"A flag: `{option.cli}` alone, or `true`/`false` in the ini file and `{option.env}`.")
        else:
            lines.append(f"`{option.cli}=VALUE`, `{option.env}=VALUE`.")
        lines.append("")
    return "\n".join(lines)


# -- fixtures --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixture:
    name: str
    scope: str
    returns: str
    doc: str


def fixtures() -> list[Fixture]:
    """pgsandbox's fixtures, in the order their modules define them."""
    found: list[Fixture] = []
    for module_name in FIXTURE_MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            marker = getattr(value, "_fixture_function_marker", None) or getattr(value, "_pytestfixturefunction", None)
            if marker is None or not name.startswith("pg"):
                continue
            function = getattr(value, "_get_wrapped_function", lambda value=value: value)()
            returns = inspect.signature(function).return_annotation
            found.append(
                Fixture(
                    name=marker.name or name,
                    scope=marker.scope if isinstance(marker.scope, str) else "function",
                    returns=returns if isinstance(returns, str) else getattr(returns, "__name__", str(returns)),
                    doc=inspect.getdoc(function) or "",
                )
            )
    return found


def _gives(annotation: str) -> str:
    yielded = re.fullmatch(r"(?:Async)?Iterator\[(.*)\]", annotation)
    return f"Yields `{yielded[1]}`." if yielded else f"Returns `{annotation}`."


def fixtures_markdown() -> str:
    lines: list[str] = []
    for fixture in fixtures():
        lines += [
            f"### `{fixture.name}`",
            "",
            f"Scope: {fixture.scope}. {_gives(fixture.returns)}",
            "",
            markdown_of_rest(fixture.doc),
            "",
        ]
    return "\n".join(lines)


# -- the command line ------------------------------------------------------------------------------------------


def _help_of(*argv: str) -> str:
    from pgsandbox import cli

    out = io.StringIO()
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: the page must not depend on it
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            cli.main([*argv, "--help"])
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous
    return out.getvalue().rstrip()


def cli_commands() -> list[str]:
    usage = _help_of()
    match = re.search(r"\{([\w,-]+)\}", usage)
    return match[1].split(",") if match else []


def cli_markdown() -> str:
    lines = ["```", "$ pgsandbox --help", _help_of(), "```", ""]
    for command in cli_commands():
        lines += [f"### `pgsandbox {command}`", "", "```", f"$ pgsandbox {command} --help", _help_of(command)]
        lines += ["```", ""]
    return "\n".join(lines)


# -- errors ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raised:
    """One place pgsandbox raises or warns: the message's text as written, placeholders kept."""

    kind: str
    what: str
    fix: str
    where: str


@functools.cache
def error_classes() -> dict[str, str]:
    """Every PgSandboxError subclass pgsandbox defines, with its docstring's first line."""
    classes: dict[str, str] = {}
    bases = {"PgSandboxError"}
    for _path, tree in _modules():
        for node in tree.body:  # pgsandbox's error classes are defined at the top of their modules
            if isinstance(node, ast.ClassDef) and node.name != "PgSandboxError":
                names = {base.id for base in node.bases if isinstance(base, ast.Name)}
                if names & bases:
                    bases.add(node.name)
                    classes[node.name] = (ast.get_docstring(node) or "").split("\n\n")[0].replace("\n", " ")
    return classes


@functools.cache
def _modules() -> tuple[tuple[Path, ast.Module], ...]:
    return tuple((path, ast.parse(path.read_text(), str(path))) for path in sorted(SOURCE.rglob("*.py")))


def _text_of(node: ast.expr | None, constants: dict[str, ast.expr] | None = None) -> str:
    """A message argument as written: literals joined, f-string fields shown as {field}; a name bound to a
    string at the top of its module (``LISTEN_FIX = "..."``) is shown as that string."""
    constants = constants or {}
    if node is None:
        return ""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and node.id in constants:
        return _text_of(constants[node.id])
    if isinstance(node, ast.JoinedStr):
        return "".join(
            str(part.value) if isinstance(part, ast.Constant) else _field(part, constants) for part in node.values
        )
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _text_of(node.left, constants) + _text_of(node.right, constants)
    return "{" + ast.unparse(node) + "}"


def _string_constants(tree: ast.Module) -> dict[str, ast.expr]:
    """The module's top-level ``NAME = <a string>`` assignments."""
    found: dict[str, ast.expr] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            is_string = isinstance(value, ast.Constant) and isinstance(value.value, str)
            if is_string or isinstance(value, (ast.JoinedStr, ast.BinOp)):
                found[node.targets[0].id] = value
    return found


def _field(part: ast.expr, constants: dict[str, ast.expr]) -> str:
    value = part.value if isinstance(part, ast.FormattedValue) else part
    if isinstance(value, ast.Name) and value.id in constants:
        return _text_of(constants[value.id])
    return "{" + ast.unparse(value) + "}"


@functools.cache
def raised() -> tuple[Raised, ...]:
    """Every ``raise SomeError(what, fix)`` of a pgsandbox error class and every ``warnings.warn(...,
    PgSandboxWarning)``, in source order."""
    kinds = set(error_classes()) | {"PgSandboxError"}
    found: list[Raised] = []
    for path, tree in _modules():
        where = path.relative_to(SOURCE.parent).as_posix()
        constants = _string_constants(tree)
        for node in ast.walk(tree):
            call = node.exc if isinstance(node, ast.Raise) else node
            if not isinstance(call, ast.Call):
                continue
            name = call.func.id if isinstance(call.func, ast.Name) else ""
            if isinstance(node, ast.Raise) and name in kinds:
                args = [*call.args, *(keyword.value for keyword in call.keywords)]
                what = _text_of(args[0], constants) if args else ""
                fix = _text_of(args[1], constants) if len(args) > 1 else ""
                found.append(Raised(name, what, fix, f"{where}:{node.lineno}"))
            elif isinstance(call.func, ast.Attribute) and call.func.attr == "warn" and call.args:
                category = call.args[1] if len(call.args) > 1 else None
                if category is not None and "PgSandboxWarning" in ast.unparse(category):
                    found.append(
                        Raised("PgSandboxWarning", _text_of(call.args[0], constants), "", f"{where}:{call.lineno}")
                    )
    return tuple(found)


def _message_lines(kind: str, found: tuple[Raised, ...]) -> str:
    lines = []
    for item in sorted((item for item in found if item.kind == kind), key=lambda item: item.where):
        what = " ".join(item.what.split()) or "(a message made at run time)"
        entry = f"- {_code(what)}"
        if item.fix.strip():
            entry += f"<br>What to do: {_code(' '.join(item.fix.split()))}"
        lines.append(entry + f" <small>({item.where})</small>")
    return "\n".join(lines) if lines else "- (no message of this kind is raised directly: see the classes below)"


def _code(text: str) -> str:
    """Inline code that a backtick in the message cannot end early."""
    fence = "``" if "`" in text else "`"
    return f"{fence} {text} {fence}" if fence == "``" else f"`{text}`"


def errors_markdown(kind: str) -> str:
    return "Messages of this kind, as written in the source (`{...}`: filled in at run time):\n\n" + _message_lines(
        kind, raised()
    )


# -- code blocks -----------------------------------------------------------------------------------------------

FENCE = re.compile(r'^```(\w*)((?: +\w+="[^"]*")*) *\n(.*?)^```\s*$', re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Block:
    """A fenced code block of a page. One with a ``title="path"`` is a file of the guides' runnable project."""

    page: str
    language: str
    title: str
    text: str
    line: int


def code_blocks(page: Path) -> list[Block]:
    return code_blocks_of(page.read_text(), page.name)


def code_blocks_of(text: str, page_name: str) -> list[Block]:
    blocks = []
    for match in FENCE.finditer(text):
        attributes = dict(re.findall(r'(\w+)="([^"]*)"', match[2]))
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(page_name, match[1], attributes.get("title", ""), match[3], line))
    return blocks


def documented_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


RUNNABLE = "<!-- pgsandbox:runnable -->"


def runnable_files() -> dict[str, str]:
    """The files of the guides' runnable project: every titled block of the pages marked runnable, by its path.
    The blocks of one page with the same path are one file, in page order (a test file shown a test at a time);
    two pages may show the same file only with the same text."""
    files: dict[str, str] = {}
    for page in documented_pages():
        if RUNNABLE not in page.read_text():
            continue
        on_page: dict[str, str] = {}
        for block in code_blocks(page):
            if block.title:
                on_page[block.title] = (
                    on_page[block.title] + "\n\n" + block.text if block.title in on_page else block.text
                )
        for title, text in on_page.items():
            if files.get(title, text) != text:
                raise ValueError(f"{page.name}: {title} differs from another page's block of that name")
            files[title] = text
    return files


# names in code blocks that are PostgreSQL's, not pgsandbox's; a `pg_x`/`--pg-x` stands for any option
POSTGRESQL_NAMES = frozenset({"pg_catalog", "pg_config", "pg_policies", "pg_dump", "pg_restore", "pg_ctl"})
PLACEHOLDERS = frozenset({"pg_x", "--pg-x", "PGSANDBOX_X"})


def guide_pages() -> list[Path]:
    """The pages whose code blocks a user copies: the README and the guides."""
    return [ROOT / "README.md", *sorted((ROOT / "docs" / "guides").glob("*.md"))]


def block_problems(block: Block) -> list[str]:
    """What is wrong in a code block that a reader would copy: Python that does not compile (fragments may
    ``await`` at the top level), a fixture, option, variable or ``@pytest.mark.pg`` key pgsandbox does not have,
    a marker value its option refuses."""
    from pgsandbox.settings import OPTIONS

    where = f"{block.page}:{block.line}"
    tree = None
    problems = []
    if block.language == "python":
        try:
            tree = compile(block.text, where, "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        except SyntaxError as error:
            problems.append(f"{block.page}:{block.line + (error.lineno or 0)}: does not compile: {error.msg}")
    defined = _defined_names(tree) if tree is not None else set()  # a fixture of the page's own: pg_tenant
    known = {fixture.name for fixture in fixtures()} | {option.ini for option in OPTIONS} | defined
    problems += [
        f"{where}: {name} is not a fixture or an option of pgsandbox"
        for name in sorted(set(re.findall(r"\bpg_\w+", block.text)) - known - POSTGRESQL_NAMES - PLACEHOLDERS)
    ]
    problems += [
        f"{where}: {flag} is not an option"
        for flag in sorted(set(re.findall(r"--pg-[a-z-]+", block.text)) - {o.cli for o in OPTIONS} - PLACEHOLDERS)
    ]
    problems += [
        f"{where}: {variable} is not a pgsandbox variable"
        for variable in sorted(set(re.findall(r"\bPGSANDBOX_[A-Z_]+", block.text)) - {o.env for o in OPTIONS})
        if variable not in PLACEHOLDERS
    ]
    if tree is not None:
        problems += _marker_problems(block, tree)
        problems += _import_problems(block, tree)
        problems += _attribute_problems(block, tree, defined)
        problems += _hook_problems(block, tree)
    return problems


def _hook_problems(block: Block, tree: ast.AST) -> list[str]:
    """A ``def pytest_pgsandbox_...`` is one of pgsandbox's hooks and takes only arguments the hook passes."""
    from pgsandbox.pytest import hookspecs

    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("pytest_pgsandbox_"):
            where = f"{block.page}:{block.line + node.lineno}"
            spec = getattr(hookspecs, node.name, None)
            if spec is None:
                problems.append(f"{where}: {node.name} is not a hook of pgsandbox")
                continue
            passed = list(inspect.signature(spec).parameters)
            problems += [
                f"{where}: {node.name} gets no {argument.arg} (it passes {', '.join(passed)})"
                for argument in node.args.args
                if argument.arg not in passed
            ]
    return problems


def _import_problems(block: Block, tree: ast.AST) -> list[str]:
    """Each ``from pgsandbox... import name``: the module and the name exist."""
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pgsandbox":
            where = f"{block.page}:{block.line + node.lineno}"
            try:
                module = importlib.import_module(node.module or "")
            except ImportError as error:
                problems.append(f"{where}: {node.module} cannot be imported: {error}")
                continue
            problems += [
                f"{where}: {node.module} has no {alias.name}" for alias in node.names if not hasattr(module, alias.name)
            ]
    return problems


@functools.cache
def fixture_classes() -> dict[str, type]:
    """pgsandbox's fixtures that give one of pgsandbox's own classes (``pg``: Database), by fixture name: the
    return annotation's name, as the fixture's module imports it (``Session`` there is SQLAlchemy's)."""
    imported: dict[str, str] = {}
    for module_name in FIXTURE_MODULES:
        path = SOURCE.parent / (module_name.replace(".", "/") + ".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pgsandbox"):
                imported.update({alias.asname or alias.name: node.module or "" for alias in node.names})
    found: dict[str, type] = {}
    for fixture in fixtures():
        name = re.sub(r"^(?:Async)?Iterator\[(.*)\]$", r"\1", fixture.returns)
        if name in imported:
            found[fixture.name] = getattr(importlib.import_module(imported[name]), name)
    return found


def _has_attribute(kind: Any, name: str) -> bool:
    if hasattr(kind, name):
        return True
    if not isinstance(kind, type):
        return False
    fields = {field.name for field in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else set()
    annotated = {key for klass in kind.__mro__ for key in getattr(klass, "__annotations__", {})}
    return name in fields | annotated or f"self.{name} =" in inspect.getsource(kind)


def _attribute_problems(block: Block, tree: ast.AST, defined: set[str]) -> list[str]:
    """``pg.insert(...)``, ``pg_login.database_url``: what a block reads from a pgsandbox fixture exists."""
    classes: dict[str, Any] = dict(fixture_classes())
    for node in ast.walk(tree):  # and what the block imports from pgsandbox: Sandbox.start, Settings.from_env
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pgsandbox":
            with contextlib.suppress(ImportError):
                module = importlib.import_module(node.module or "")
                classes.update({alias.asname or alias.name: getattr(module, alias.name, None) for alias in node.names})
    problems = []
    for node in sorted(ast.walk(tree), key=lambda node: (getattr(node, "lineno", 0), getattr(node, "col_offset", 0))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            kind = classes.get(node.value.id)
            if kind is None or node.value.id in defined:
                continue
            if not _has_attribute(kind, node.attr):
                where = f"{block.page}:{block.line + node.lineno}"
                problems.append(f"{where}: {node.value.id} ({kind.__name__}) has no {node.attr}")
    return problems


def _defined_names(tree: ast.AST) -> set[str]:
    functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return {node.name for node in ast.walk(tree) if isinstance(node, functions)} | {
        node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)
    }


def _marker_problems(block: Block, tree: ast.AST) -> list[str]:
    """Each ``@pytest.mark.pg(key=value)``: a key the marker takes, a literal value its option accepts."""
    from pgsandbox.pytest.markers import MARKER_ONLY, MARKER_OPTIONS, marker_value

    problems = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and ast.unparse(node.func) == "pytest.mark.pg"):
            continue
        where = f"{block.page}:{block.line + node.lineno}"
        for keyword in node.keywords:
            if keyword.arg not in (*MARKER_OPTIONS, *MARKER_ONLY):
                problems.append(f"{where}: @pytest.mark.pg has no key {keyword.arg}")
                continue
            try:
                value = ast.literal_eval(keyword.value)
            except ValueError:  # not a literal: only a run can check it
                continue
            try:
                marker_value(keyword.arg, value)
            except BaseException as error:  # pytest.fail's exception, with the option's own message
                problems.append(f"{where}: @pytest.mark.pg({keyword.arg}=...) is refused: {error}")
    return problems


def guide_problems(pages: list[Path]) -> list[str]:
    return [problem for page in pages for block in code_blocks(page) for problem in block_problems(block)]


# -- the mkdocs hook -------------------------------------------------------------------------------------------


def render(markdown: str, page_path: str) -> str:
    """Put every marker's generated Markdown in its place; the troubleshooting page must cover every class."""

    def replace(match: re.Match[str]) -> str:
        what, argument = match[1], match[2]
        if what == "options":
            return options_markdown()
        if what == "fixtures":
            return fixtures_markdown()
        if what == "cli":
            return cli_markdown()
        if what == "runnable":  # the page's titled blocks are a project the test suite runs
            return ""
        if what == "errors" and argument:
            return errors_markdown(argument)
        raise ValueError(f"{page_path}: unknown marker {match[0]}")

    rendered = MARKER.sub(replace, markdown)
    if page_path.startswith("guides/"):  # a guide's code that readers copy must name what exists
        problems = [problem for block in code_blocks_of(markdown, page_path) for problem in block_problems(block)]
        if problems:
            raise ValueError("; ".join(problems))
    if page_path == "troubleshooting.md":
        kinds = [*error_classes(), "PgSandboxError", "PgSandboxWarning"]
        missing = [name for name in kinds if f"<!-- pgsandbox:errors {name} -->" not in markdown]
        if missing:
            raise ValueError(f"troubleshooting.md has no entry for {', '.join(missing)}: add a section for each")
    return rendered


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return render(markdown, page.file.src_uri)


def on_config(config: Any) -> Any:
    """Guides added under docs/guides/ appear in the navigation without an edit to mkdocs.yml."""
    docs = Path(config["docs_dir"])
    for section in config["nav"] or []:
        if isinstance(section, dict) and "Guides" in section:
            guides: list[Any] = section["Guides"]
            listed = {next(iter(entry.values())) if isinstance(entry, dict) else entry for entry in guides}
            for path in sorted((docs / "guides").glob("*.md")):
                uri = path.relative_to(docs).as_posix()
                if uri not in listed:
                    guides.append(uri)
    return config
