"""Counted nouns in messages: "1 row", "2 rows", "+1 row"."""

from __future__ import annotations


def counted(count: int, singular: str, plural: str | None = None, *, signed: bool = False) -> str:
    """``count`` and the noun that goes with it; ``signed``: a change, with its sign (``+1 row``, ``-2 rows``)."""
    noun = singular if abs(count) == 1 else plural or singular + "s"
    return f"{count:+d} {noun}" if signed else f"{count} {noun}"
