"""Limits on what a source may declare before it is read (no imports: the command line reads
their defaults)."""

DEFAULT_MAX_VOXELS = 1_000_000_000  # `--max-voxels`: ~4 GB as float32, before any copy
