#!/usr/bin/env bash
# The test command (README "Tests"): the fast suite, then the slow end-to-end tests.
# GPU tests skip cleanly without CUDA/TensorRT.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -q -m "not slow" "$@"
python -m pytest -q -m "slow" "$@"
