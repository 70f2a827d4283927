#!/usr/bin/env bash
# One call on a fresh GPU machine, from the repository root, with a kit folder carried along (benchmarks/README.md):
#   KIT=.gpu bash benchmarks/gpu.sh [gpu_bench.py flags]      results: $OUT/results.jsonl, $OUT/table.md
# Installs the kit's wheels (what the GPU image lacks) into /tmp/site, measures the lcmkit in ./src.
set -o pipefail
KIT=${KIT:-.gpu}; export KIT
OUT=${OUT:-/tmp/gpu-bench-out}; export OUT; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls "$KIT"/whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$KIT"/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers, transformers, peft, accelerate; print('versions', torch.__version__, \
diffusers.__version__, transformers.__version__, peft.__version__, accelerate.__version__, torch.cuda.is_available())"
# BENCH_TIMEOUT (seconds): stop in time for the logs to be packed (the device tool returns only a few files)
timeout "${BENCH_TIMEOUT:-0}" python3 benchmarks/gpu_bench.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_bench.log"
rc=$?
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
exit $rc
