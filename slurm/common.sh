# shellcheck shell=bash
# Shared by every slurm/*.sbatch template and by slurm/submit_pipeline.sh (sourced, never run).
#
# A template only picks its stage and calls `qwen3_launch STAGE "$@"`: everything else
# (finding the repo and its Python, the torch.distributed rendezvous, srun, forwarding
# SLURM's warning signal, requeue after a clean stop) is here, once.
#
# Environment it reads (all optional):
#   QWEN3_REPO              the repo; default: the checkout this file is in
#   QWEN3_CPU=1             hide the node's GPUs and train on CPU (gloo); an allocation
#                           without GPUs (--gpus-per-node=0) does this by itself
#   QWEN3_PYTHON            interpreter; default: the repo's .venv, or `python` in a container
#   QWEN3_CONTAINER_IMAGE   run the tasks in this image through pyxis/enroot
#   QWEN3_CONTAINER_MOUNTS  extra mounts (src:dst[,src:dst...]); the repo is always mounted
#   QWEN3_MASTER_PORT       rendezvous port; default: derived from the job id

# Exit code of recipes/train.py after a clean stop on SIGTERM/SIGUSR1 with its checkpoint
# written (recipes.train.EXIT_PREEMPTED); a config error is EXIT_CONFIG.
QWEN3_EXIT_PREEMPTED=75
QWEN3_EXIT_CONFIG=2
# The checkout this file belongs to (it is sourced from there, never copied).
QWEN3_HOME=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The one map from stage to the `python -m` module that runs it.
qwen3_stage_module() {
    case $1 in
        pretrain_s1|pretrain_s2|pretrain_s3) echo recipes.pretrain ;;
        sft_cold_start|sft_fusion) echo recipes.sft ;;
        rl_reasoning|rl_general) echo recipes.rl ;;
        distill_off_policy|distill_on_policy) echo recipes.distill ;;
        generate) echo recipes.generate ;;
        *) return 1 ;;
    esac
}

