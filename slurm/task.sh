#!/usr/bin/env bash
# One training process per SLURM task (started by srun from slurm/common.sh).
# torch.distributed's env:// rendezvous variables come from SLURM's per-task ones;
# MASTER_ADDR/MASTER_PORT are exported by the batch script.
#   task.sh MODULE [hydra overrides...]
export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
# The job runs in the submit directory, which may hold any *.py (a grp.py there broke torch's
# import): Python's safe-path mode keeps it off sys.path; the repo comes from PYTHONPATH.
export PYTHONSAFEPATH=1
# Third-party warnings once per job: only global rank 0 prints Python's warnings, including
# those raised while importing (model.parallel.quiet_other_ranks does the rest).
[[ ${SLURM_PROCID:-0} == 0 ]] || export PYTHONWARNINGS=ignore
exec "${QWEN3_PYTHON:-python3}" -m "$@"
