"""The trainers' progress bar: one look for `train clip`, `train pretrain` and `train finetune`
(stage, bar, steps done of total, last loss, time left), shown on rank 0 only."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class StepProgress:
    """A step counter bar: ``with StepProgress("clip", total, start) as bar: bar.update(step, loss)``."""

    def __init__(self, label: str, total: int, completed: int = 0, enabled: bool = True):
        self._progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), disable=not enabled)
        self._task = self._progress.add_task(label, total=total, completed=completed, loss="-")

    def update(self, step: int, loss: float | None = None) -> None:
        """The bar at ``step``; ``loss`` shown with four decimals when given."""
        fields = {} if loss is None else {"loss": f"{loss:.4f}"}
        self._progress.update(self._task, completed=step, **fields)

    def __enter__(self) -> StepProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)