# qwen3_check_stage REPO STAGE: one `error:` line and status 2 when the stage cannot run
# from this checkout. Looks for the module's file rather than importing it, so it also
# works on a login node without the training environment.
qwen3_check_stage() {
    local repo=$1 stage=$2 module path
    if ! module=$(qwen3_stage_module "$stage"); then
        echo "error: unknown stage '$stage' (see qwen3_stage_module in slurm/common.sh)" >&2
        return "$QWEN3_EXIT_CONFIG"
    fi
    path=$repo/${module//.//}
    if [[ ! -f $path.py && ! -f $path/__init__.py ]]; then
        echo "error: stage $stage needs $module, which this checkout does not have yet" >&2
        return "$QWEN3_EXIT_CONFIG"
    fi
}

# qwen3_may_requeue JOBID: after SIGTERM, is the job still wanted? Not when it was cancelled
# (SLURM shows it COMPLETING, reason None); yes when it is still RUNNING or out of time.
qwen3_may_requeue() {
    local info
    info=$(scontrol show job -o "$1" 2>/dev/null) || return 1
    [[ $info == *" JobState=RUNNING "* || $info == *" Reason=TimeLimit "* ]]
}

# qwen3_gpus_per_node: the GPUs per node this allocation has, as SLURM gives them
# (--gpus-per-node, possibly typed as h100:8, or the GRES it bound); empty when SLURM does
# not say (a site without GPU GRES), in which case the tasks decide.
qwen3_gpus_per_node() {
    if [[ -n ${SLURM_GPUS_PER_NODE:-} ]]; then echo "${SLURM_GPUS_PER_NODE##*:}"
    elif [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then echo "$SLURM_GPUS_ON_NODE"
    fi
}

# qwen3_log_to REPO: without --output/--error, SLURM writes slurm-<id>.out into the submit
# directory, wherever that was; the job's log then goes to REPO/runs/slurm/<name>-<id>.{out,err}
# instead, and SLURM's file keeps one line saying so (and anything slurmstepd adds later,
# such as a time-limit notice).
qwen3_log_to() {
    local default=$SLURM_SUBMIT_DIR/slurm-$SLURM_JOB_ID.out out dir
    out=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -oP ' StdOut=\K\S+')
    [[ $out == "$default" ]] || return 0
    dir=$1/runs/slurm
    mkdir -p "$dir" || return 0
    echo "qwen3: log in $dir/$SLURM_JOB_NAME-$SLURM_JOB_ID.out and .err"
    exec >>"$dir/$SLURM_JOB_NAME-$SLURM_JOB_ID.out" 2>>"$dir/$SLURM_JOB_NAME-$SLURM_JOB_ID.err"
}

# Inside the batch job: run STAGE on every task of the allocation with Hydra overrides.
qwen3_launch() {
    local stage=$1 module repo
    shift
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        echo "error: submit this template with sbatch (SLURM_JOB_ID is not set)" >&2
        return "$QWEN3_EXIT_CONFIG"
    fi
    repo=$(cd "${QWEN3_REPO:-$QWEN3_HOME}" && pwd) || return "$QWEN3_EXIT_CONFIG"
    qwen3_log_to "$repo"
    qwen3_check_stage "$repo" "$stage" || return
    module=$(qwen3_stage_module "$stage")

    # One rank per GPU of the allocation; without GPUs (--gpus-per-node=0 or QWEN3_CPU=1),
    # one per task, on CPU.
    local nodes=${SLURM_JOB_NUM_NODES:-1} gpus ranks cpu=0
    local tasks=${SLURM_NTASKS_PER_NODE:-$(( ${SLURM_NTASKS:-1} / nodes ))}
    tasks=${tasks%%(*}
    gpus=$(qwen3_gpus_per_node)
    if [[ ${QWEN3_CPU:-0} == 1 || $gpus == 0 ]]; then
        cpu=1 ranks=$tasks
    elif [[ -n $gpus ]]; then
        ranks=$gpus
        if ((gpus > tasks)); then
            echo "error: the allocation has $gpus GPUs but $tasks task(s) per node; pass --ntasks-per-node=$gpus" >&2
            return "$QWEN3_EXIT_CONFIG"
        fi
    else
        ranks=$tasks
    fi

    # Every task gets the same rendezvous; RANK/LOCAL_RANK/WORLD_SIZE are set per task by
    # slurm/task.sh. The port is derived from the job id so that jobs sharing a node do
    # not collide, and a requeued job reuses it.
    export MASTER_ADDR MASTER_PORT
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    MASTER_PORT=${QWEN3_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    # Without empty entries: an empty one is the working directory, i.e. the submit directory
    # (see task.sh).
    PYTHONPATH=$(tr ':' '\n' <<< "$repo:${PYTHONPATH:-}" | grep -v '^$' | paste -sd:)
    export PYTHONPATH
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

    local srun_args=(--ntasks=$((ranks * nodes)) --ntasks-per-node="$ranks" ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK}
                     --kill-on-bad-exit=0 --wait=120)
    # Under --kill-on-bad-exit=1 the first rank to exit 75 would kill the others and the
    # step's code would no longer say "preempted"; --wait ends a step whose ranks crashed.
    if [[ -n ${QWEN3_CONTAINER_IMAGE:-} ]]; then
        srun_args+=(--container-image="$QWEN3_CONTAINER_IMAGE" --container-workdir="$PWD"
                    --container-mounts="$repo:$repo${QWEN3_CONTAINER_MOUNTS:+,$QWEN3_CONTAINER_MOUNTS}")
        export QWEN3_PYTHON=${QWEN3_PYTHON:-python}
    elif [[ -x $repo/.venv/bin/python ]]; then
        export QWEN3_PYTHON=${QWEN3_PYTHON:-$repo/.venv/bin/python}
        export PATH=$repo/.venv/bin:$PATH VIRTUAL_ENV=$repo/.venv
    else
        export QWEN3_PYTHON=${QWEN3_PYTHON:-python3}
    fi
    if ((cpu)); then
        # Even on a GPU node: torch then sees no CUDA and the recipe runs on gloo.
        export CUDA_VISIBLE_DEVICES=
    fi

    local overrides=("stage=$stage" "$@")
    if [[ $stage == generate ]]; then
        # not a training stage: its own config (hydra_conf/generate.yaml), resumable by itself
        overrides=("$@")
    elif ((${SLURM_RESTART_COUNT:-0} > 0)); then
        # A requeued job continues the stage from its `latest` checkpoint.
        overrides+=(trainer.resume=auto)
    fi
    echo "qwen3: stage $stage ($module), job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}," \
         "$((ranks * nodes)) tasks on $nodes node(s), master $MASTER_ADDR:$MASTER_PORT," \
         "$( ((cpu)) && echo CPU || echo "GPU${gpus:+ ($gpus per node)}")${QWEN3_CONTAINER_IMAGE:+, image $QWEN3_CONTAINER_IMAGE}"

    # `--signal=B:USR1@...` reaches only this shell, and bash runs traps only between
    # commands: so srun runs in the background while the shell waits, and the trap passes
    # the signal on (srun forwards it to every task).
    local step rc terminated=0
    srun "${srun_args[@]}" bash "$repo/slurm/task.sh" "$module" "${overrides[@]}" &
    step=$!
    trap 'echo "qwen3: SIGUSR1, asking the training to checkpoint and stop"; kill -USR1 $step 2>/dev/null' USR1
    # srun answers SIGTERM by killing its tasks (SIGKILL), so SIGTERM is passed on as USR1,
    # which srun forwards as it is and the training treats the same way.
    trap 'terminated=1; echo "qwen3: SIGTERM, asking the training to checkpoint and stop"; kill -USR1 $step 2>/dev/null' TERM
    while :; do
        wait "$step"
        rc=$?
        # wait also returns when a trapped signal arrives; the step is then still running.
        kill -0 "$step" 2>/dev/null || break
    done
    trap - USR1 TERM

    # SIGTERM also comes with scancel, and `scontrol requeue` would bring a cancelled job
    # back: so after SIGTERM the job is requeued only while SLURM still has it RUNNING (a
    # plain signal, e.g. a site's preemption notice) or when it hit its time limit.
    if ((rc == QWEN3_EXIT_PREEMPTED)) && { ((!terminated)) || qwen3_may_requeue "$SLURM_JOB_ID"; }; then
        echo "qwen3: training stopped after a checkpoint; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" || echo "qwen3: requeue refused; resubmit to continue from the checkpoint"
    elif ((rc == QWEN3_EXIT_PREEMPTED)); then
        echo "qwen3: training stopped after a checkpoint; the job was cancelled, so not requeueing" \
             "(a resubmitted job continues from the checkpoint)"
    fi
    return "$rc"
}
