#!/usr/bin/env bash
# The prepared GPU check of issue 24: at most 8 minutes on one GPU, results into a JSON and a
# Markdown table (see benchmarks/README.md, "gpu_check").
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--out FILE] [--budget-s S] [--only PARTS]
#
# Python: .venv/bin/python when the repo has one (`make venv`), else $PYTHON or python3 (a GPU
# machine's own torch). When that python lacks the project's other dependencies (MONAI, nibabel,
# open_clip, duckdb, ...), wheels in $GPU_CHECK_WHEELS or <repo>/.whl (made by
# `bash benchmarks/gpu_wheels.sh` on a machine with network) are installed into a temporary
# folder first, without network.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cd "$repo"
if [ -x .venv/bin/python ]; then
  py=.venv/bin/python
else
  py="${PYTHON:-python3}"
fi
probe='import torch, monai, nibabel, open_clip, duckdb, pydicom, pandas, pyarrow, typer, rich'
# a .venv from `make venv` has everything; another python is checked first (~5-10 s of imports)
if [ "$py" != .venv/bin/python ] && ! "$py" -c "$probe" >/dev/null 2>&1; then
  wheels="${GPU_CHECK_WHEELS:-$repo/.whl}"
  if compgen -G "$wheels/*.whl" >/dev/null; then
    site="${TMPDIR:-/tmp}/gpu_check_site"
    echo "gpu_check: installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site (no network)"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ! "$py" -c "$probe" >/dev/null 2>&1; then
    echo "gpu_check: $py cannot import the project's dependencies:" >&2
    "$py" -c "$probe" 2>&1 | tail -n 1 >&2 || true
    echo "  run \`make venv\` first (network needed), or on a machine with network run" >&2
    echo "  \`bash benchmarks/gpu_wheels.sh\` and bring .whl/ along (GPU_CHECK_WHEELS=DIR for another folder)" >&2
    exit 2
  fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" "$here/gpu_check.py" "$@"
