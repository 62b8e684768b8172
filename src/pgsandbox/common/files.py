"""Which files a set of glob patterns names: the template's hash reads them, and the start-up check warns about a
pattern that matches none (a leaf, so that checking the options at start-up imports nothing heavy)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def files_matching(patterns: Iterable[str], root: Path) -> list[Path]:
    """Files matched by glob patterns relative to ``root`` (absolute patterns too), sorted, de-duplicated."""
    found: set[Path] = set()
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_absolute():
            anchor, relative = Path(path.anchor), str(path.relative_to(path.anchor))
        else:
            anchor, relative = root, pattern
        if any(char in relative for char in "*?["):
            found.update(p for p in anchor.glob(relative) if p.is_file())
        elif (anchor / relative).is_file():
            found.add(anchor / relative)
        elif (anchor / relative).is_dir():
            found.update(p for p in (anchor / relative).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return sorted(found)
