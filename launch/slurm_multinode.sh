#!/usr/bin/env bash
# Multi-node training under SLURM: one `accelerate launch` per node, 8 GPUs each.
#   sbatch launch/slurm_multinode.sh --data-dir /data/kaggle_3m --output-dir runs/lgg_2x8
#SBATCH --job-name=brainseg
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
export BRAINSEG_NO_PROGRESS=1  # progress bars do not belong in batch logs
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
    --config_file launch/multinode_2x8.yaml \
    --num_machines $SLURM_NNODES \
    --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --machine_rank \$SLURM_NODEID \
    --main_process_ip $MAIN_IP \
    --main_process_port $MAIN_PORT \
    -m brainseg_dist.train --config configs/lgg_unet128.yaml $*"
