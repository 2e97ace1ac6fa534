"""The on-disk format of preprocessed volumes, read by slicing, rendering, ranking and training.

``volume.npy`` / ``label.npy`` are plain (memory-mappable) ``.npy``; the display volume is a
uint8 ``.npy`` compressed with zstd (``zstd -d display.npy.zst`` gives a plain ``.npy``).
Writes are atomic. Reads raise `StoreError` (an OSError) whose one line names the file, and
`verify_npy` / `verify_display` let a resume check what it is about to trust.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from curation.store.fsutil import atomic_path

CHUNK = 1 << 22


class StoreError(OSError):
    """A preprocessed array that cannot be read: the message is one line naming the file."""


def save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def save_display(path: Path, arr: np.ndarray) -> None:
    """uint8 display volume as a zstd-compressed .npy."""
    with atomic_path(path) as tmp, pa.output_stream(str(tmp), compression="zstd") as out:
        np.save(out, arr)


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_display(path: str | Path) -> np.ndarray:
    try:
        with pa.input_stream(str(path), compression="zstd") as src:
            return np.lib.format.read_array(src, allow_pickle=False)
    except FileNotFoundError:
        raise StoreError(f"{path}: display volume is missing (rerun `curate slice` to redo it)") from None
    except Exception as exc:  # zstd/arrow/numpy raise many types on damaged files
        raise StoreError(f"{path}: unreadable display volume ({_why(exc)}); rerun `curate slice` to redo it") from None


def load_npy(path: str | Path, mmap: bool = True) -> np.ndarray:
    """A preprocessed ``.npy`` (memory-mapped by default) whose size matches its header."""
    verify_npy(path)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as exc:
        raise StoreError(f"{path}: unreadable array ({_why(exc)}); rerun `curate slice` to redo it") from None


def _header(fh) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(fh)
    return tuple(shape), np.dtype(dtype)


def verify_npy(path: str | Path) -> tuple[int, ...]:
    """The shape of a ``.npy`` whose file holds every byte its header declares; else StoreError."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            shape, dtype = _header(fh)
            offset = fh.tell()
    except FileNotFoundError:
        raise StoreError(f"{path}: array file is missing") from None
    except Exception as exc:
        raise StoreError(f"{path}: unreadable array header ({_why(exc)})") from None
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size != need:
        raise StoreError(f"{path}: truncated or damaged array ({size:,} bytes, header says {need:,})")
    return tuple(shape)


def verify_display(path: str | Path) -> None:
    """Decompress the display volume in chunks (bounded memory) and check its length."""
    path = Path(path)
    try:
        with pa.input_stream(str(path), compression="zstd") as src:
            shape, dtype = _header(src)
            left = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            while left > 0:
                got = len(src.read(min(CHUNK, left)))
                if got == 0:
                    break
                left -= got
            extra = src.read(1)
    except FileNotFoundError:
        raise StoreError(f"{path}: display volume is missing") from None
    except Exception as exc:
        raise StoreError(f"{path}: unreadable display volume ({_why(exc)})") from None
    if left > 0 or extra:
        raise StoreError(f"{path}: truncated or damaged display volume")
