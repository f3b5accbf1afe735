#!/usr/bin/env bash
# One training process per SLURM task (started by srun from slurm/common.sh).
# torch.distributed's env:// rendezvous variables come from SLURM's per-task ones;
# MASTER_ADDR/MASTER_PORT are exported by the batch script.
#   task.sh MODULE [hydra overrides...]
export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
exec "${QWEN3_PYTHON:-python3}" -m "$@"
