#!/usr/bin/env bash
# Wheels for a GPU machine without network whose python3 has torch but not the project's other
# dependencies (this workplace's GPU image: Python 3.12, torch 2.11, numpy, pandas, pyarrow, scipy,
# scikit-learn, typer, rich, pillow, einops, timm ... are there). Run where pip reaches PyPI:
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # default <repo>/.whl
#
# then bring DIR along (ignore it in git: echo /.whl/ >> .git/info/exclude) and run
# `bash benchmarks/gpu_check.sh` there: it installs them into a temporary folder, without network.
# Versions are pinned to this repo's .venv where it has the package. Override the target with
# GPU_PY=3.12 and GPU_PLATFORMS="manylinux_2_28_x86_64 ...".
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
dest="${1:-$repo/.whl}"
mkdir -p "$dest"
if [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"; else py=python3; fi
pyver="${GPU_PY:-3.12}"
platforms="${GPU_PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64}"
plat_args=()
for p in $platforms; do plat_args+=(--platform "$p"); done
# what the gpu_check cases import (training, curation, bench_downstream and its cohorts) and the image lacks
pkgs=(monai nibabel nilearn open_clip_torch ftfy wcwidth duckdb isal pydicom pylibjpeg pylibjpeg-libjpeg
      pylibjpeg-openjpeg pyjpegls openai jiter distro sniffio pydantic pydantic-core annotated-types
      typing-inspection tenacity)
failed=()
for p in "${pkgs[@]}"; do
  v="$("$py" -c "import importlib.metadata as m; print(m.version('$p'))" 2>/dev/null)" && spec="$p==$v" || spec="$p"
  if ! "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
       "${plat_args[@]}" -d "$dest" "$spec" 2>/dev/null; then
    # no wheel of this version for that Python: the newest that has one
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
       "${plat_args[@]}" -d "$dest" "$p" 2>/dev/null || failed+=("$spec")
  fi
done
echo "$(ls "$dest"/*.whl 2>/dev/null | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest"
if [ ${#failed[@]} -gt 0 ]; then
  echo "no wheel found for: ${failed[*]}" >&2
  exit 1
fi
