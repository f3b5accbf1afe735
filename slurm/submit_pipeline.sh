#!/usr/bin/env bash
# Submit a whole training pipeline as a chain of SLURM jobs.
#
#   slurm/submit_pipeline.sh [--dry-run] [--from STAGE] [--to STAGE] [--after JOBID]
#                            [sbatch options as --opt=value ...] PIPELINE [hydra overrides ...]
#   (the options may also follow PIPELINE: slurm/submit_pipeline.sh qwen3_small --dry-run)
#
# Every stage is checked before the first job is submitted (config, layout at the
# allocation's ranks, data, tokenizer, init_from, teacher): a failure is one line, exit 2,
# and no job. --dry-run prints the sbatch commands and the checks' verdict.
#
# PIPELINE is a name from hydra_conf/pipeline/ (qwen3_pretrain, qwen3_flagship, qwen3_small)
# or a path to such a file (see recipes/pipeline.py, which runs the same file locally). Each
# stage is submitted with its own template (slurm/<stage>.sbatch) and the overrides the
# pipeline gives it (its init_from, teacher, per-stage settings), and depends on the previous
# job with afterok (a failed stage cancels the rest). Teacher data a stage needs first is a
# job of its own (slurm/generate.sbatch). The same Hydra overrides and sbatch options go to
# every job, so every stage shares run.root/run.name; an override written STAGE:key=value
# (or stages.STAGE.key=value) goes to that stage only (pretrain_s1:trainer.max_steps=N).
# Logs go to <run.root>/<run.name>/slurm/<stage>-<jobid>.{out,err}.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=slurm/common.sh
source "$REPO/slurm/common.sh"

usage() {  # usage CODE: the synopsis, on stdout for --help (0), else on stderr
    sed -n '3,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&$(($1 ? 2 : 1))
    exit "$1"
}
die() { echo "error: $*" >&2; exit 2; }

# Options may come before or after PIPELINE (`qwen3_small --dry-run` must not submit):
# a Hydra override never starts with a dash.
dry_run=0 from='' to='' after='' pipeline=''
sbatch_opts=() overrides=() staged=()
while (($#)); do
    case $1 in
        --dry-run) dry_run=1 ;;
        --from) from=${2:?}; shift ;;
        --from=*) from=${1#*=} ;;
        --to) to=${2:?}; shift ;;
        --to=*) to=${1#*=} ;;
        --after) after=${2:?}; shift ;;
        --after=*) after=${1#*=} ;;
        -h|--help) usage 0 ;;
        --dependency*|-d) die "the chain sets --dependency itself; use --after JOBID to wait for another job" ;;
        --*=*|-?*) sbatch_opts+=("$1") ;;
        *)
            if [[ -z $pipeline ]]; then pipeline=$1
            elif [[ $1 =~ ^[A-Za-z0-9_]+: ]]; then staged+=("$1")
            else overrides+=("$1"); fi ;;
    esac
    shift
done
[[ -n $pipeline ]] || usage 2

