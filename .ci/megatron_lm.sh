#!/usr/bin/env bash
# Prepare the Megatron-LM source tree that matches a venv's megatron-core, for the tests
# that run inside Megatron-LM (tests/training/test_megatron_lm_entry.py,
# tests/system/test_megatron_lm_tools.py, the Megatron-LM teacher and object-storage
# variants). Prints the two variables those tests read, for `eval`:
#
#     eval "$(bash .ci/megatron_lm.sh .venv/bin/python /tmp/megatron-lm)"
#
# The archive is ../shared/megatron-lm/core_r0.<MINOR>.0.tar.gz from the project's root
# (core_r0.16.0 for megatron-core 0.16.x, core_r0.19.0 for 0.19.x). The tree's own
# `megatron.core` comes first on the tests' path, so its dataset helpers are compiled
# here (pybind11, the venv's Python); the packages some of its modules import and the
# project does not install (six, pydantic, triton) go into DEST/extra, seen only by the
# processes that run inside the tree.
set -euo pipefail
usage="usage: $0 VENV_PYTHON DEST"
py=${1:?$usage}
dest=${2:?$usage}
root="$(cd "$(dirname "$0")/.." && pwd)"
shared="${SLKD_MEGATRON_LM_ARCHIVES:-$root/../shared/megatron-lm}"

minor=$("$py" -c 'from importlib.metadata import version; print(version("megatron-core").split(".")[1])')
archive="$shared/core_r0.$minor.0.tar.gz"
[ -f "$archive" ] || { echo "$0: no $archive for megatron-core 0.$minor (set SLKD_MEGATRON_LM_ARCHIVES to the folder that holds it)" >&2; exit 1; }
tree="$dest/megatron-lm-core_r0.$minor.0"

if [ ! -f "$tree/.slkd-ready" ]; then
    rm -rf "$tree" "$dest/extra"
    mkdir -p "$dest"
    tar -xzf "$archive" -C "$dest"
    [ -d "$tree/megatron" ] || { echo "$0: $archive holds no megatron-lm-core_r0.$minor.0/megatron" >&2; exit 1; }
    "$py" -m pip install -q pybind11
    # The Makefile asks python3/python3-config, which need not be the venv's: give it the
    # venv's include flags and extension suffix instead.
    make -s -C "$tree/megatron/core/datasets" \
        CPPFLAGS="$("$py" -m pybind11 --includes)" \
        LIBEXT="$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" >&2
    # Only what the venv lacks (CUDA torch brings triton; pydantic may come with an extra).
    need=$("$py" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("six", "pydantic", "triton") if importlib.util.find_spec(m) is None))
EOF
)
    if [ -n "$need" ]; then
        "$py" -m pip install -q --target "$dest/extra" $need >&2
    fi
    mkdir -p "$dest/extra"
    touch "$tree/.slkd-ready"
fi
echo "export MEGATRON_LM_DIR='$tree'"
echo "export MEGATRON_LM_EXTRA_PATH='$dest/extra'"
