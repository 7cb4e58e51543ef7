#!/usr/bin/env bash
# The GPU check: on a Linux box with an NVIDIA GPU whose Python already has numpy, CuPy, torch,
# OpenCV and click (maybe not every other dependency of ours) and no network. It downloads
# nothing. It runs, in under 8 minutes in all:
#   1. the GPU tests (tests/gpu: CuPy parity on every fixture, the rolling pool on the device,
#      FP32 pinning; the TensorRT tests say "skipped: not installed" where TensorRT is absent),
#   2. bench_msm.py --device cuda: ViT-B/16 at 224 (N = 100) and the paper's configuration
#      (ViT-L/14-336 at 518: 37x37 grid, C = 1024, N = 200), exact and fast, against the authors'
#      MSM (their torch code) on the same GPU,
#   3. bench_stream.py --device cuda: per-image latency at W = 64, 128, 256 for both grids,
#   4. bench_precision.py: fast against exact on MTD (image and pixel AUROC, max map difference),
# and writes one JSON with every figure plus the GPU, driver, CUDA, CuPy and torch versions:
#   bash scripts/gpu_check.sh [OUTDIR]      (default: gpu_check_out/; $OUT when set)
# Inputs, each optional: MUSC_EDGE_WHEELS (a folder of wheels for what the Python lacks, e.g.
# array-api-compat, installed with --no-index into a temporary folder), MUSC_EDGE_SHARED (the
# fixtures and MTD data, default ../shared), MUSC_EDGE_GPU_MODEL (an exported EfficientNet-Lite0
# .onnx for step 4), GPU_CHECK_STEPS (a comma list of tests,msm,stream,precision,radius; default all).
# A step that fails or is skipped is recorded as such; the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUTDIR=${1:-${OUT:-$ROOT/gpu_check_out}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export MUSC_EDGE_SHARED=${MUSC_EDGE_SHARED:-$ROOT/../shared}
WHEELS=${MUSC_EDGE_WHEELS:-$ROOT/.gpu/whl}
MODEL=${MUSC_EDGE_GPU_MODEL:-$ROOT/.gpu/models/efficientnet_lite0.onnx}
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
START=$(date +%s)

STEPS=",${GPU_CHECK_STEPS:-tests,msm,stream,precision,radius},"
wanted() { [[ $STEPS == *",$1,"* ]]; }

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUTDIR/NAME.log, record rc and time
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s)
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
    local rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" >>"$OUTDIR/steps.jsonl"
    tail -n 3 "$OUTDIR/$name.log"
    return 0
}

# --- the project, importable without installing anything from the network -------------------
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE/deps" "$WHEELS"/*.whl \
        >"$OUTDIR/wheels.log" 2>&1 || echo "wheels from $WHEELS did not install (see wheels.log)"
fi
# the tree as the one namespace pyproject.toml maps (musc_edge.runtime -> runtime/, ...)
mkdir -p "$SITE/tree/musc_edge"
for entry in musc_edge/*; do ln -s "$ROOT/$entry" "$SITE/tree/musc_edge/"; done
for sub in runtime export calibration; do ln -s "$ROOT/$sub" "$SITE/tree/musc_edge/$sub"; done
export PYTHONPATH="$SITE/tree:$SITE/deps${PYTHONPATH:+:$PYTHONPATH}"
$PY - >"$OUTDIR/environment.json" 2>"$OUTDIR/environment.err" <<'PYEOF'
import json, platform, subprocess, sys
env = {"python": sys.version.split()[0], "platform": platform.platform()}
def version(mod):
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "present")
    except Exception as e:  # noqa: BLE001
        return f"skipped: not installed ({type(e).__name__})"
for mod in ("numpy", "cupy", "torch", "cv2", "click", "array_api_compat", "array_api_strict", "onnxruntime",
            "tensorrt", "watchdog", "pytest"):
    env[mod] = version(mod)
try:
    import cupy
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    env["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    env["gpu_memory_gib"] = round(props["totalGlobalMem"] / 2**30, 1)
    env["compute_capability"] = dev.compute_capability
    env["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    env["cuda_driver_api"] = cupy.cuda.runtime.driverGetVersion()
except Exception as e:  # noqa: BLE001
    env["gpu"] = f"error: {type(e).__name__}: {e}"
try:
    import torch
    env["torch_cuda"] = torch.version.cuda
except Exception:  # noqa: BLE001
    pass
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    env["nvidia_smi"] = smi.stdout.strip()
except Exception as e:  # noqa: BLE001
    env["nvidia_smi"] = f"error: {e}"
import musc_edge  # the tree is importable
env["musc_edge"] = musc_edge.__version__
print(json.dumps(env, indent=1))
PYEOF
cat "$OUTDIR/environment.json" 2>/dev/null || cat "$OUTDIR/environment.err"

# --- 1. the GPU tests -------------------------------------------------------------------------
wanted tests && step gpu_tests 240 $PY -m pytest -q -p no:cacheprovider -m gpu tests/gpu -rs --junitxml="$OUTDIR/gpu_tests.xml"

# --- 2. MSM against the authors' code ---------------------------------------------------------
wanted msm && step msm_vitb16 150 $PY benchmarks/bench_msm.py --device cuda --config vitb16 --n 100 --precision exact,fast \
    --baseline authors
wanted msm && step msm_paper 330 $PY benchmarks/bench_msm.py --device cuda --config paper --n 200 --precision exact,fast \
    --baseline authors

# --- 3. streaming on the device ---------------------------------------------------------------
wanted stream && step stream_vitb16 120 $PY benchmarks/bench_stream.py --device cuda --windows 64,128,256 --steps 5 --full-max-w 128
wanted stream && step stream_paper 150 $PY benchmarks/bench_stream.py --device cuda --windows 64,128,256 --grid 37 --dim 1024 \
    --steps 3 --full-max-w 0
wanted stream && step stream_paper_fast 120 $PY benchmarks/bench_stream.py --device cuda --precision fast --windows 64,128,256 \
    --grid 37 --dim 1024 --steps 3 --full-max-w 0

# --- 4. fast against exact on MTD -------------------------------------------------------------
if ! wanted precision; then :
elif [ -f "$MODEL" ]; then
    step precision_mtd 240 $PY benchmarks/bench_precision.py --model "$MODEL" \
        --data "$MUSC_EDGE_SHARED/data/mtd/magnetic_tile" --devices cuda
else
    echo "{\"step\": \"precision_mtd\", \"rc\": null, \"skipped\": \"no model at $MODEL (MUSC_EDGE_GPU_MODEL)\"}" \
        >>"$OUTDIR/steps.jsonl"
fi

# --- 5. positional matching against the global search (--match-radius) ---------------------------
wanted radius && step match_radius 90 $PY benchmarks/bench_match_radius.py --device cuda --n 200 --grid 28 --C 112 \
    --radii 0,1,3,5 --repeats 3

# --- one JSON ---------------------------------------------------------------------------------
$PY scripts/gpu_report.py "$OUTDIR" $(( $(date +%s) - START )) >"$OUTDIR/gpu_check.json"
echo "wrote $OUTDIR/gpu_check.json ($(( $(date +%s) - START )) s)"
$PY -c "import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps(d.get('summary', d), indent=1))" \
    "$OUTDIR/gpu_check.json"
