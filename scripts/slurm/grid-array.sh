#!/usr/bin/env bash
# A paper experiment as a Slurm job array: each array task is one shard of
# the grid's (method × seed) runs, all writing into one folder on a shared
# file system. avi reads its shard from SLURM_ARRAY_TASK_ID,
# SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT (no --shard needed), keeps
# finished runs (a resubmitted array resumes), claims each run with a lock
# file, and the last task to finish writes summary.json, the figures and
# REPORT.md. `avi report OUT` rebuilds them at any time (exit 4 while runs
# are missing, unless --partial).
#
#   sbatch --array=0-9 scripts/slurm/grid-array.sh nonlinear /shared/avi-out
#
# Adjust the resources to your cluster; one task fits its runs one after
# another with one libtorch thread each (--threads), or on the task's GPU.
#SBATCH --job-name=avi-grid
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=08:00:00
#SBATCH --output=avi-%A_%a.out
set -euo pipefail
EXPERIMENT=${1:?usage: sbatch --array=0-K scripts/slurm/grid-array.sh EXPERIMENT OUT [avi options]}
OUT=${2:?usage: sbatch --array=0-K scripts/slurm/grid-array.sh EXPERIMENT OUT [avi options]}
shift 2
# The avi binary: `just build` in the checkout (target/release/avi), on a
# path every node sees. LD_LIBRARY_PATH is not needed: the binary carries
# the run path of the libtorch it was built against (.venv of the checkout).
AVI=${AVI:-target/release/avi}
exec "$AVI" --threads "${SLURM_CPUS_PER_TASK:-1}" reproduce "$EXPERIMENT" --out "$OUT" --quiet "$@"
