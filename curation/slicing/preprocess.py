"""Volume preprocessing (Med3DInsight §3.1): RAS, isotropic, [0,1], cube, grid^3.

Both outputs are made straight from the source voxels with one interpolation each:

- the *training volume*: the data box padded to a cube of side L mm (L = largest extent) and
  resampled to ``grid^3`` (voxel size L/grid), intensities in [0, 1], float16;
- the *display volume*: the data box, windowed for viewing, uint8, kept lazily: the reoriented
  source grid itself, with only the axes finer than ``spacing`` mm (or longer than
  ``max_display_dim`` voxels) shrunk. Coarse axes (5 mm CT slices) are not grown to 1 mm here:
  `curation.slicing.render` interpolates the one plane a PNG needs when it is rendered.

Axis-aligned sources (any permutation/flip of RAS, the common case) are reoriented exactly
by transposes and flips (no interpolation), then resized with antialiasing on the axes that
shrink. Oblique or sheared sources (double-oblique MR, tilted-gantry CT) are resampled from
the source affine directly onto the RAS-aligned target grids (trilinear; labels nearest; the
display volume at ``spacing`` mm isotropic).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from curation.imageio.nib import nib
from curation.imageio.volume_io import VolumeError
from curation.slicing.config import PreprocessConfig  # noqa: F401  (re-exported)
from curation.slicing.resample import resample_oblique, resize3d

# Display windows (HU) for CT by body region: what a radiologist would look at first.
CT_DISPLAY_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (0.0, 80.0),
    "head": (0.0, 80.0),
    "chest": (-1000.0, 400.0),
    "lung": (-1000.0, 400.0),
    "abdomen": (-160.0, 240.0),
    "pelvis": (-160.0, 240.0),
    "default": (-160.0, 240.0),
}


# An aligned source axis is shrunk for the display volume only when its voxels are finer than
# this fraction of the display spacing (a 0.95 mm axis is kept as acquired, not resampled to 1 mm).
DISPLAY_SHRINK_BELOW = 0.9


@dataclass
class Preprocessed:
    volume: np.ndarray  # (G, G, G) float16 in [0, 1], RAS
    label: np.ndarray | None  # (G, G, G) smallest unsigned type holding every value, RAS
    display: np.ndarray  # (X, Y, Z) uint8, RAS, display_spacing mm per axis
    cube_mm: float
    display_spacing: list[float]
    display_origin_mm: list[float]  # where the display box starts inside the cube, per axis (mm)
    intensity_window: list[float]
    display_window: list[float]
    meta: dict = field(default_factory=dict)


def _is_axis_aligned(affine: np.ndarray, tol: float = 1e-4) -> bool:
    rzs = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return bool(np.all((np.abs(rzs) < tol) | (np.abs(np.abs(rzs) - 1) < tol)))


def clean_intensities(data: np.ndarray, name: str) -> np.ndarray:
    """The source itself when it holds integers (resampling converts it a slice at a time), else
    float32 (a view when it is float32 already) with NaN/inf replaced by the minimum finite
    value; errors on empty input."""
    arr = np.asarray(data)
    if arr.dtype.kind not in "iub":  # integers stay as stored: always finite, min/max narrower
        arr = arr.astype(np.float32, copy=False)
        finite = np.isfinite(arr)
        if not finite.all():
            if not finite.any():
                raise VolumeError(f"{name}: every voxel is NaN or infinite")
            arr = np.where(finite, arr, np.min(arr[finite]))
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo < 1e-6:
        raise VolumeError(f"{name}: empty volume (all voxels equal {lo:g})")
    return arr


def intensity_window(arr: np.ndarray, modality: str, cfg: PreprocessConfig) -> list[float]:
    """Training window: a fixed HU window for CT, foreground percentiles for everything else."""
    if modality == "CT":
        return [float(cfg.ct_window[0]), float(cfg.ct_window[1])]
    return percentile_window(arr, cfg.mr_percentiles)


def percentile_window(arr: np.ndarray, pcts: tuple[float, float]) -> list[float]:
    step = max(1, int(round((arr.size / 2_000_000) ** (1 / 3))))
    sample = arr[::step, ::step, ::step].ravel()
    lo_all = sample.min()
    fg = sample[sample > lo_all]  # MR background is the minimum (usually 0)
    if fg.size < 100:
        fg = sample
    lo, hi = np.percentile(fg, pcts)
    if hi - lo < 1e-6:
        lo, hi = float(sample.min()), float(sample.max())
    return [float(lo), float(hi)]


def display_window(modality: str, body_region: str | None, training_window: list[float]) -> list[float]:
    """CT: the region's viewing window; anything else: the training window (its percentiles)."""
    if modality == "CT":
        region = (body_region or "default").lower()
        lo, hi = CT_DISPLAY_WINDOWS.get(region, CT_DISPLAY_WINDOWS["default"])
        return [lo, hi]
    return list(training_window)


@dataclass
class _Geometry:
    box_min: np.ndarray  # world (RAS mm) corner of the data box
    extent: np.ndarray  # mm per axis
    aligned: bool


