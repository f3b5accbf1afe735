#!/usr/bin/env bash
# Submit a whole training pipeline as a chain of SLURM jobs.
#
#   slurm/submit_pipeline.sh [--dry-run] [--from STAGE] [--to STAGE] [--after JOBID]
#                            [sbatch options as --opt=value ...] PIPELINE [hydra overrides ...]
#
# PIPELINE is a name from hydra_conf/pipeline/ (qwen3_pretrain, qwen3_flagship, qwen3_small)
# or a path to such a file: an ordered `stages:` list. Each stage is submitted with its own
# template (slurm/<stage>.sbatch), depends on the previous job with afterok (a failed stage
# cancels the rest), and starts from the previous stage's final checkpoint
# (stage.init_from=<previous stage>, found in the same run directory). The same Hydra
# overrides and sbatch options go to every stage, so every stage shares run.root/run.name;
# an override written STAGE:key=value goes to that stage only (pretrain_s1:trainer.max_steps=N).
# Logs go to <run.root>/<run.name>/slurm/<stage>-<jobid>.{out,err}.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=slurm/common.sh
source "$REPO/slurm/common.sh"

usage() {
    sed -n '3,5p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
die() { echo "error: $*" >&2; exit 2; }

dry_run=0 from='' to='' after=''
sbatch_opts=()
while (($#)); do
    case $1 in
        --dry-run) dry_run=1 ;;
        --from) from=${2:?}; shift ;;
        --from=*) from=${1#*=} ;;
        --to) to=${2:?}; shift ;;
        --to=*) to=${1#*=} ;;
        --after) after=${2:?}; shift ;;
        --after=*) after=${1#*=} ;;
        -h|--help) usage ;;
        --dependency*|-d) die "the chain sets --dependency itself; use --after JOBID to wait for another job" ;;
        --*=*|-?*) sbatch_opts+=("$1") ;;
        *) break ;;
    esac
    shift
done
(($#)) || usage
pipeline=$1
shift
overrides=() staged=()
for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_]+: ]]; then staged+=("$a"); else overrides+=("$a"); fi
done

if [[ -f $pipeline ]]; then
    file=$pipeline
else
    file=$REPO/hydra_conf/pipeline/$pipeline.yaml
    [[ -f $file ]] || die "no pipeline '$pipeline' (have: $(cd "$REPO/hydra_conf/pipeline" && ls ./*.yaml | sed 's|^\./||; s|\.yaml$||' | xargs))"
fi

# The top-level `stages:` list, block (`- name` lines) or flow (`[a, b]`) style.
mapfile -t stages < <(awk '
    /^stages:[[:space:]]*\[/ { sub(/^stages:[[:space:]]*\[/, ""); sub(/\].*$/, ""); gsub(/[[:space:]]/, "")
                               n = split($0, s, ","); for (i = 1; i <= n; i++) if (s[i] != "") print s[i]; exit }
    /^stages:[[:space:]]*(#.*)?$/ { inlist = 1; next }
    inlist && /^[[:space:]]*(#.*)?$/ { next }
    inlist && /^[[:space:]]+-/ { sub(/^[[:space:]]+-[[:space:]]*/, ""); sub(/[[:space:]]*(#.*)?$/, ""); print; next }
    inlist { exit }' "$file")
((${#stages[@]})) || die "$file has no 'stages:' list"

# --from / --to: a slice of the chain (e.g. to continue after a failed stage).
first=0 last=$((${#stages[@]} - 1))
for i in "${!stages[@]}"; do
    [[ ${stages[i]} == "$from" ]] && first=$i
    [[ ${stages[i]} == "$to" ]] && last=$i
done
[[ -z $from || ${stages[first]} == "$from" ]] || die "--from $from: not a stage of $pipeline (${stages[*]})"
[[ -z $to || ${stages[last]} == "$to" ]] || die "--to $to: not a stage of $pipeline (${stages[*]})"
((first <= last)) || die "--from $from comes after --to $to in $pipeline"
stages=("${stages[@]:first:last-first+1}")
for a in "${staged[@]}"; do
    [[ " ${stages[*]} " == *" ${a%%:*} "* ]] || die "$a: ${a%%:*} is not a stage of this chain (${stages[*]})"
done

# Every stage must be runnable from this checkout before anything is submitted.
for stage in "${stages[@]}"; do
    [[ $stage =~ ^[A-Za-z0-9_]+$ ]] || die "$file: stage '$stage' is not a plain name"
    [[ -f $REPO/slurm/$stage.sbatch ]] || die "no template slurm/$stage.sbatch for stage $stage"
    if ! qwen3_check_stage "$REPO" "$stage"; then
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
ids=() previous='' dependency=${after:+afterok:$after}
for stage in "${stages[@]}"; do
    cmd=(sbatch --parsable --output="$logs/%x-%j.out" --error="$logs/%x-%j.err")
    [[ -n $dependency ]] && cmd+=(--dependency="$dependency" --kill-on-invalid-dep=yes)
    cmd+=("${sbatch_opts[@]}" "$REPO/slurm/$stage.sbatch" "${overrides[@]}")
    [[ -n $previous ]] && cmd+=("stage.init_from=$previous")
    for a in "${staged[@]}"; do
        [[ ${a%%:*} == "$stage" ]] && cmd+=("${a#*:}")
    done
    if ((dry_run)); then
        printf '%q ' "${cmd[@]}"
        echo
        id="\$JOB_$stage"
    else
        id=$("${cmd[@]}")
        id=${id%%;*}  # --parsable prints "id" or "id;cluster"
        echo "submitted $stage $id"
    fi
    ids+=("$id")
    previous=$stage
    dependency=afterok:$id
done
if ((!dry_run)); then
    ids_csv=$(IFS=,; echo "${ids[*]}")
    echo "watch: squeue -j $ids_csv -o '%.10i %.20j %.10T %.10M %.6D %R'"
    echo "logs:  $logs/"
fi
