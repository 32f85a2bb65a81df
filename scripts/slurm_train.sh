#!/usr/bin/env bash
# Multi-node training under SLURM: one torchrun agent per node, c10d rendezvous on the first node of the job.
# Submit:  sbatch --nodes 2 scripts/slurm_train.sh --recipe open-llava-next-vicuna-7b run_dir=/shared/runs/vicuna
# Every node must see the same run_dir (checkpoint shards, exports, the resolved config) and the data; nothing else
# is shared. Adjust the #SBATCH lines to your cluster.
#SBATCH --job-name=llavakit
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun \
  --nnodes "$SLURM_JOB_NUM_NODES" \
  --nproc_per_node "${GPUS_PER_NODE:-8}" \
  --rdzv_backend c10d \
  --rdzv_endpoint "$head_node:29500" \
  --rdzv_id "$SLURM_JOB_ID" \
  -m llavakit.cli.main train "$@"
