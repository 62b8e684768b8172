"""What every benchmark in bench/ shares: the one module the scripts import (besides pgsandbox).

- command line: :func:`bench_parser` (``--bin``, ``--pg-version``, ``--json``) and :func:`chosen_bindir`, which
  finds PostgreSQL the way pgsandbox does (``pgsandbox.binaries``), never through a path of one machine;
- the reference schema (``../shared/bench/schema50.sql``, or the identical SQL generated): :func:`schema_sql`;
- facts printed before the figures: :func:`machine_facts`, :func:`load_average`, :func:`source_state`;
- who runs what: :class:`Runner` and, as root, :func:`unprivileged_runner` (PostgreSQL refuses root);
- scratch directories and the servers left in them: :func:`scratch`, :func:`stop_stragglers`; the servers
  ``pg_keep_alive`` kept in a benchmark's own runtime directory: :func:`stop_kept_alive`;
- the compared tools started one way for every script: :func:`raw_server_commands` (initdb + ``pg_ctl``),
  :func:`pytest_postgresql_args`, :func:`pgsandbox_env`;
- whole-process measurements (``time pytest``): :func:`run_timed`, :func:`run_together`; where a run's time goes
  (``-p bench_timeline``, written into a suite): :data:`TIMELINE_PLUGIN`, :func:`timeline_of`,
  :func:`print_timeline`; Python snippets that drive a sandbox through the plain API: :func:`sandbox_project`,
  :func:`run_snippet`;
- timing and figures: :func:`timed`, :func:`alternate`, :func:`divide`, :func:`fmt`, :func:`print_ratios`,
  :func:`print_targets`, :func:`write_json`.

Only the standard library is imported at module level: pgsandbox is imported where binaries are looked for.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import pwd
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCHEMA_FILE = REPO.parent / "shared" / "bench" / "schema50.sql"
TABLES = 50
ROWS = 200
NO_PGSANDBOX = ["-p", "no:pgsandbox"]
NO_PYTEST_POSTGRESQL = ["-p", "no:pytest_postgresql"]


DURATIONS_ENV = "BENCH_DURATIONS_FILE"
# The top of a generated suite's conftest: every test's setup, call and teardown durations, written as JSON to
# $BENCH_DURATIONS_FILE at the end of the session (isolation.py, dbisolation.py).
RECORDER = """\
import json
import os
import time

_BENCH = {"tests": {}, "imported": time.time()}


def pytest_runtest_logreport(report):
    entry = _BENCH["tests"].setdefault(report.nodeid, {})
    entry[report.when] = report.duration
    if report.failed:
        entry["failed"] = True


def pytest_sessionfinish(session, exitstatus):
    _BENCH["finished"] = time.time()
    with open(os.environ["BENCH_DURATIONS_FILE"], "w") as out:
        json.dump(_BENCH, out)
"""


class BenchError(Exception):
    """One run failed; the message holds what the subprocess said."""


# ------------------------------------------------------------------------------------------------ command line


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser: the module docstring's first paragraph, ``--bin`` and ``--pg-version`` (read by
    :func:`chosen_bindir`), and ``--json``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    parser.add_argument(
        "--bin",
        type=Path,
        metavar="DIR",
        help="PostgreSQL bin directory for every case (default: $PGSANDBOX_BIN, else what pgsandbox itself "
        "would choose: the newest installation it finds)",
    )
    parser.add_argument(
        "--pg-version",
        metavar="N",
        help="choose among the installations pgsandbox finds by version (16, 15.4), as pg_version does",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON here")
    return parser


def positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Refuse counts below one (``--runs 0`` would measure nothing)."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")


def chosen_bindir(args: argparse.Namespace) -> Path | None:
    """The bin directory pgsandbox's own discovery gives for ``--bin``/``$PGSANDBOX_BIN`` and ``--pg-version``;
    None, with pgsandbox's message on stderr, when there is none."""
    from pgsandbox.binaries import find_installations, select_installation
    from pgsandbox.errors import BinariesNotFound

    explicit: Path | None = args.bin or (Path(os.environ["PGSANDBOX_BIN"]) if os.environ.get("PGSANDBOX_BIN") else None)
    try:
        search = find_installations(explicit.expanduser() if explicit else None, cache_root=_fetched_root())
        installation = select_installation(search, args.pg_version, "--bin" if args.bin else "PGSANDBOX_BIN")
    except BinariesNotFound as error:
        print(error, file=sys.stderr)
        return None
    return installation.bindir.resolve()