# The ranks every job will have, as the templates' launch counts them (slurm/common.sh):
# nodes x GPUs per node, or x tasks per node without GPUs; the templates' #SBATCH lines
# are the defaults (1 node, 8 GPUs, 8 tasks).
sbatch_value() {  # sbatch_value NAME DEFAULT: the last --NAME=VALUE among the sbatch options
    local v=$2 o
    for o in "${sbatch_opts[@]}"; do [[ $o == "--$1="* ]] && v=${o#*=}; done
    printf '%s' "$v"
}
gpus=$(sbatch_value gpus-per-node 8)
gpus=${gpus##*:}
[[ ${QWEN3_CPU:-0} == 1 ]] && gpus=0
per_node=$gpus
((gpus > 0)) || per_node=$(sbatch_value ntasks-per-node 8)
world=$(($(sbatch_value nodes 1) * per_node)) || die "cannot count the ranks from --nodes/--gpus-per-node/--ntasks-per-node"

# The chain comes from the pipeline runner itself (python -m recipes.pipeline --plan), so a
# local run and a SLURM chain read the pipeline file the same way: one line per job,
# `stage|generate <tab> NAME <tab> TEMPLATE <tab> overrides...`, every job's overrides complete.
# It then checks every stage at that many ranks (recipes.pipeline.check_plan): one error
# line and exit 2 when a stage could not run, before anything is submitted.
if [[ -x $REPO/.venv/bin/python ]]; then py=${QWEN3_PYTHON:-$REPO/.venv/bin/python}; else py=${QWEN3_PYTHON:-python3}; fi
plan_args=()
for a in "${overrides[@]}"; do plan_args+=("$a"); done
for a in "${staged[@]}"; do plan_args+=("stages.${a%%:*}.${a#*:}"); done
plan() {  # plan [--only=STAGE,...]: the runner's job lines; its checks' verdict on stderr
    (cd "$REPO" && PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONWARNINGS=ignore \
        "$py" -m recipes.pipeline "pipeline=$pipeline" --plan --world-size="$world" "$@" "${plan_args[@]}")
}
checked=0 verdict=$(mktemp)
trap 'rm -f "$verdict"' EXIT
# The whole chain is checked with its plan; a slice (--from/--to) once its stages are known.
whole=$([[ -z $from$to ]] && echo 1 || echo 0)
if ((whole)); then jobs_text=$(plan 2>"$verdict") && checked=1
else jobs_text=$(plan --only= 2>"$verdict") || true; fi
mapfile -t jobs <<< "$jobs_text"
if [[ -z ${jobs[0]:-} ]] || ((whole && !checked && !dry_run)); then
    cat "$verdict" >&2
    exit 2
fi
stages=()
for line in "${jobs[@]}"; do
    IFS=$'\t' read -r kind stage _ <<< "$line"
    [[ $kind == stage ]] && stages+=("$stage")
done

# --from / --to: a slice of the chain (e.g. to continue after a failed stage).
first=0 last=$((${#stages[@]} - 1))
for i in "${!stages[@]}"; do
    [[ ${stages[i]} == "$from" ]] && first=$i
    [[ ${stages[i]} == "$to" ]] && last=$i
done
[[ -z $from || ${stages[first]} == "$from" ]] || die "--from $from: not a stage of $pipeline (${stages[*]})"
[[ -z $to || ${stages[last]} == "$to" ]] || die "--to $to: not a stage of $pipeline (${stages[*]})"
((first <= last)) || die "--from $from comes after --to $to in $pipeline"
wanted=" ${stages[*]:first:last-first+1} "
if ((!whole)); then
    plan --only="$(IFS=,; echo "${stages[*]:first:last-first+1}")" >/dev/null 2>"$verdict" && checked=1
    ((checked || dry_run)) || { cat "$verdict" >&2; exit 2; }
fi

# Every job must be runnable from this checkout before anything is submitted.
for line in "${jobs[@]}"; do
    IFS=$'\t' read -r kind stage template _ <<< "$line"
    [[ $wanted == *" $stage "* ]] || continue
    [[ -f $REPO/slurm/$template.sbatch ]] || die "no template slurm/$template.sbatch for $kind $stage"
    if ! qwen3_check_stage "$REPO" "$template"; then
        ((dry_run)) || exit 2
    fi
done

# The run directory, as Hydra will compose it: the last run.root/run.name override, else
# the defaults (runs, and the model's name). Only for the log directory; the job itself
# resolves everything with Hydra.
last_value() {  # last_value KEY: the value of the last KEY=... override (with +/++ prefixes)
    local v='' a
    for a in "${overrides[@]}"; do
        a=${a#+}; a=${a#+}
        [[ $a == "$1="* ]] && v=${a#"$1="}
    done
    printf '%s' "$v"
}
run_root=$(last_value run.root)
run_name=$(last_value run.name)
if [[ -z $run_name ]]; then
    run_name=$(last_value model.name)
fi
if [[ -z $run_name ]]; then
    model=$(last_value model)
    model=${model:-$(sed -n 's/^ *- model: *\([A-Za-z0-9_]*\).*/\1/p' "$REPO/hydra_conf/config.yaml")}
    run_name=$(sed -n 's/^name: *\([A-Za-z0-9_.-]*\).*/\1/p' "$REPO/hydra_conf/model/$model.yaml" 2>/dev/null || true)
fi
logs=${run_root:-runs}/${run_name:+$run_name/}slurm
[[ $logs == *'${'* ]] && logs=${run_root:-runs}/slurm  # an interpolation: leave it to Hydra

export QWEN3_REPO=$REPO
((dry_run)) || mkdir -p "$logs"
ids=() dependency=${after:+afterok:$after}
for line in "${jobs[@]}"; do
    IFS=$'\t' read -r -a fields <<< "$line"
    kind=${fields[0]} stage=${fields[1]} template=${fields[2]} args=("${fields[@]:3}")
    [[ $wanted == *" $stage "* ]] || continue
    cmd=(sbatch --parsable --job-name="$([[ $kind == generate ]] && echo "generate_$stage" || echo "$stage")"
         --output="$logs/%x-%j.out" --error="$logs/%x-%j.err")
    [[ -n $dependency ]] && cmd+=(--dependency="$dependency" --kill-on-invalid-dep=yes)
    cmd+=("${sbatch_opts[@]}" "$REPO/slurm/$template.sbatch" "${args[@]}")
    name=$stage
    [[ $kind == generate ]] && name=generate_$stage
    if ((dry_run)); then
        printf '%q ' "${cmd[@]}"
        echo
        id="\$JOB_$name"
    else
        id=$("${cmd[@]}")
        id=${id%%;*}  # --parsable prints "id" or "id;cluster"
        echo "submitted $name $id"
    fi
    ids+=("$id")
    dependency=afterok:$id
done
if ((dry_run)); then
    # the plan above, then the checks' verdict; a dry run never says anything ran
    if ((!checked)); then
        cat "$verdict" >&2
        echo "dry run: the checks failed; nothing would be submitted" >&2
        exit 2
    fi
    echo "dry run: every stage's checks passed at $world ranks per job; nothing was submitted"
else
    ids_csv=$(IFS=,; echo "${ids[*]}")
    echo "watch: squeue -j $ids_csv -o '%.10i %.20j %.10T %.10M %.6D %R'"
    echo "logs:  $logs/"
fi
