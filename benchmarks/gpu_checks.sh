#!/usr/bin/env bash
# Issue 17, item 6: the GPU measurements, as ONE call on a lent GPU machine (the device tool's `run`; never in CI).
#
# Once, on the development machine (deepinv and natsort are not in the GPU image; deepinv's other needs are):
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl deepinv==0.5.0 natsort==8.4.0
# Then:  run(command="bash benchmarks/gpu_checks.sh", carry=[".whl"], timeout_s=570)
#
# What it measures, in this order, each step under its own time limit so that one slow step leaves the others:
#   1. benchmarks/bench_roofline.py --ffhq: digits ADM (batch 16, 64) and FFHQ ADM GFLOP/s beside a same-run
#      float32 matmul chain                                          -> $OUT/roofline_gpu.json
#   2. benchmarks/bench_adm.py --torch-device cuda: FFHQ ADM forward and forward + VJP, JAX against deepinv on the
#      same GPU (JAX alone if deepinv does not import)               -> $OUT/adm_gpu.json
#   3. `mapreps demo` end to end (default settings, both spaces; no compilation cache, so compile time is in the
#      `seconds` it records)                                         -> $OUT/demo_metrics.json, $OUT/dp_curve.png
# plus the device (nvidia-smi) and the combined log                  -> $OUT/device.txt, $OUT/log.txt
# The package runs from the working tree (PYTHONPATH); the GPU image's jax, flax, optax, orbax and torch are used.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/mapreps_gpu_checks}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MAPREPS_JAX_COMPILE_CACHE=0
LOG="$OUT/log.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; } > "$OUT/device.txt" 2>&1
python3 -c "import jax, jaxlib; print('jax', jax.__version__, jaxlib.__version__, jax.devices())" 2>&1 | tee -a "$LOG"

step() {  # step SECONDS NAME COMMAND...: run with a time limit, log its output and exit status
  local limit=$1 name=$2; shift 2
  echo "=== $name (limit ${limit}s) ===" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s ===" | tee -a "$LOG"
}

step 170 roofline python3 benchmarks/bench_roofline.py --ffhq --out "$OUT"
step 170 bench_adm python3 benchmarks/bench_adm.py --torch-device cuda --out "$OUT"
step 180 demo python3 -m mapreps_jax.cli demo --out "$OUT/demo" --quiet
cp "$OUT/demo/metrics.json" "$OUT/demo_metrics.json" 2>/dev/null
cp "$OUT/demo/dp_curve.png" "$OUT/dp_curve.png" 2>/dev/null
rm -rf "$OUT/demo"
ls -la "$OUT" | tee -a "$LOG"
