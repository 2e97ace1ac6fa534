"""The configs of `curate slice`: one place for their defaults (no heavy imports: the command
line reads them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from curation.imageio.limits import DEFAULT_MAX_VOXELS


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing parameters; one place for their defaults."""

    grid_size: int = 128
    spacing: float = 1.0  # finest display-volume voxel size (mm); coarser source axes are kept
    ct_window: tuple[float, float] = (-1000.0, 1000.0)  # training volume HU window
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    max_display_dim: int = 640  # cap on display voxels per axis (spacing grows beyond it)
    foreground_level: float = 0.05  # a pixel counts as foreground above this normalised value

    def fingerprint(self) -> dict:
        return {
            "grid_size": self.grid_size,
            "spacing": self.spacing,
            "ct_window": list(self.ct_window),
            "mr_percentiles": list(self.mr_percentiles),
            "max_display_dim": self.max_display_dim,
            "foreground_level": self.foreground_level,
            "algo": 1,
        }


@dataclass
class SliceConfig:
    """Everything `curate slice` needs besides the dataset.

    The step reads the per-volume settings; ``workers``, ``shard`` and ``strict`` are the run's
    (read by `curation.slicing.stage.run_slice`).
    """

    workdir: Path
    pre: PreprocessConfig = field(default_factory=PreprocessConfig)
    min_foreground: float = 0.01
    workers: int = 1
    shard: tuple[int, int] | None = None
    render_all: bool = False
    render_size: int = 512
    strict: bool = False
    modality: str | None = None  # override for every volume of the run (CT, MR, ...)
    body_region: str | None = None  # override (brain, chest, abdomen, pelvis, heart, ...)
    pseudonymize: bool = False  # keyed ids only, real paths in private/ (always on for DICOM)
    max_voxels: int | None = DEFAULT_MAX_VOXELS  # refuse larger sources before reading them
    series_parts: str = "anatomical"  # DICOM: all | first | anatomical parts of a split series
