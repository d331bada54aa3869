#!/usr/bin/env bash
# Submit the cache build (a job array) and the merge/verify job that waits for it.
#
#   DATA_PREFIX=data/corpus OUTPUT=cache/ ARRAY=0-7 bash slurm/submit_cache.sh
#
# Prints the two job ids. Variables as in build_cache.sbatch and merge_cache.sbatch;
# ARRAY is the array range (default 0-1), MERGE_TASKS the MPI ranks of the verify (default 2),
# LOG_DIR where the job logs go (default: the current directory).
set -euo pipefail
: "${DATA_PREFIX:?set DATA_PREFIX}" "${OUTPUT:?set OUTPUT}"
here=$(cd "$(dirname "$0")" && pwd)
logs=${LOG_DIR:-.}
build=$(sbatch --parsable --array="${ARRAY:-0-1}" --export=ALL \
    --output="$logs/slkd-build-%A_%a.log" "$here/build_cache.sbatch")
merge=$(sbatch --parsable --dependency="afterok:$build" --ntasks="${MERGE_TASKS:-2}" \
    --export=ALL --output="$logs/slkd-merge-%j.log" "$here/merge_cache.sbatch")
echo "build job $build, merge job $merge"
