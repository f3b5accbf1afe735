"""slurm/submit_pipeline.sh and the templates without a cluster: every stage has a
template, the chain a dry run prints, and the whole-chain checks that stop a submission
before any job (a recording `sbatch` shows none was made). The jobs themselves run on a
real slurmctld in tests/test_slurm.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, _env

SUBMIT = REPO / "slurm" / "submit_pipeline.sh"


def test_every_stage_has_a_template_and_a_module():
    text = (REPO / "slurm" / "common.sh").read_text()
    stages = re.findall(r"^\s+([a-z0-9_|]+)\) echo recipes\.", text, re.M)
    stages = [s for group in stages for s in group.split("|")]
    assert len(stages) == 10 and "generate" in stages
    for stage in stages:
        template = (REPO / "slurm" / f"{stage}.sbatch").read_text()
        for option in ("--nodes=", "--ntasks-per-node=", "--gpus-per-node=", "--cpus-per-task=", "--time=",
                       "--signal=B:USR1@", "--requeue", "--open-mode=append"):
            assert f"#SBATCH {option}" in template, (stage, option)
        # a relative log path would be relative to wherever sbatch ran, and fail the job there
        assert "#SBATCH --output" not in template and "#SBATCH --error" not in template, stage
        assert template.rstrip().endswith(f'qwen3_launch {stage} "$@"'), stage
    for pipeline in (REPO / "hydra_conf" / "pipeline").glob("*.yaml"):
        out = subprocess.run(["bash", str(SUBMIT), "--dry-run", pipeline.stem], capture_output=True, text=True)
        listed = re.findall(r"/slurm/(\w+)\.sbatch", out.stdout)
        assert listed and set(listed) <= set(stages), (pipeline.name, out.stdout, out.stderr)


def test_dry_run_prints_the_chain():
    # options after the pipeline's name too, as `submit_pipeline.sh qwen3_small --dry-run` is written
    proc = subprocess.run(["bash", str(SUBMIT), "--nodes=4", "qwen3_small", "--dry-run", "model=qwen3_8b",
                           "run.root=/r", "distill_on_policy:trainer.max_steps=7"], capture_output=True, text=True)
    # the plan, then the checks' verdict: here no data, no teacher
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == \
        "dry run: the checks failed; nothing would be submitted", proc.stderr
    assert "error: stage pretrain_s1: indexed dataset" in proc.stderr and "done" not in proc.stdout
    out = proc.stdout.splitlines()
    jobs = ["pretrain_s1", "pretrain_s2", "pretrain_s3", "generate", "distill_off_policy", "distill_on_policy"]
    names = [*jobs[:3], "generate_distill_off_policy", *jobs[4:]]
    # where each stage's weights come from, as qwen3_small.yaml wires it
    init = {"pretrain_s2": "pretrain_s1", "pretrain_s3": "pretrain_s2", "distill_off_policy": "pretrain_s3",
            "distill_on_policy": "distill_off_policy"}
    assert [re.search(r"/slurm/(\w+)\.sbatch", line).group(1) for line in out] == jobs
    for i, line in enumerate(out):
        words = line.split()
        assert "--nodes=4" in line and "--output=/r/qwen3_8b/slurm/%x-%j.out" in line
        assert f"--job-name={names[i]}" in words
        if i == 0:
            assert "--dependency" not in line and "init_from" not in line
        else:
            assert f"--dependency=afterok:\\$JOB_{names[i - 1]}" in line
        if jobs[i] in init:
            assert f"init_from={init[jobs[i]]}" in words
        if jobs[i].startswith("distill"):
            assert "teacher=/r/qwen3_235b_a22b/rl_general" in words, line
    # the teacher data: written by the generate job, read by the off-policy stage
    assert "output=/r/qwen3_8b/teacher_data/teacher.jsonl" in out[3].split()
    assert "distill.data.files=\\[/r/qwen3_8b/teacher_data/teacher.jsonl\\]" in out[4].split()
    assert "trainer.max_steps=7" in out[-1].split() and "max_steps=7" not in "".join(out[:-1])


def recording_sbatch(tmp_path: Path) -> tuple[dict, Path]:
    """An environment whose `sbatch` only records its arguments (and prints a job id)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "sbatch_calls"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "$*" >> {calls}\necho 4711\n')
    (bin_dir / "sbatch").chmod(0o755)
    return {**_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, calls


def submit(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUBMIT), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def chain_overrides(tmp_path: Path, data: Path) -> list[str]:
    """A mini chain on the test data: S3's length buckets scaled down 64x as the data has them."""
    return ["model=mini", f"data.root={data}", f"run.root={tmp_path / 'runs'}", "trainer.seq_length=64",
            "trainer.global_batch_size=4", "eval.enabled=false", "pretrain_s3:data.length_mix.buckets=[64,128,256]"]


def test_chain_checks_find_missing_s3_data_before_any_submission(mini_pretrain_data, tmp_path):
    env, calls = recording_sbatch(tmp_path)
    node = ["--gpus-per-node=0", "--ntasks-per-node=1"]
    # with every dataset there, the checks pass (and a dry run says so, not "done")
    ok = submit(env, *node, "--dry-run", "qwen3_pretrain", *chain_overrides(tmp_path, mini_pretrain_data))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[-1] == "dry run: every stage's checks passed at 1 ranks per job; nothing was submitted"
    assert "done" not in ok.stdout and not calls.exists()
    # S3's 128-256 bucket missing: S1 and S2 could run, but nothing is submitted
    data = tmp_path / "data"
    shutil.copytree(mini_pretrain_data, data, ignore=shutil.ignore_patterns("long_len128-256.*"))
    proc = submit(env, *node, "qwen3_pretrain", *chain_overrides(tmp_path, data))
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: stage pretrain_s3: ") and "long_len128-256" in line, line
    assert not calls.exists()


def test_chain_checks_find_a_missing_teacher_before_any_submission(mini_pretrain_data, tmp_path):
    env, calls = recording_sbatch(tmp_path)
    proc = submit(env, "--gpus-per-node=0", "--ntasks-per-node=1", "qwen3_small",
                  *chain_overrides(tmp_path, mini_pretrain_data), f"teacher={tmp_path / 'no_teacher'}")
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: stage distill_off_policy: teacher=") and "no_teacher" in line, line
    assert not calls.exists()
    # the layout against the allocation: TP=2 does not fit one rank per job
    proc = submit(env, "--gpus-per-node=0", "--ntasks-per-node=1", "qwen3_pretrain",
                  *chain_overrides(tmp_path, mini_pretrain_data), "parallel.tp=2")
    assert proc.returncode == 2 and "world size 1 is not divisible by tp*pp*cp=2" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and not calls.exists()


def test_local_pipeline_checks_every_stage_before_the_first(mini_pretrain_data, tmp_path):
    """recipes.pipeline found S3's missing data only after S1 and S2 had trained."""
    data = tmp_path / "data"
    shutil.copytree(mini_pretrain_data, data, ignore=shutil.ignore_patterns("long_len*"))
    args = [a for a in chain_overrides(tmp_path, data) if not a.startswith("pretrain_s3:")]
    proc = subprocess.run([sys.executable, "-m", "recipes.pipeline", "pipeline=qwen3_pretrain", *args,
                           "stages.pretrain_s3.data.length_mix.buckets=[64,128,256]"],
                          env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: stage pretrain_s3: ") and "long_len64-128" in line, line
    assert not (tmp_path / "runs").exists()


def test_missing_recipe_is_one_clear_line(tmp_path):
    """A stage whose recipe a later issue adds fails at once, naming the module."""
    proc = subprocess.run(["bash", "-c", f'source {REPO}/slurm/common.sh; qwen3_check_stage "$1" rl_reasoning',
                           "-", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "error: stage rl_reasoning needs recipes.rl, which this checkout does not have yet\n"
