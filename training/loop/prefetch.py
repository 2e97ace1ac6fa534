"""Batches made by a function of the step number, loaded ahead by `--workers` processes.

`train finetune` draws its batches as a pure function of (seed, step) (so a resume continues
the same sequence); this runs that function in DataLoader workers when ``workers`` > 0, in step
order, so loading and resizing volumes overlaps the optimizer step.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader, Dataset


class _StepBatches(Dataset):
    def __init__(self, make: Callable[[int], Any], start: int, end: int):
        self.make, self.start, self.end = make, start, end

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __getitem__(self, i: int) -> Any:
        return self.make(self.start + i)


def step_batches(make: Callable[[int], Any], start: int, end: int, workers: int = 0,
                 pin_memory: bool = False) -> Iterator[Any]:
    """``make(step)`` for ``step`` in ``range(start, end)``, in order; ``workers`` > 0 computes
    them in that many worker processes, a few steps ahead."""
    if workers <= 0:
        return (make(s) for s in range(start, end))
    loader = DataLoader(_StepBatches(make, start, end), batch_size=None, shuffle=False, num_workers=workers,
                        pin_memory=pin_memory, persistent_workers=False, prefetch_factor=2)
    return iter(loader)
