#!/usr/bin/env bash
# `make demo`: every stage, end to end, on sample data built from volumes that installed
# packages ship; offline captioner, tiny CLIP and a small 3D encoder so it runs on a laptop CPU.
set -euo pipefail
WORK=${1:-demo-work}
BIN=.venv/bin
export HF_HUB_OFFLINE=1
mkdir -p "$WORK"
step() { echo; echo "== $*"; }

step "curate sample-data"
$BIN/curate sample-data --out "$WORK/data" --resolution 1
step "curate slice (3DSeg-8 layout)"
$BIN/curate slice --dataset 3dseg8 --root "$WORK/data/3dseg8" --workdir "$WORK"
step "curate slice (DICOM)"
$BIN/curate slice --dataset dicom --root "$WORK/data/dicom" --workdir "$WORK"
step "curate rank"
$BIN/curate rank --workdir "$WORK" --evaluate
# Release manifests are immutable: a rerun of the demo writes the next version.
REL=$($BIN/python -c "import sys; from curation.store.manifest import next_release_path; print(next_release_path(sys.argv[1]).relative_to(sys.argv[1]))" "$WORK")
step "curate caption (offline captioner; set OPENAI_API_KEY and --provider openai for a VLM) -> $REL"
$BIN/curate caption --workdir "$WORK" --provider offline --out "$REL"
step "curate query"
$BIN/curate query "SELECT plane, split, count(*) AS captions FROM captions GROUP BY ALL ORDER BY ALL" --workdir "$WORK"
step "train clip (tiny open_clip config, 1 epoch)"
$BIN/train clip --workdir "$WORK" --manifest "$REL" --model training/models/configs/tiny-clip.json \
  --epochs 1 --batch-size 64 --lr 5e-4 --warmup 2 --workers 0
step "train embed"
$BIN/train embed --workdir "$WORK" --manifest "$REL" --clip checkpoints/clip/final.pt
step "train pretrain (small 3D ResNet + PSAT, a few steps)"
$BIN/train pretrain --workdir "$WORK" --manifest "$REL" --encoder cnn \
  --encoder-arg 'block_inplanes=[16,32,64,128]' --img-size 64 --steps 10 --batch-size 2 \
  --warmup 2 --num-queries 16 --psat-width 64 --psat-layers 1 --workers 0 --log-every 5
step "train export"
$BIN/train export --workdir "$WORK"
# The sample data has one labelled volume, so the downstream demo is a classification (CT vs MR,
# labels from the manifest); on a labelled collection use --task seg --encoder vit|swin.
step "train finetune (cls from the export: a few steps, scored on the test subjects)"
$BIN/curate query "SELECT DISTINCT case_id, modality AS label FROM volumes WHERE status = 'ok' ORDER BY 1" \
  --workdir "$WORK" --format csv > "$WORK/finetune_labels.csv"
$BIN/train finetune --workdir "$WORK" --task cls --encoder cnn --init exports/cnn_encoder.json \
  --labels "$WORK/finetune_labels.csv" --steps 4 --batch-size 2 --lr 1e-4 --log-every 1 --name demo-cls
step "curate report"
$BIN/curate report --workdir "$WORK"
step "curate stats"
$BIN/curate stats --workdir "$WORK"

cat <<TXT

outputs under $WORK/:
  manifests/   volumes.parquet, slices.parquet, $(basename "$REL") (release: slice-caption pairs)
  volumes/     <volume_id>/volume.npy (128^3), label.npy, display.npy.zst
  cache/       png/ (rendered slices), captions.sqlite (caption cache)
  checkpoints/ clip/final.pt, pretrain/latest.pt,
               finetune/demo-cls/ (final.pt + final.json: the fine-tuned network; metrics.json: test accuracy/AUC)
  embeddings/  frozen CLIP embeddings
  exports/     encoder weights + JSON (loads into MONAI)
  reports/     index.html (open in a browser), rank_eval.json
TXT
