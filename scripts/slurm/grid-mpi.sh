#!/usr/bin/env bash
# A paper experiment as one Slurm job of several tasks (srun, or mpirun
# inside the allocation): each task is one shard, from SLURM_PROCID and
# SLURM_NTASKS (or OMPI_COMM_WORLD_RANK/SIZE, PMI_RANK/SIZE under mpirun).
#
#   sbatch --ntasks=8 scripts/slurm/grid-mpi.sh saw /shared/avi-out
#
#SBATCH --job-name=avi-grid
#SBATCH --ntasks=8
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
#SBATCH --output=avi-%j.out
set -euo pipefail
EXPERIMENT=${1:?usage: sbatch --ntasks=K scripts/slurm/grid-mpi.sh EXPERIMENT OUT [avi options]}
OUT=${2:?usage: sbatch --ntasks=K scripts/slurm/grid-mpi.sh EXPERIMENT OUT [avi options]}
shift 2
AVI=${AVI:-target/release/avi}
srun "$AVI" --threads "${SLURM_CPUS_PER_TASK:-1}" reproduce "$EXPERIMENT" --out "$OUT" --quiet "$@"
