"""SLURM launch, on a real one-node cluster that the session starts on this machine.

tests/slurm/local_cluster.sh installs and starts slurmctld, slurmd and munge; the jobs go
through the real templates (slurm/*.sbatch) and slurm/submit_pipeline.sh on the CPU smoke
path: QWEN3_CPU=1 (gloo) and sbatch options that fit the node (2 tasks, no GPUs). Every job
trains at TP=2, so it only completes if srun's two tasks found each other: the `mini` model
on the mini tokenizer's data, except the slow time-limit test, whose stage must outlast the
job's time limit and trains `tiny` at the full vocabulary.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator

import pytest

from recipes.run_log import METRICS_FILE, read_metrics
from recipes.checkpointing import complete_checkpoints
from tests.conftest import REPO, _env, pretrain_command, read_json

CLUSTER = REPO / "tests" / "slurm" / "local_cluster.sh"
SUBMIT = REPO / "slurm" / "submit_pipeline.sh"
# What the node has, in place of the templates' 8-GPU defaults.
CPU_NODE = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=20"]
# Enough steps that the preemption test's signal, sent once step 2 is logged, lands well
# before the last one (a `mini` step takes a fraction of a second).
STEPS = 30
TRAIN = ["parallel.tp=2", f"trainer.max_steps={STEPS}", "trainer.save_interval=100"]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE"}


def overrides(run_root: Path, data_root: Path, *extra, model: str = "mini") -> list[str]:
    """The small CPU training overrides the other pretraining tests use, for a template."""
    cmd = pretrain_command(run_root, data_root, f"model={model}", *TRAIN, *extra)
    return cmd[cmd.index("recipes.pretrain") + 1:]


class Cluster:
    def __init__(self, env: dict):
        self.env = env

    def run(self, *cmd, check=True, timeout=120) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(map(str, cmd)), cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, *args) -> str:
        return self.run("sbatch", "--parsable", *args).stdout.strip().split(";")[0]

    def pipeline(self, *args) -> dict[str, str]:
        """submit_pipeline.sh; {stage: job id} from its `submitted STAGE ID` lines."""
        out = self.run("bash", SUBMIT, *args).stdout
        return dict(re.findall(r"^submitted (\S+) (\d+)$", out, re.M))

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` fields (polling it is faster than `sbatch --wait`)."""
        proc = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}

    def wait(self, job_id: str, until=lambda j: j.get("JobState") in ENDED, logs: Path | None = None,
             timeout: float = 400) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.5)
        tails = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.glob("*"))) if logs else ""
        raise AssertionError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s{tails}")

    def release_requeued(self, job_id: str, logs: Path, restarts: int = 1) -> None:
        """Wait for the job's requeue number `restarts`, then start it in a few seconds instead of after
        SLURM's ~120 s hold. Not at once: slurmd refuses a job whose credential was revoked
        (by the requeue) within the same second ("Job credential revoked")."""
        job = self.wait(job_id, logs=logs, until=lambda j: j.get("JobState") in ENDED or (
            j.get("Restarts") == str(restarts) and j.get("JobState") in ("PENDING", "RUNNING")))
        if job["JobState"] == "PENDING":
            self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+3")


@pytest.fixture(scope="session")
def slurm() -> Iterator[Cluster]:
    """The local cluster: started (or reused) for the session, stopped at its end."""
    proc = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=900)
    if proc.returncode:
        pytest.fail(f"local SLURM did not start:\n{proc.stdout}{proc.stderr}", pytrace=False)
    conf = re.search(r"SLURM_CONF=(\S+)", proc.stdout).group(1)
    cluster = Cluster({**_env(), "SLURM_CONF": conf, "QWEN3_CPU": "1"})
    # A reused cluster may still hold jobs of an interrupted session; they would hold the node.
    leftover = cluster.run("squeue", "-h", "-o", "%i").stdout.split()
    if leftover:
        cluster.run("scancel", *leftover)
    try:
        yield cluster
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=120)


def log_text(logs: Path, stage: str, job_id: str) -> str:
    return "".join((logs / f"{stage}-{job_id}.{ext}").read_text() for ext in ("out", "err")
                   if (logs / f"{stage}-{job_id}.{ext}").exists())


def losses(stage_dir: Path) -> dict[int, float]:
    return {step: m["loss"] for step, m in read_metrics(stage_dir).items()}


@pytest.fixture(scope="session")
def plain_run(slurm, mini_pretrain_data, tmp_path_factory) -> tuple[Path, dict, str]:
    """`sbatch slurm/pretrain_s1.sbatch <overrides>`, uninterrupted: (stage directory, job, log)."""
    root = tmp_path_factory.mktemp("slurm_plain")
    logs = root / "logs"
    logs.mkdir()
    job_id = slurm.sbatch(*CPU_NODE, f"--output={logs}/%x-%j.out", f"--error={logs}/%x-%j.err",
                          "slurm/pretrain_s1.sbatch", *overrides(root, mini_pretrain_data))
    job = slurm.wait(job_id, logs=logs)
    text = log_text(logs, "pretrain_s1", job_id)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), text[-4000:]
    return root / "mini" / "pretrain_s1", job, text


