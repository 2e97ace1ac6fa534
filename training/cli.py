"""The `train` command line (stages land here as they are built)."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Train on curated slice-caption data: embed, clip, pretrain, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main() -> None:
    """Training stages of med3dinsight."""


if __name__ == "__main__":  # pragma: no cover
    app()
