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
import signal
import subprocess
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


@pytest.mark.slow   # default-suite budget (README: make test-slow)
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
    # never started (SLURM's RunTime of a job cancelled while pending is not reliably 0)
    assert second["JobState"] == "CANCELLED" and not log_text(logs, "pretrain_s2", s2)
    assert not (tmp_path / "mini" / "pretrain_s2").exists()


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
