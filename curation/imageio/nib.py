"""nibabel, imported without the pydicom it would load for nothing.

nibabel imports pydicom when it is installed (and it is: our DICOM reader needs it) to parse the
DICOM extensions a NIfTI header may carry, which nothing here reads: a quarter of a second of
every slicing process and worker. While nibabel loads, ``pydicom`` is marked absent (nibabel then
keeps such extensions as raw bytes); our DICOM modules import pydicom themselves afterwards.
"""

from __future__ import annotations

import sys

if "nibabel" not in sys.modules and "pydicom" not in sys.modules:
    sys.modules["pydicom"] = None  # type: ignore[assignment]  # import fails fast: nibabel's optional dependency
    try:
        import nibabel  # noqa: F401  (loaded here, bound below)
    finally:
        del sys.modules["pydicom"]

import nibabel as nib  # noqa: E402

__all__ = ["nib"]
