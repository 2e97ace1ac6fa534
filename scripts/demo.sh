#!/usr/bin/env bash
# `make demo`: every stage that exists, end to end, on sample data from installed packages.
set -euo pipefail
WORK=${1:-demo-work}
BIN=.venv/bin
mkdir -p "$WORK"
echo "== curate sample-data"
$BIN/curate sample-data --out "$WORK/data" --resolution 1
echo "== curate slice (3DSeg-8 layout)"
$BIN/curate slice --dataset 3dseg8 --root "$WORK/data/3dseg8" --workdir "$WORK"
echo "== curate slice (DICOM)"
$BIN/curate slice --dataset dicom --root "$WORK/data/dicom" --workdir "$WORK"
echo "== curate query"
$BIN/curate query "SELECT v.subset, v.modality, s.plane, count(*) AS slices FROM slices s JOIN volumes v USING (volume_id) GROUP BY ALL ORDER BY ALL" --workdir "$WORK"
echo "== curate stats"
$BIN/curate stats --workdir "$WORK"
echo "== curate report"
$BIN/curate report --workdir "$WORK"
echo
echo "outputs:"
echo "  manifests: $WORK/manifests (volumes.parquet, slices.parquet)"
echo "  volumes:   $WORK/volumes/<volume_id>/ (volume.npy, label.npy, display.npy.zst)"
echo "  report:    $WORK/reports/index.html"
