"""What both apps share: consoles, the progress bar, and the options every command takes."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)  # progress, warnings, errors
out = Console()  # results

WorkdirOpt = typer.Option(Path("."), "--workdir", help="Where manifests/, volumes/, cache/, checkpoints/ ... live.")


def new_app(help: str) -> typer.Typer:
    return typer.Typer(help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        transient=False,
    )


def fail(message: str, code: int = 2, label: str = "error") -> typer.Exit:
    """Print one line and return the Exit to raise: ``raise fail(f"{path}: ...")``."""
    console.print(f"[red]{label}:[/red] {message}")
    return typer.Exit(code)
