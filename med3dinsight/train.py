"""The `train` app: registers one command per stage (each in its own module) and routes the
training loggers to the console."""

from __future__ import annotations

import typer

from med3dinsight.common import new_app, run_console
from med3dinsight.train_clip import clip_cmd, embed_cmd
from med3dinsight.train_finetune import finetune_cmd
from med3dinsight.train_options import show_training_log
from med3dinsight.train_pretrain import export_cmd, pretrain_cmd

app = new_app("Train on curated slice-caption data: clip, embed, pretrain, export, finetune.")
app.command("clip")(clip_cmd)
app.command("embed")(embed_cmd)
app.command("pretrain")(pretrain_cmd)
app.command("export")(export_cmd)
app.command("finetune")(finetune_cmd)


@app.callback()
def main(ctx: typer.Context) -> None:
    """Training stages of med3dinsight."""
    ctx.call_on_close(show_training_log())


def run() -> None:
    """Console script `train`: one line per fault, tracebacks with --debug."""
    run_console(app)


if __name__ == "__main__":  # pragma: no cover
    run()
