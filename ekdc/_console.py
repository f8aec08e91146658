"""The console every command prints through (one object: tests and callers set its width once)."""
from __future__ import annotations

from rich.console import Console

console = Console(highlight=False)


def show(table) -> None:
    """Print a table; a pipe or a file has no width to respect, so there it is printed uncropped."""
    if not console.is_terminal:
        console.width = max(console.width, console.measure(table, options=console.options.update_width(400)).maximum)
    console.print(table)
