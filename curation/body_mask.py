"""The body mask of a preprocessed volume: the patient, without air, the CT table or noise.

A voxel above the foreground level is not yet body: the CT table, cushions, positioning aids
and MR background speckle are above it too. The body is the large connected part of the
foreground once thin structures are cut away:

1. foreground = intensity > ``level``;
2. an opening (``open_iter`` erosions then dilations, 6-connected) cuts the thin shells a
   couch is made of and the thin bridges (a blanket, a cushion) that join it to the patient;
3. connected components of what is left: the largest is the body, and so is any other at
   least ``keep_ratio`` of its size (two legs, two arms beside the trunk); the rest is table,
   tubing, noise;
4. the kept core grows back by ``2 * open_iter`` dilations inside the foreground (skin, ears and
   fingers the opening took) and holes are filled within each axial slice (lungs, bowel gas,
   sinuses belong to the body although they are air).

Deterministic and about 0.2 s for a 128^3 volume on one core.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_CROSS = ndimage.generate_binary_structure(3, 1)
_AXIAL = np.zeros((3, 3, 3), dtype=bool)  # in-plane connectivity of axial slices (RAS: z last)
_AXIAL[:, :, 1] = True


def body_mask(
    vol: np.ndarray, level: float = 0.05, open_iter: int = 2, keep_ratio: float = 0.3, stride: int = 1
) -> np.ndarray:
    """Boolean mask of the body in a (X, Y, Z) RAS volume with intensities in [0, 1].

    Args:
        vol: the preprocessed volume (any float dtype).
        level: foreground threshold (the preprocessing's ``foreground_level``).
        open_iter: opening depth in voxels; structures thinner than about twice this vanish.
        keep_ratio: components at least this fraction of the largest one are body too.
        stride: > 1 finds the body on every ``stride``-th voxel (opening depth scaled down)
            and maps it back, intersected with the full-resolution foreground: about
            ``stride**3`` times faster, for uses that need no exact border nor the filled
            holes (descriptors: they only zero what is outside the body).

    Returns:
        bool array of ``vol``'s shape; all False when nothing is above ``level``.
    """
    fg = np.asarray(vol) > level
    if not fg.any():
        return fg
    if stride > 1:
        s = stride
        small = body_mask(vol[::s, ::s, ::s], level, max(1, open_iter // s), keep_ratio)
        big = small.repeat(s, 0).repeat(s, 1).repeat(s, 2)[: fg.shape[0], : fg.shape[1], : fg.shape[2]]
        return big & fg  # hole voxels are (nearly all) below ``level``: not needed here
    core = ndimage.binary_opening(fg, structure=_CROSS, iterations=open_iter) if open_iter > 0 else fg
    if not core.any():  # everything is thin (a tiny or sheet-like volume): no opening
        core = fg
    lab, n = ndimage.label(core, structure=_CROSS)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        keep = sizes >= keep_ratio * sizes.max()
        keep[0] = False
        core = keep[lab]
    if open_iter > 0:
        # twice the opening depth: corners of a discretised surface need more than one depth
        core = ndimage.binary_dilation(core, structure=_CROSS, iterations=2 * open_iter, mask=fg)
    return fill_axial_holes(core)


def fill_axial_holes(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of every axial slice: background not connected, within its slice, to the
    slice's border. One labelling of the background, several times faster than
    ``ndimage.binary_fill_holes`` here."""
    lab, n = ndimage.label(~mask, structure=_AXIAL)
    if n == 0:
        return mask
    edges = np.concatenate([lab[0].ravel(), lab[-1].ravel(), lab[:, 0].ravel(), lab[:, -1].ravel()])
    outside = np.zeros(n + 1, dtype=bool)
    outside[edges] = True
    outside[0] = True  # label 0 is the mask itself
    return mask | ~outside[lab]
