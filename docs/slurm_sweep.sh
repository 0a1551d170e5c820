#!/bin/bash
# Figure 8 (the p_L sweep) as a SLURM array job: 4 tasks, one GPU each, each training its share of
# the grid (every 4th run from its task id; python -m sd_jax.sweep --shard). Submit from the
# repository's root with `sbatch docs/slurm_sweep.sh`; runs/ must be on storage every node sees.
# Preemption and time limits: SLURM sends SIGTERM 120 s before the end (--signal, to this script,
# which `exec` makes the sweep itself); the sweep passes it to its run, which checkpoints and exits
# 143, and --requeue starts the task again, which resumes. Rerunning the array skips finished runs.
#SBATCH --job-name=sd_jax_figure8
#SBATCH --array=0-3
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#SBATCH --output=runs/figure8/slurm-%A_%a.out
set -euo pipefail
exec python -m sd_jax.sweep --config configs/cifar10_resnet110_sd.py --root runs/figure8 \
    --p-last 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0 --modes linear,uniform \
    --shard "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}"
