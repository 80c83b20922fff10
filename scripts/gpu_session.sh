#!/usr/bin/env bash
# One lent GPU session (PyTorch with CUDA, no network): AOTInductor fp16 latency on sd21 at 512 px.
# Carry an ignored .whl/ folder with the wheels the image lacks (diffusers, importlib_metadata);
# results go to $OUT (the device tool's folder; /tmp/gpu-session elsewhere). See docs/gpu.md.
set -u
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site:$PWD:$PWD/runtime
else
    export PYTHONPATH=$PWD:$PWD/runtime
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/env.txt"
ulimit -s unlimited
MEASURE="python3 -X faulthandler scripts/gpu_measure.py --work-dir /tmp/aoti --max-concurrency 1"

echo "== 1. tiny-sd21, fp16, 64 px: do fp16 packages load at all?"
timeout 120 $MEASURE --model tiny-sd21 --size 64 --steps 6 --cache-steps 2,3 --repeats 1 \
    --json "$OUT/tiny.json" > "$OUT/tiny.log" 2>&1
echo "tiny rc=$?"; grep -v '^Extension' "$OUT/tiny.log" | tail -14 | cut -c1-240

echo "== 2. sd21, fp16, 512 px: compile once, then load and measure in a fresh process"
timeout 280 $MEASURE --compile-only --json "$OUT/gpu-measure.json" > "$OUT/compile.log" 2>&1
echo "compile rc=$?"; tail -4 "$OUT/compile.log" | cut -c1-240
timeout 150 $MEASURE --repeats 5 --json "$OUT/gpu-measure.json" > "$OUT/measure.log" 2>&1
echo "measure rc=$?"; grep -v '^Extension' "$OUT/measure.log" | tail -20 | cut -c1-240