def _fetched_root() -> Path:
    """Where ``pgsandbox fetch`` unpacks installations: pgsandbox's cache (not created here)."""
    from pgsandbox.server.clusters import default_cache_root

    configured = os.environ.get("PGSANDBOX_CACHE")
    return Path(configured).expanduser() if configured else default_cache_root()


def command_line() -> str:
    """How this benchmark was run, for its report."""
    return " ".join([Path(sys.executable).name, *sys.argv])


def chosen_cases(parser: argparse.ArgumentParser, given: str | None, cases: Sequence[str]) -> list[str]:
    """``--cases a,b``: the names given (all of ``cases`` when none), each checked."""
    chosen = [key.strip() for key in (given or ",".join(cases)).split(",") if key.strip()]
    unknown = [key for key in chosen if key not in cases]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose among {', '.join(cases)}")
    return chosen


def run_bench(
    script: str,
    prefix: str,
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    bench_main: Callable[[argparse.Namespace, Path, Path, Path, str], int],
) -> int:
    """A script's ``main``: the binaries chosen, ``bench_main(args, bindir, work, data, command)`` run in a
    scratch directory (:func:`scratch`); 2 without binaries, 130 when interrupted."""
    command = full_command(script, argv)
    bindir = chosen_bindir(args)
    if bindir is None:
        return 2
    with scratch(prefix, keep=args.keep) as (work, data):
        return bench_main(args, bindir, work, data, command)
    return 130  # interrupted


def full_command(script: str, argv: Sequence[str] | None) -> str:
    """The command with the interpreter's full path (the longer reports print it)."""
    return shlex.join([sys.executable, *(sys.argv if argv is None else [script, *argv])])


# ------------------------------------------------------------------------------------------------------ schema


def schema_sql() -> tuple[str, str]:
    """The reference schema's text and where it came from: the shared file, or the same SQL generated."""
    if SCHEMA_FILE.is_file():
        return SCHEMA_FILE.read_text(), str(SCHEMA_FILE)
    lines: list[str] = []
    for i in range(TABLES):
        lines += [
            f"CREATE TABLE t{i} (id bigserial PRIMARY KEY, name text NOT NULL, value int NOT NULL, payload text, "
            "created_at timestamptz NOT NULL DEFAULT now());",
            f"CREATE INDEX t{i}_value_idx ON t{i}(value);",
            f"CREATE UNIQUE INDEX t{i}_name_uq ON t{i}(name);",
            f"INSERT INTO t{i}(name, value, payload) SELECT 'n'||g, g%100, repeat('x',50) "
            f"FROM generate_series(1,{ROWS}) g;",
        ]
    return "\n".join(lines) + "\n", f"generated ({SCHEMA_FILE} not found)"


# ------------------------------------------------------------------------------------------------------- facts


