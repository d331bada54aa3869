#!/usr/bin/env bash
# Submit the cache build (a job array), the merge/verify job that waits for it and,
# with RUN_DIR set, the student pretraining that waits for the merge.
#
#   DATA_PREFIX=data/corpus OUTPUT=cache/ ARRAY=0-7 bash slurm/submit_cache.sh
#   DATA_PREFIX=data/corpus OUTPUT=cache/ RUN_DIR=runs/rskd TRAIN_TASKS=8 bash slurm/submit_cache.sh
#
# Prints the job ids. Variables as in build_cache.sbatch, merge_cache.sbatch and
# pretrain_student.sbatch; ARRAY is the array range (default 0-1), MERGE_TASKS the MPI
# ranks of the verify (default 2), TRAIN_TASKS the training tasks (default 1; srun-native
# ranks on one node), LOG_DIR where the job logs go (default: the current directory).
# BUILD_SBATCH_ARGS, MERGE_SBATCH_ARGS and TRAIN_SBATCH_ARGS add sbatch flags to each job,
# e.g. TRAIN_SBATCH_ARGS="--time=24:00:00 --partition=gpu --signal=B:USR1@600".
set -euo pipefail
: "${DATA_PREFIX:?set DATA_PREFIX}" "${OUTPUT:?set OUTPUT}"
here=$(cd "$(dirname "$0")" && pwd)
logs=${LOG_DIR:-.}
# shellcheck disable=SC2086  # *_SBATCH_ARGS are lists of flags
build=$(sbatch --parsable --array="${ARRAY:-0-1}" --export=ALL ${BUILD_SBATCH_ARGS:-} \
    --output="$logs/slkd-build-%A_%a.log" "$here/build_cache.sbatch")
# shellcheck disable=SC2086
merge=$(sbatch --parsable --dependency="afterok:$build" --ntasks="${MERGE_TASKS:-2}" \
    --export=ALL ${MERGE_SBATCH_ARGS:-} --output="$logs/slkd-merge-%j.log" \
    "$here/merge_cache.sbatch")
if [ -z "${RUN_DIR:-}" ]; then
    echo "build job $build, merge job $merge"
    exit 0
fi
# shellcheck disable=SC2086
train=$(CACHE=${CACHE:-$OUTPUT} sbatch --parsable --dependency="afterok:$merge" \
    --ntasks="${TRAIN_TASKS:-1}" --ntasks-per-node="${TRAIN_TASKS:-1}" --export=ALL \
    ${TRAIN_SBATCH_ARGS:-} \
    --output="$logs/slkd-train-%j.log" "$here/pretrain_student.sbatch")
echo "build job $build, merge job $merge, train job $train"