def _geometry(shape: tuple[int, ...], affine: np.ndarray) -> _Geometry:
    n = np.asarray(shape[:3], dtype=np.float64)
    corners = np.array([[i, j, k] for i in (-0.5, n[0] - 0.5) for j in (-0.5, n[1] - 0.5) for k in (-0.5, n[2] - 0.5)])
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    lo, hi = world.min(axis=0), world.max(axis=0)
    return _Geometry(box_min=lo, extent=hi - lo, aligned=_is_axis_aligned(affine))


def preprocess(
    data: np.ndarray,
    affine: np.ndarray,
    modality: str,
    cfg: PreprocessConfig,
    label: np.ndarray | None = None,
    body_region: str | None = None,
    name: str = "volume",
) -> Preprocessed:
    """Turn one 3D source array + voxel->RAS affine into training, label and display volumes."""
    if data.ndim != 3:
        raise VolumeError(f"{name}: expected a 3D array, got shape {tuple(data.shape)}")
    if min(data.shape) < 2:
        raise VolumeError(f"{name}: 2D image (shape {tuple(data.shape)}), not a volume")
    if label is not None and tuple(label.shape[:3]) != tuple(data.shape):
        raise VolumeError(f"{name}: label shape {tuple(label.shape)} does not match image shape {tuple(data.shape)}")
    arr = clean_intensities(data, name)
    win = intensity_window(arr, modality, cfg)
    dwin = display_window(modality, body_region, win)
    G = cfg.grid_size
    geo = _geometry(arr.shape, affine)
    if geo.aligned:  # RAS by flips and transposes: views, no copy (resize3d reads any layout)
        ornt = nib.orientations.io_orientation(affine)
        arr = nib.orientations.apply_orientation(arr, ornt)
        if label is not None:
            label = nib.orientations.apply_orientation(np.asarray(label), ornt)
    ext = geo.extent
    L = float(ext.max())
    s = L / G
    n_train = np.maximum(1, np.round(ext / s)).astype(int)
    n_train = np.minimum(n_train, G)
    pad = (G - n_train) // 2
    d = max(cfg.spacing, L / cfg.max_display_dim)
    n_disp = np.maximum(1, np.round(ext / d)).astype(int)
    if geo.aligned:  # never grown; shrunk only where the source is clearly finer than d
        n_src = np.asarray(arr.shape)
        n_disp = np.where(n_disp < n_src * DISPLAY_SHRINK_BELOW, n_disp, n_src).astype(int)

        def to_grid(a: np.ndarray, n: np.ndarray, order: int = 1) -> np.ndarray:
            return resize3d(a, tuple(n), order=order)
    else:
        arr = arr.astype(np.float32, copy=False)  # the affine resampler keeps its input's type
        fill = float(arr.min())

        def to_grid(a: np.ndarray, n: np.ndarray, order: int = 1) -> np.ndarray:
            sp = ext / n
            grid = np.diag([*sp, 1.0])
            grid[:3, 3] = geo.box_min + sp / 2
            return resample_oblique(a, affine, grid, tuple(n), order, fill if order else 0)

    train = to_grid(arr, n_train)
    lab = to_grid(np.asarray(label), n_train, order=0) if label is not None else None

    vol = np.zeros((G, G, G), dtype=np.float16)
    sl = tuple(slice(p, p + n) for p, n in zip(pad, n_train))
    vol[sl] = np.clip((train - win[0]) / (win[1] - win[0]), 0.0, 1.0).astype(np.float16)
    del train
    lab_out = None
    if lab is not None:
        lab = np.asarray(lab)
        lab = lab.astype(np.int64) if lab.dtype.kind in "iub" else np.rint(lab).astype(np.int64)
        if lab.min() < 0:
            raise VolumeError(f"{name}: label volume has negative values")
        dtype = np.min_scalar_type(int(lab.max()))  # wide enough: 70000 stays 70000
        lab_out = np.zeros((G, G, G), dtype=dtype)
        lab_out[sl] = lab.astype(dtype)

    disp = to_grid(arr, n_disp)
    if np.may_share_memory(disp, data):  # windowing works in place: never on the caller's array
        disp = disp.copy()
    # uint8 in the source's memory order (a NIfTI's Fortran order is saved as such: no transpose)
    display = _window_uint8(disp, dwin)
    disp_spacing = [float(v) for v in ext / n_disp]
    # The display box is centred on the training data box (pad .. pad + n_train grid voxels).
    origin = [float((p + n / 2) * s - e / 2) for p, n, e in zip(pad, n_train, ext)]
    return Preprocessed(
        volume=vol,
        label=lab_out,
        display=display,
        cube_mm=L,
        display_spacing=disp_spacing,
        display_origin_mm=origin,
        intensity_window=win,
        display_window=dwin,
        meta={"aligned": geo.aligned},
    )


def _window_uint8(x: np.ndarray, win: list[float]) -> np.ndarray:
    """Map [lo, hi] to 0..255 in place (x is a scratch float32 array), rounding to nearest."""
    x -= win[0]
    x *= 255.0 / (win[1] - win[0])
    x += 0.5
    np.clip(x, 0, 255, out=x)
    return x.astype(np.uint8)


def guess_modality(arr: np.ndarray) -> str:
    """Last-resort guess when nothing names the modality: CT stores air near -1000 HU."""
    sample = np.asarray(arr[::4, ::4, ::4], dtype=np.float32)
    finite = sample[np.isfinite(sample)]
    if finite.size and np.percentile(finite, 1) < -500:
        return "CT"
    return "MR"
