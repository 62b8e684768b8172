"""How a long step tells the user what it does: one line of text at a time (pytest's terminal, the CLI)."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str], None]
