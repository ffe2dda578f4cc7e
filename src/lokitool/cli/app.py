"""The Typer app every command registers on, and the two consoles (messages on stderr, tables and
results on stdout). Imports no command: `main.py` does that."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Study and use low-rank key structure in LLM attention (Loki, arXiv 2406.02542).",
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 160)  # tables stay readable in logs


@app.callback()
def _root() -> None:
    """Study and use low-rank key structure in LLM attention (Loki, arXiv 2406.02542)."""


def progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
