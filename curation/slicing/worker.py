"""What a `curate slice` worker process needs loaded: the fork server imports this module once,
and every worker forked from it starts with all of it (the main process, which only discovers
and assembles, loads SciPy and pandas lazily or not at all)."""

from scipy import ndimage, sparse  # noqa: F401  (resampling, body mask)

import curation.slicing.step  # noqa: F401
