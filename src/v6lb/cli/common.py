"""What several command groups share: the wide console of the hop tables."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["wide_console"]


def wide_console() -> Console:
    """A console at least 160 columns wide: the hop tables need it."""
    from rich.console import Console

    return Console(width=max(160, Console().width), emoji=False, highlight=False)