def test_sbatch_template_trains_on_two_tasks(plain_run):
    stage, job, text = plain_run
    assert job["NumTasks"] == "2" and job["NumNodes"] == "1"
    assert "qwen3: stage pretrain_s1 (recipes.pretrain)" in text and "2 tasks on 1 node(s)" in text, text[-3000:]
    assert sorted(read_metrics(stage)) == list(range(1, STEPS + 1))
    assert read_json(stage / "final.json")["step"] == STEPS
    # A TP=2 checkpoint, written by both ranks (one shard file per rank at least).
    (last,) = complete_checkpoints(stage)
    assert last.name == f"iter_{STEPS:07d}"
    assert len(list(last.glob("__1_*.distcp"))) >= 1 and len(list(last.glob("__0_*.distcp"))) >= 1
    assert "tp: 2" in (stage / "config.yaml").read_text()


def test_sbatch_from_any_directory_with_generic_flags(slurm, mini_pretrain_data, tmp_path):
    """The user's own command: from a directory outside the repo, the template by its path,
    only generic SLURM flags for a node without GPUs (no QWEN3_CPU), `model=tiny`. It trains,
    writes its checkpoint, and logs to the repo's runs/slurm/, leaving a pointer in SLURM's
    default file in the submit directory."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "grp.py").write_text("raise SystemExit('the submit directory is on sys.path')\n")
    env = {k: v for k, v in slurm.env.items() if k != "QWEN3_CPU"}
    args = overrides(tmp_path / "runs", mini_pretrain_data, "parallel.tp=1", "trainer.max_steps=3", model="tiny")
    proc = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=2",
                           str(REPO / "slurm" / "pretrain_s1.sbatch"), *args], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    logs = REPO / "runs" / "slurm"
    try:
        job = slurm.wait(job_id, logs=elsewhere)
        text = log_text(logs, "pretrain_s1", job_id)
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), text[-4000:]
        assert "1 tasks on 1 node(s)" in text and ", CPU" in text, text[-3000:]
        stage = tmp_path / "runs" / "tiny" / "pretrain_s1"
        (last,) = complete_checkpoints(stage)
        assert last.name == "iter_0000003" and read_json(stage / "final.json")["step"] == 3
        assert (elsewhere / f"slurm-{job_id}.out").read_text().startswith(
            f"qwen3: log in {logs}/pretrain_s1-{job_id}.out and .err")
    finally:
        for ext in ("out", "err"):
            (logs / f"pretrain_s1-{job_id}.{ext}").unlink(missing_ok=True)


# ~2 min of CPU; the default suite keeps the template, the afterok chain (through the
# bad-override test) and test_resume's SIGKILL exact resume.
@pytest.mark.slow
def test_chain_with_preemption_and_requeue(slurm, mini_pretrain_data, plain_run, tmp_path):
    """S1 -> S2 through submit_pipeline.sh. S1 gets the time-limit warning mid-run (USR1 to
    the batch shell, as `--signal=B:USR1@...` sends it): it checkpoints, requeues itself and
    resumes, ending with the uninterrupted run's losses; S2 waits for it (afterok) and
    starts from its final checkpoint."""
    reference, _, _ = plain_run
    logs = tmp_path / "mini" / "slurm"
    ids = slurm.pipeline("--to", "pretrain_s2", *CPU_NODE, "qwen3_pretrain", *overrides(tmp_path, mini_pretrain_data),
                         "pretrain_s2:trainer.max_steps=3")
    s1, s2 = ids["pretrain_s1"], ids["pretrain_s2"]
    assert slurm.job(s2)["Dependency"] == f"afterok:{s1}(unfulfilled)"

    stage = tmp_path / "mini" / "pretrain_s1"
    deadline = time.time() + 300
    while 2 not in read_metrics(stage) and time.time() < deadline and slurm.job(s1).get("JobState") != "FAILED":
        time.sleep(0.2)
    assert 2 in read_metrics(stage), log_text(logs, "pretrain_s1", s1)[-4000:]
    slurm.run("scancel", "--signal=USR1", "--batch", s1)
    slurm.release_requeued(s1, logs)
    first = slurm.wait(s1, logs=logs)
    text = log_text(logs, "pretrain_s1", s1)
    assert (first["JobState"], first["ExitCode"], first["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-4000:]
    assert "qwen3: SIGUSR1" in text and f"requeueing job {s1}" in text and "restart 1" in text

    records = [json.loads(line) for line in (stage / METRICS_FILE).read_text().splitlines()]
    (stopped,) = [r["step"] for r in records if r.get("event") == "stopped"]
    (resumed,) = [r["step"] for r in records if r.get("event") == "resume"]
    assert 2 <= stopped == resumed < STEPS
    # No step lost or repeated, and the losses of the uninterrupted run, bit for bit.
    assert [r["step"] for r in records if "event" not in r] == list(range(1, STEPS + 1))
    assert losses(stage) == losses(reference)

    second = slurm.wait(s2, logs=logs)
    s2_text = log_text(logs, "pretrain_s2", s2)
    assert (second["JobState"], second["ExitCode"]) == ("COMPLETED", "0:0"), s2_text[-4000:]
    assert datetime.fromisoformat(second["StartTime"]) >= datetime.fromisoformat(first["EndTime"])
    assert f"initialised pretrain_s2 from {stage}/checkpoints/iter_{STEPS:07d}" in s2_text
    s2_losses = losses(tmp_path / "mini" / "pretrain_s2")
    assert sorted(s2_losses) == [1, 2, 3]
    # Trained weights, not a fresh model: S2 starts below S1's first loss.
    assert s2_losses[1] < losses(stage)[1] - 0.3, (s2_losses, losses(stage))


def test_failing_stage_cancels_its_dependent(slurm, mini_pretrain_data, tmp_path):
    """A stage that passes the chain's checks but fails in its job (here the NaN guard at
    step 1 with nan_policy=abort) exits non-zero, and the afterok chain cancels the next."""
    logs = tmp_path / "mini" / "slurm"
    ids = slurm.pipeline("--to", "pretrain_s2", *CPU_NODE, "qwen3_pretrain", *overrides(tmp_path, mini_pretrain_data),
                         "pretrain_s1:trainer.inject_nan_at_steps=[1]", "pretrain_s1:trainer.nan_policy=abort")
    s1, s2 = ids["pretrain_s1"], ids["pretrain_s2"]
    first = slurm.wait(s1, logs=logs)
    text = log_text(logs, "pretrain_s1", s1)
    assert (first["JobState"], first["ExitCode"]) == ("FAILED", "1:0"), text[-4000:]
    assert "aborting: 1 non-finite steps" in text, text[-4000:]
    second = slurm.wait(s2, logs=logs)
    assert second["JobState"] == "CANCELLED" and second["RunTime"] == "00:00:00"
    assert not log_text(logs, "pretrain_s2", s2)


# ---------------------------------------------------------------- without a cluster

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


# ---------------------------------------------------------------- the real time limit

@pytest.mark.slow
def test_time_limit_warning_and_sigterm_requeue_and_scancel_stays_cancelled(slurm, pretrain_data, tmp_path):
    """--time=3 with the warning asked 60 s ahead (it arrives 76-87 s early on slurm 22.05,
    ~95 s into the run): the stage checkpoints on USR1, requeues itself and resumes. A plain
    SIGTERM to the batch shell (a preemption notice) does the same. Then scancel (SIGTERM too)
    checkpoints, but the job stays cancelled. The stage is longer than any run can finish
    (steps take 1-3.5 s here), so none of this depends on the machine's speed."""
    steps = 1000
    logs = tmp_path / "logs"
    logs.mkdir()
    job_id = slurm.sbatch(*CPU_NODE[:-1], "--time=3", "--signal=B:USR1@60", f"--output={logs}/%x-%j.out",
                          f"--error={logs}/%x-%j.err", "slurm/pretrain_s1.sbatch",
                          *overrides(tmp_path, pretrain_data, f"trainer.max_steps={steps}", model="tiny"))
    stage = tmp_path / "tiny" / "pretrain_s1"
    slurm.release_requeued(job_id, logs)

    def records():
        return [json.loads(line) for line in (stage / METRICS_FILE).read_text().splitlines()]

    def stops():
        return [r["step"] for r in records() if r.get("event") == "stopped"]

    def one_step_after_resume(stopped):
        slurm.wait(job_id, logs=logs, until=lambda j: j.get("JobState") in ENDED or stopped + 1 in read_metrics(stage))

    (warned,) = stops()
    one_step_after_resume(warned)
    # SIGTERM to the batch shell alone, as `--signal=B:TERM@...` would send it (scancel
    # --batch would also hit srun, which kills its tasks on SIGTERM).
    (shell,) = [line.split()[0] for line in slurm.run("scontrol", "listpids", job_id).stdout.splitlines()
                if line.split()[2:4] == ["batch", "0"]]
    os.kill(int(shell), signal.SIGTERM)
    slurm.release_requeued(job_id, logs, restarts=2)
    terminated = stops()[-1]
    one_step_after_resume(terminated)
    slurm.run("scancel", job_id)
    job = slurm.wait(job_id, logs=logs)
    text = log_text(logs, "pretrain_s1", job_id)
    assert (job["JobState"], job["Restarts"]) == ("CANCELLED", "2"), text[-4000:]
    assert "qwen3: SIGUSR1" in text and text.count(f"requeueing job {job_id}") == 2, text[-4000:]
    assert "the job was cancelled, so not requeueing" in text, text[-4000:]
    events = [(r["event"], r["step"]) for r in records() if "event" in r]
    cancelled = max(read_metrics(stage))
    assert events == [("stopped", warned), ("resume", warned), ("stopped", terminated), ("resume", terminated),
                      ("stopped", cancelled)], events
    assert [r["step"] for r in records() if "event" not in r] == list(range(1, cancelled + 1))
    assert warned < terminated < cancelled < steps
    assert (stage / "latest").read_text().strip() == f"iter_{cancelled:07d}"