def filesystem(path: Path) -> str:
    """``tmpfs (/dev/shm)``: the type and mount point of the filesystem holding ``path``."""
    target = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, parts[2]
    except OSError:
        return "unknown"
    return f"{kind} ({best})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def pgsandbox_revision() -> str:
    """The repository's commit, and whether src/ differs from it (people edit it concurrently)."""
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        return ""
    head = subprocess.run([git, "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return ""
    dirty = subprocess.run([git, "-C", str(REPO), "status", "--porcelain", "--", "src"], capture_output=True, text=True)
    return f"git {head.stdout.strip()}" + (", src/ modified" if dirty.stdout.strip() else "")


def source_state() -> str:
    """A fingerprint of src/ as the pytest runs import it: git's tree id of src/ plus a hash of uncommitted
    changes (commits that touch only bench/ or docs leave it alone)."""
    git = shutil.which("git")
    if git is None:
        return pgsandbox_revision()
    tree = subprocess.run([git, "-C", str(REPO), "rev-parse", "HEAD:src"], capture_output=True, text=True)
    diff = subprocess.run([git, "-C", str(REPO), "diff", "HEAD", "--", "src"], capture_output=True)
    untracked = subprocess.run(
        [git, "-C", str(REPO), "ls-files", "--others", "--exclude-standard", "--", "src"], capture_output=True
    )
    digest = hashlib.sha1(diff.stdout + untracked.stdout).hexdigest()[:10]
    return f"src tree {tree.stdout.strip()[:10]}" + (f" + diff {digest}" if diff.stdout or untracked.stdout else "")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def pg_version_text(bindir: Path) -> str:
    return subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True).stdout.strip()


def machine_facts(bindir: Path, runner: Runner, revision: str | None) -> dict[str, str]:
    """What the longer benchmarks print first: machine, PostgreSQL, interpreters, package versions."""
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return {
        "machine": f"{cores} cores ({usable} usable), {cpu_model()}, {platform.system()} {platform.release()}",
        "PostgreSQL": f"{pg_version_text(bindir)} ({bindir})",
        "Python (this script)": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "Python (pytest runs)": f"{runner.python_version} ({runner.python})"
        + (" with PYTHONPATH, see note" if "PYTHONPATH" in runner.env else ""),
        "pytest": package_version("pytest") or "?",
        "pgsandbox": " ".join(
            filter(None, [package_version("pytest-pgsandbox") or "not installed", f"({revision})" if revision else ""])
        ),
        "pytest-postgresql": package_version("pytest-postgresql") or "not installed",
    }


def print_facts(facts: Mapping[str, str], width: int) -> None:
    for name, value in facts.items():
        print(f"  {name + ':':<{width}} {value}")


# ----------------------------------------------------------------------------------------------------- runners


@dataclass(frozen=True)
class Runner:
    """Who runs a subprocess and with which interpreter."""

    label: str
    python: str
    python_version: str
    env: dict[str, str] = field(default_factory=dict)
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()

    def popen_kwargs(self) -> dict[str, Any]:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def own(self, path: Path) -> Path:
        """Create ``path`` (a directory) owned by this runner's user."""
        path.mkdir(parents=True, exist_ok=True)
        self.chown(path)
        return path

    def chown(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def write(self, files: Mapping[Path, str]) -> None:
        """Write a temp project's files (and their directories), owned by this runner's user."""
        for path, text in files.items():
            self.own(path.parent)
            path.write_text(text)
            self.chown(path)


def current_runner() -> Runner:
    """This user and this interpreter."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    return Runner(f"user {me!r}", sys.executable, platform.python_version())


def same_interpreter(main: Runner, other: Runner | None) -> Runner:
    """``main`` with ``other``'s interpreter when that is not this one: every pytest case then pays the same
    interpreter start-up (see :func:`unprivileged_runner`)."""
    if other is None or other.python == sys.executable:
        return main
    return Runner(main.label, other.python, other.python_version, {"PYTHONPATH": other.env["PYTHONPATH"]})


def environment_path() -> str:
    """This interpreter's import path beyond its standard library: site-packages, .pth additions."""
    stdlib = [sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")]
    entries = []
    for entry in sys.path[1:]:  # [0] is this script's directory
        in_stdlib = any(entry == lib or entry.startswith(lib + os.sep) for lib in stdlib)
        packages = "site-packages" in entry or "dist-packages" in entry
        if entry and os.path.isdir(entry) and (packages or not in_stdlib):
            entries.append(entry)
    return os.pathsep.join(dict.fromkeys(entries))


def unprivileged_runner(name: str, probe_dir: Path) -> tuple[Runner | None, Runner | None, str]:
    """As root: (a runner for pytest-postgresql or None, a runner for raw pg_ctl or None, a note).

    The first runner runs this interpreter when ``name`` can, else a system interpreter of the same
    version with this environment's import path on PYTHONPATH (the note says so: run every pytest case
    with that interpreter too, so that all of them pay the same interpreter start-up).
    """
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        reason = (
            f"running as root, PostgreSQL refuses root, and there is no user {name!r} to run it as "
            "(create one, pass --user, or run this script as a normal user)"
        )
        return None, None, reason
    groups = tuple(os.getgrouplist(name, entry.pw_gid))
    base = Runner(
        f"user {name!r}",
        sys.executable,
        platform.python_version(),
        {"HOME": str(probe_dir), "USER": name, "LOGNAME": name},
        entry.pw_uid,
        entry.pw_gid,
        groups,
    )
    base.own(probe_dir)
    probe = "import sys, pytest, pytest_postgresql, psycopg; print(sys.version.split()[0])"
    errors: list[str] = []
    candidates: list[tuple[str, dict[str, str]]] = [(sys.executable, {})]
    same = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(same, path="/usr/local/bin:/usr/bin:/bin")
    if system is not None:
        candidates.append((system, {"PYTHONPATH": environment_path()}))
    for python, extra in candidates:
        env = {**clean_env(), **base.env, **extra}
        try:
            out = subprocess.run(
                [python, "-c", probe],
                cwd=probe_dir,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                **base.popen_kwargs(),
            )
        except (OSError, subprocess.SubprocessError) as error:
            errors.append(f"{python}: {error}")
            continue
        if out.returncode == 0:
            runner = Runner(
                f"user {name!r}", python, out.stdout.strip(), {**base.env, **extra}, base.uid, base.gid, groups
            )
            note = (
                ""
                if python == sys.executable
                else (
                    f"user {name!r} cannot run {sys.executable}, so every pytest case runs {python} "
                    f"({out.stdout.strip()}) with PYTHONPATH={extra['PYTHONPATH']}"
                )
            )
            return runner, base, note
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        errors.append(f"{python}: {last}")
    reason = (
        f"user {name!r} cannot run a Python with pytest-postgresql ({'; '.join(errors)}); "
        "install the packages where that user can read them, or run this script as a normal user"
    )
    return None, base, reason


def clean_env() -> dict[str, str]:
    """This environment minus anything that would change how pytest or pgsandbox behave."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PGSANDBOX_", "PYTEST_", "PG"))}


# ------------------------------------------------------------------------------------ the tools compared, started


def raw_server_commands(
    bindir: Path | str, data: Path | str, sock: Path | str, log: Path | str, *, fsync: bool = True
) -> tuple[list[str], list[str], list[str]]:
    """The raw PostgreSQL primitives, as every benchmark runs them: initdb (trust, user ``postgres``), then
    ``pg_ctl start -w`` on a Unix socket only, then ``pg_ctl stop -m fast``. ``fsync=False`` adds ``-F``.
    Placeholders such as ``"{data}"`` may stand for the paths in a generated conftest (format each part)."""
    pg_ctl = str(Path(bindir) / "pg_ctl")
    options = ("-F " if not fsync else "") + f"-c listen_addresses='' -k {sock}"
    initdb = [str(Path(bindir) / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
    start = [pg_ctl, "start", "-w", "-D", str(data), "-l", str(log), "-o", options]
    stop = [pg_ctl, "stop", "-w", "-m", "fast", "-D", str(data)]
    return initdb, start, stop


def pytest_postgresql_args(bindir: Path, sock: Path, basetemp: Path) -> list[str]:
    """pytest-postgresql on the same binaries, pgsandbox's plugin off, its data under ``basetemp``."""
    return [
        *NO_PGSANDBOX,
        f"--postgresql-exec={bindir / 'pg_ctl'}",
        f"--postgresql-unixsocketdir={sock}",
        f"--basetemp={basetemp}",
    ]


def pgsandbox_env(bindir: Path, runtime: Path | None = None, cache: Path | None = None) -> dict[str, str]:
    """A pytest run with pgsandbox: a local server from ``bindir``, its run directories under ``runtime``."""
    env = {"PGSANDBOX_BIN": str(bindir), "PGSANDBOX_SERVER": "local"}
    if runtime is not None:
        env["PGSANDBOX_RUNTIME_DIR"] = str(runtime)
    if cache is not None:
        env["PGSANDBOX_CACHE"] = str(cache)
    return env


def shown_command(command: Sequence[str], env: Mapping[str, str], prefixes: tuple[str, ...] = ("PGSANDBOX_",)) -> str:
    """``PGSANDBOX_X=... command``: how to run it again by hand."""
    shown = {k: v for k, v in env.items() if k.startswith(prefixes)}
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(shown.items()))
    return (prefix + " " if prefix else "") + shlex.join(command)


# ------------------------------------------------------------------------------------- whole-process measurements


@dataclass
class Timed:
    """One process run: when it started (wall clock, for stamps a test writes), how long it took, what it said."""

    started: float
    seconds: float
    returncode: int
    output: str


def run_timed(
    command: Sequence[str],
    cwd: Path,
    env: Mapping[str, str],
    timeout: float,
    runner: Runner | None = None,
    what: str = "pytest",
) -> Timed:
    """``time pytest``: spawn to exit, stdin closed, stdout and stderr captured."""
    started, clock = time.time(), time.perf_counter()
    try:
        out = subprocess.run(
            list(command),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            **(runner.popen_kwargs() if runner else {}),
        )
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"{what} did not finish within {timeout:.0f} s: {error}") from None
    return Timed(started, time.perf_counter() - clock, out.returncode, out.stdout + out.stderr)


def run_together(commands: Sequence[Sequence[str]], cwd: Path, env: Mapping[str, str], timeout: float = 600) -> float:
    """Start every command at once; seconds until the last one exits (each must pass)."""
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            list(command), cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for command in commands
    ]
    outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    seconds = time.perf_counter() - started
    for command, process, output in zip(commands, processes, outputs, strict=True):
        if process.returncode != 0:
            raise BenchError(f"{shlex.join(command)} failed:\n{output[-3000:]}")
    return seconds


