"""The session report: what a session did (server, templates, tests, seconds, databases, findings, cache), as
plain data. The terminal summary and ``--pg-report=json`` show it; an xdist controller adds in its workers'."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgsandbox.server.clusters import cache_size, default_cache_root, wait_for_cache_writes
from pgsandbox.template import TemplateInfo


@dataclass
class Counters:
    """What one process's tests did, counted as they run."""

    tests: dict[str, int] = field(default_factory=dict)  # by isolation mode
    setup_seconds: float = 0.0
    teardown_seconds: float = 0.0
    findings: dict[str, int] = field(default_factory=dict)  # by kind

    def opened(self, mode: str, seconds: float) -> None:
        self.tests[mode] = self.tests.get(mode, 0) + 1
        self.setup_seconds += seconds

    def found(self, kind: str) -> None:
        self.findings[kind] = self.findings.get(kind, 0) + 1


@dataclass(frozen=True)
class ServerSummary:
    """The server, as the report names it."""

    version: str
    origin: str  # where its binaries come from, or which existing server
    start: str  # how it started: from a cached cluster, from the initdb cache, attached
    start_seconds: float


def session_report(
    server: ServerSummary,
    templates: Sequence[TemplateInfo],
    counters: Counters,
    databases: dict[str, int],
    cache: dict[str, Any],
) -> dict[str, Any]:
    """The report of one process. ``databases``: created, dropped, kept; ``cache``: :func:`cache_report`."""
    return {
        "server": {
            "version": server.version,
            "origin": server.origin,
            "start": server.start,
            "start_seconds": round(server.start_seconds, 3),
        },
        "templates": [
            {
                "layer": info.layer,
                "hash": info.short_hash,
                "labels": list(info.labels),
                "hit": info.hit,
                "why_built": "" if info.hit else info.why_built,
                "build_seconds": round(info.seconds, 3),
            }
            for info in templates
        ],
        "tests": dict(counters.tests),
        "setup_seconds": round(counters.setup_seconds, 3),
        "teardown_seconds": round(counters.teardown_seconds, 3),
        "databases": dict(databases),
        "findings": dict(counters.findings),
        "cache": cache,
    }


def cache_report(cache: Path | None, max_bytes: int) -> dict[str, Any]:
    """The cache's size now and its bound (pg_cache_max_size), once this process's writes are in it."""
    wait_for_cache_writes()
    root = cache or default_cache_root()
    return {"path": str(root), "bytes": cache_size(root) if root.is_dir() else 0, "max_bytes": max_bytes}


def merge_reports(main: dict[str, Any], others: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The controller's report with what its xdist workers counted added in."""
    merged: dict[str, Any] = json.loads(json.dumps(main))
    for other in others:
        for key in ("setup_seconds", "teardown_seconds"):
            merged[key] = round(merged[key] + other[key], 3)
        for section in ("tests", "databases", "findings"):
            for name, count in other[section].items():
                merged[section][name] = merged[section].get(name, 0) + count
    return merged
