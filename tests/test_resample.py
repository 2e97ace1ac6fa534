"""resize3d: the same values whatever the array's memory layout or integer type, and the
expected values on simple inputs (block means on shrink, voxel-edge-aligned linear on grow)."""

from __future__ import annotations

import numpy as np
import pytest

from curation.slicing.resample import axis_weights, resize3d


def _reference(arr: np.ndarray, out_shape: tuple[int, int, int]) -> np.ndarray:
    """Dense weights, axis by axis, in float64 on a C-ordered copy."""
    out = np.array(arr, dtype=np.float64, order="C")
    for axis, m in enumerate(out_shape):
        n = out.shape[axis]
        if n != m:
            w = axis_weights(n, m).toarray().astype(np.float64)
            out = np.moveaxis(np.tensordot(w, np.moveaxis(out, axis, 0), axes=1), 0, axis)
    return out


LAYOUTS = {
    "C": lambda a: np.ascontiguousarray(a),
    "F (NIfTI)": lambda a: np.asfortranarray(a),
    "flipped F": lambda a: np.asfortranarray(a[::-1, :, ::-1])[::-1, :, ::-1],
    "transposed view": lambda a: np.ascontiguousarray(a.transpose(2, 0, 1)).transpose(1, 2, 0),
    "int16 F": lambda a: np.asfortranarray(np.rint(a * 1000).astype(np.int16)),
}


def test_integer_outer_axis_in_blocks_equals_whole(monkeypatch) -> None:
    """An integer source whose outer axis shrinks is made float a block of columns at a time."""
    import curation.slicing.resample as rs

    rng = np.random.default_rng(3)
    arr = np.asfortranarray(rng.integers(-1000, 1000, size=(80, 40, 30), dtype=np.int16))
    whole = resize3d(arr.astype(np.float32), (40, 20, 12))
    monkeypatch.setattr(rs, "OUTER_BLOCK", 1)  # blocks of 1024 of the 80*40 columns: four
    np.testing.assert_allclose(resize3d(arr, (40, 20, 12)), whole, rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("out_shape", [(7, 13, 20), (20, 5, 4), (9, 11, 6)])
def test_resize3d_is_layout_independent(layout: str, out_shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(7)
    base = rng.random((9, 11, 6)).astype(np.float32)
    arr = LAYOUTS[layout](base)
    got = resize3d(arr, out_shape)
    assert got.shape == out_shape and got.dtype == np.float32
    want = _reference(np.asarray(arr), out_shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())))


def test_resize3d_values_on_simple_inputs() -> None:
    ramp = np.arange(8, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    # shrink by 2: triangle filter as wide as the scale = mean of each pair, with its neighbours
    # weighted in: interior outputs of a linear ramp stay on the ramp (pair centres)
    half = resize3d(ramp, (4, 2, 2))[:, 0, 0]
    np.testing.assert_allclose(half[1:3], [2.5, 4.5], atol=1e-6)
    # grow by 2, voxel edges aligned: sources sit at output positions 0.5 + 2k
    up = resize3d(np.asfortranarray(ramp[:4]), (8, 2, 2))[:, 1, 1]
    np.testing.assert_allclose(up, [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3], atol=1e-6)
    labels = np.zeros((4, 4, 4), np.uint16)
    labels[2:, 2:, 2:] = 70000 % 65536
    near = resize3d(labels, (8, 8, 8), order=0)
    assert near.dtype == np.uint16 and set(np.unique(near)) == {0, 70000 % 65536}