def sandbox_project(root: Path, schema: str, migration: str = "1_schema.sql") -> Path:
    """A project directory whose one SQL migration is ``schema`` (``pg_migrations = ["sql:migrations"]``)."""
    (root / "migrations").mkdir(parents=True)
    (root / "migrations" / migration).write_text(schema)
    return root


def snippet_env(cache: Path) -> dict[str, str]:
    """For :func:`run_snippet`: this repository's src/ and a cache of the benchmark's own."""
    return {**clean_env(), "PYTHONPATH": str(REPO / "src"), "PGSANDBOX_CACHE": str(cache)}


def run_snippet(code: str, args: Sequence[str], cwd: Path, env: Mapping[str, str]) -> str:
    """Run ``python -c code args...`` in its own process; the last line it printed."""
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=dict(env), capture_output=True, text=True)
    if out.returncode != 0:
        raise BenchError(f"a measuring process exited {out.returncode}:\n{out.stderr}")
    return out.stdout.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------ stray processes


def our_processes(roots: Sequence[Path]) -> list[int]:
    """Processes whose command line or working directory lies in one of ``roots`` (Linux /proc)."""
    prefixes = [str(root) for root in roots]
    found: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            cwd = ""
        if any(p in cmdline or cwd == p or cwd.startswith(p + "/") for p in prefixes):
            found.append(int(entry.name))
    return found


