"""The on-disk format of preprocessed volumes, read by slicing, rendering, ranking and training.

``volume.npy`` / ``label.npy`` are plain (memory-mappable) ``.npy``; the display volume is a
uint8 ``.npy`` compressed with zstd (``zstd -d display.npy.zst`` gives a plain ``.npy``).
Writes are atomic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from .fsutil import atomic_path


def save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def save_display(path: Path, arr: np.ndarray) -> None:
    """uint8 display volume as a zstd-compressed .npy."""
    with atomic_path(path) as tmp, pa.output_stream(str(tmp), compression="zstd") as out:
        np.save(out, arr)


def load_display(path: str | Path) -> np.ndarray:
    with pa.input_stream(str(path), compression="zstd") as src:
        return np.lib.format.read_array(src, allow_pickle=False)
