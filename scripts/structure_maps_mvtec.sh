#!/usr/bin/env bash
# Structure maps for a data set with Segment Anything (ViT-B), into DATA-sam-b.
#
# Usage: bash scripts/structure_maps_mvtec.sh DATA_PATH SAM_CHECKPOINT [OPTIONS of make_structure_maps.py...]
#   Paths are relative to the folder you run the script from (the script does not cd anywhere); further options
#   (e.g. --device cuda:1, --include_test, -d bottle) are passed on. PYTHON chooses the interpreter.
set -euo pipefail
repository=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
data=${1:?usage: structure_maps_mvtec.sh DATA_PATH SAM_CHECKPOINT [OPTIONS...]}
checkpoint=${2:?usage: structure_maps_mvtec.sh DATA_PATH SAM_CHECKPOINT [OPTIONS...]}
shift 2
"${PYTHON:-python3}" "$repository/segment_anything_prep/make_structure_maps.py" --data_path "$data" \
  --sam_type vit_b --sam_checkpoint "$checkpoint" "$@"