def postmaster_pids(roots: Sequence[Path]) -> list[int]:
    """Without /proc: the PIDs named by postmaster.pid files under ``roots``."""
    pids: list[int] = []
    for root in roots:
        for pid_file in root.rglob("postmaster.pid"):
            try:
                pids.append(int(pid_file.read_text().splitlines()[0]))
            except (OSError, ValueError, IndexError):
                continue
    return pids


def stop_stragglers(roots: Sequence[Path]) -> list[str]:
    """Stop every process still running from ``roots``: SIGQUIT, then SIGKILL. Returns what was found."""
    pids = our_processes(roots) if Path("/proc").is_dir() else postmaster_pids(roots)
    found: list[str] = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            cmd = ""
        found.append(f"{pid} {cmd}".strip())
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGQUIT)  # immediate shutdown for a postmaster
    deadline = time.monotonic() + 5
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if running(pid)]
        time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return found


def stop_kept_alive(runner: Runner, runtime: Path) -> list[str]:
    """Stop the servers ``pg_keep_alive`` left in ``runtime`` (a benchmark's own runtime directory) and their
    watchers, the way a user does: ``pgsandbox clean --keep-cache RUN_ID...``. Run by run: a plain ``pgsandbox
    clean`` would also stop this OS user's other kept and leftover servers in /dev/shm and the temp dir (other
    people's runs on a shared machine). Returns what it said, one line each; an error when it failed."""
    state_file = "keepalive.json"  # pgsandbox.server.idle_watch.STATE_FILE
    ids = sorted(path.name for path in runtime.glob("pgsandbox-*/run-*") if (path / state_file).exists())
    if not ids:
        return []
    env = {**clean_env(), **runner.env, "PGSANDBOX_RUNTIME_DIR": str(runtime)}
    command = [runner.python, "-m", "pgsandbox.cli", "clean", "--keep-cache", *ids]  # named runs: no cache touched
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, **runner.popen_kwargs())
    if out.returncode != 0:
        raise BenchError(f"{shlex.join(command)} exited {out.returncode}:\n{tail(out.stdout + out.stderr)}")
    said: str = out.stdout
    return said.strip().splitlines()


def running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return "\nState:\tZ" not in status


def tail(text: str, lines: int = 30) -> str:
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


