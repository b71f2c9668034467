#!/usr/bin/env bash
# Structure maps for a data set with Segment Anything (ViT-B), into DATA-sam-b.
# Usage: bash scripts/structure_maps_mvtec.sh /path/to/mvtec /path/to/sam_vit_b_01ec64.pth
set -euo pipefail
cd "$(dirname "$0")/.."
python3 segment_anything_prep/make_structure_maps.py --data_path "${1:?data folder}" \
  --sam_type vit_b --sam_checkpoint "${2:?SAM checkpoint}"
