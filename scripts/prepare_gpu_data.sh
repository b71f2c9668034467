#!/usr/bin/env bash
# A subset of magnetic_tile for a GPU machine that cannot see ../shared (about 20 MB, so that it travels beside the
# .whl wheels within the 64 MiB a device run may carry): 50 evenly spaced training images and at most 50 test
# images per folder, with their masks. The copy lives OUTSIDE the repo (default /tmp/ucad_gpu_data); the repo only
# gets an ignored link .gpu_data pointing at it, so no data is ever copied into the checkout.
#
#   bash scripts/prepare_gpu_data.sh [MAGNETIC_TILE] [COPY_DIR]
# then carry ".gpu_data/magnetic_tile" (a path through the link travels as files) and run the check with
#   UCAD_MAGNETIC_TILE=.gpu_data/magnetic_tile bash scripts/gpu_check.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
source=${1:-../shared/data/magnetic_tile}
copy=${2:-/tmp/ucad_gpu_data}
[ -d "$source/train/good" ] || { echo "error: '$source' is no MVTec-layout category (train/good missing)" >&2; exit 2; }
rm -rf "$copy/magnetic_tile"
python3 - "$source" "$copy/magnetic_tile" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "scripts")
from compare_devices import link_category_subset
counts = link_category_subset(Path(sys.argv[1]), Path(sys.argv[2]), train_max=50, test_per_type=50, copy=True)
print(f"magnetic_tile subset: {counts['train']} training and {counts['test']} test images in {sys.argv[2]}")
PY
ln -sfn "$copy" .gpu_data
git check-ignore -q .gpu_data || echo "warning: .gpu_data is not ignored by git: add /.gpu_data to .gitignore"
du -shL .gpu_data/magnetic_tile