@contextlib.contextmanager
def scratch(prefix: str, keep: bool = False) -> Iterator[tuple[Path, Path]]:
    """A work directory in the temp dir and a data directory on /dev/shm (the same one without it), both
    traversable by the server's user; afterwards every process left in them is stopped and they are removed
    (unless ``keep``). Ctrl-C ends the block quietly: the caller returns 130."""
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix=prefix))
    use_shm = shm.is_dir() and os.access(shm, os.W_OK)
    data = Path(tempfile.mkdtemp(prefix=prefix, dir=shm)) if use_shm else work
    try:
        for root in {work, data}:
            root.chmod(0o755)  # the server's user must traverse it when we are root
        yield work, data
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        left = stop_stragglers([work, data])
        if left:
            print(f"stopped processes left running: {'; '.join(left)}", file=sys.stderr)
        if keep:
            print(f"kept: {work} {data if data != work else ''}".strip())
        else:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(data, ignore_errors=True)


# --timeline (startup.py, small_suite.py): a plugin loaded with `-p bench_timeline` in extra runs (not the measured
# ones), which notes the wall clock at pytest's hooks, around the first import of psycopg, SQLAlchemy and
# pgsandbox's heavier packages, and around calls of the pgsandbox functions a database run goes through (in the
# thread that ran them); the names it looks for are those of this tree: one that is gone is left out, not an error
TIMELINE_PLUGIN_NAME = "bench_timeline"
TIMELINE_ENV = "BENCH_TIMELINE_FILE"
TIMELINE_PLUGIN = """'''The benchmark's timeline plugin (``-p bench_timeline``): wall-clock times of pytest's
hooks, of the first import of some modules and of calls to some pgsandbox functions, written at exit to
$BENCH_TIMELINE_FILE.'''

import atexit
import gc
import importlib.abc
import json
import os
import sys
import threading
import time

import pytest

EVENTS = []
IMPORTS = {
    "psycopg", "psutil", "sqlalchemy", "pgsandbox.binaries", "pgsandbox.data", "pgsandbox.server",
    "pgsandbox.server.external", "pgsandbox.server.launch", "pgsandbox.server.local", "pgsandbox.sandbox",
}
CALLS = {
    "pgsandbox.pytest.state": ["BackgroundStart.__init__", "BackgroundStart.server", "start_early"],
    "pgsandbox.server.launch": ["prepare", "launch"],
    "pgsandbox.server.local": [
        "LocalServer.start", "LocalServer._attach_kept", "LocalServer._adopt", "LocalServer._launch",
        "_new_superuser_password", "LocalServer.stop", "LocalServer.detach",
    ],
    "pgsandbox.server.keepalive": ["sweep", "find"],
    "pgsandbox.server.reaper": ["stale_runs", "drop_dead_runs"],
    "pgsandbox.sandbox.core": [
        "Sandbox.start", "Sandbox._create_login", "Sandbox.open", "Sandbox.close", "Sandbox.stop",
    ],
}


def mark(name):
    thread = threading.current_thread().name
    EVENTS.append((name if thread == "MainThread" else f"{name} [{thread}]", time.time()))


def timed(name, function):
    def wrapper(*args, **kwargs):
        mark(f"{name} >")
        try:
            return function(*args, **kwargs)
        finally:
            mark(f"{name} <")

    wrapper.__wrapped__ = function
    return wrapper


def wrap(module, qualname):
    owner_name, _, name = qualname.rpartition(".")
    owner = getattr(module, owner_name) if owner_name else module
    found = owner.__dict__.get(name) if owner_name else getattr(module, name, None)
    if found is None:
        return
    if isinstance(found, (classmethod, staticmethod)):
        setattr(owner, name, type(found)(timed(qualname, found.__func__)))
    else:
        setattr(owner, name, timed(qualname, found))


class TimedLoader(importlib.abc.Loader):
    def __init__(self, inner, name):
        self.inner, self.name = inner, name

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        watched = self.name in IMPORTS
        if watched:
            mark(f"import {self.name} >")
        try:
            self.inner.exec_module(module)
        finally:
            if watched:
                mark(f"import {self.name} <")
        for qualname in CALLS.get(self.name, ()):
            wrap(module, qualname)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class Watch(importlib.abc.MetaPathFinder):
    searching = threading.local()  # another finder that asks the others (pgsandbox's connect hooks) asks this one

    def find_spec(self, name, path, target=None):
        if name not in IMPORTS and name not in CALLS or getattr(self.searching, "name", None) == name:
            return None
        self.searching.name = name
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    if spec.loader is not None:
                        spec.loader = TimedLoader(spec.loader, name)
                    return spec
            return None
        finally:
            self.searching.name = None


sys.meta_path.insert(0, Watch())
gc.collect = timed("gc.collect", gc.collect)  # pytest collects at its end: the more objects, the longer
mark("timeline plugin imported")


def write():
    mark("atexit")
    with open(os.environ["BENCH_TIMELINE_FILE"], "w") as out:
        json.dump(EVENTS, out)


atexit.register(write)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    mark("pytest_configure")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    mark("pytest_sessionstart")


@pytest.hookimpl(wrapper=True)
def pytest_collection_finish(session):
    mark("pytest_collection_finish >")
    try:
        return (yield)
    finally:
        mark("pytest_collection_finish <")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    mark("pytest_runtest_setup >")
    try:
        return (yield)
    finally:
        mark("pytest_runtest_setup <")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    mark("pytest_runtest_teardown >")
    try:
        return (yield)
    finally:
        mark("pytest_runtest_teardown <")


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session, exitstatus):
    mark("pytest_sessionfinish >")
    try:
        return (yield)
    finally:
        mark("pytest_sessionfinish <")


@pytest.hookimpl(wrapper=True)
def pytest_unconfigure(config):
    mark("pytest_unconfigure >")
    try:
        return (yield)
    finally:
        mark("pytest_unconfigure <")
"""


