#!/usr/bin/env bash
# The GPU tier in one go, for a machine with a CUDA device (under 8 minutes on one GPU):
#   1. the tests marked gpu (sampler on CUDA = CPU bit for bit, loss on bf16 against
#      float64, `slkd train` on the Transformer Engine spec in bf16, a SmolLM2 cache
#      build on CUDA);
#   2. the figures, as JSON lines appended to benchmarks/results/: the loss against
#      megatron-core's cross-entropy and the sampler (gpu.jsonl), and the SmolLM2 build's
#      tokens per second with the sampling/writing share of the teacher's time
#      (teacher_overhead.jsonl).
#
#   bash benchmarks/gpu_check.sh            # PYTHON=... to use another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device here; nothing GPU-specific is checked or measured")
print(f"gpu_check.sh: {torch.cuda.get_device_name()}, torch {torch.__version__}")
PY
start=$(date +%s)
"$PYTHON" -m pytest -q -m gpu -rs tests/gpu
"$PYTHON" benchmarks/gpu.py
"$PYTHON" benchmarks/teacher_overhead.py --device cuda --dtype bfloat16 --documents 64
echo "gpu_check.sh: done in $(( $(date +%s) - start )) s"