def timeline_of(events: list[tuple[str, float]], started: float, seconds: float) -> dict[str, float]:
    """Milliseconds from the spawn to each event's first occurrence, and to the process's exit."""
    times: dict[str, float] = {}
    for name, at in events:
        times.setdefault(name, (at - started) * 1000)
    times["process exit"] = seconds * 1000
    return times


def print_timeline(label: str, columns: Mapping[str, Sequence[Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """The medians of timeline runs (:func:`timeline_of`), one column per kind of run, in the order of the first
    column's events, and the first column minus the second; returns the medians."""
    medians = {
        column: {
            name: statistics.median(run[name] for run in runs if name in run)
            for name in {name for run in runs for name in run}
        }
        for column, runs in columns.items()
    }
    first, *others = medians
    main = medians[first]
    count = len(columns[first])
    print()
    print(f"Timeline, {label}: ms from spawn, medians of {count} runs with -p {TIMELINE_PLUGIN_NAME}")
    width = max(len(name) for name in main) + 2
    heads = [first, *others]
    print(
        f"  {'event':<{width}}" + "".join(f"{head:>14}" for head in heads) + (f"{'difference':>12}" if others else "")
    )
    for name in sorted(main, key=lambda event: main[event]):
        values = [medians[head].get(name) for head in heads]
        gap = fmt(minus(values[0], values[1]), 0) if len(values) > 1 and values[1] is not None else ""
        print(f"  {name:<{width}}" + "".join(f"{fmt(value, 0):>14}" for value in values) + f"{gap:>12}")
    print("  ('>': a call or import begins, '<': it returns; [thread]: not the main thread)")
    return {name: {head: value for head in heads if (value := medians[head].get(name)) is not None} for name in main}


# ------------------------------------------------------------------------------------------- timing, figures


def timed(action: Callable[[], object]) -> float:
    """Milliseconds ``action`` took."""
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def alternate(count: int, variants: Mapping[str, Callable[[], object]]) -> dict[str, list[float]]:
    """Each variant ``count`` times, one of each in turn (so that all see the same machine load); seconds."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(count):
        for name, run in variants.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return times


def divide(top: float | None, bottom: float | None) -> float | None:
    if top is None or bottom is None or bottom <= 0:
        return None
    return top / bottom


def minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_ratios(ratios: Mapping[str, float | None], width: int) -> None:
    """``  name:   4.74x`` per ratio (``-`` when one side was not measured)."""
    for name, factor in ratios.items():
        print(f"  {name + ':':<{width}} {'-' if factor is None else f'{factor:.2f}x'}")


def print_targets(targets: Mapping[str, bool | None]) -> None:
    for name, met in targets.items():
        print(f"  target: {name}: {'not measured' if met is None else 'MET' if met else 'NOT MET'}")


def write_json(path: Path | None, document: object) -> None:
    """Write the results for ``--json`` (run_all.py reads its headline figures from there)."""
    if path is not None:
        path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nwrote {path}")
