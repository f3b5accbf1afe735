"""Exact resume: a run killed with SIGKILL and restarted gives the uninterrupted run's
losses bit for bit; checkpoints move between layouts; a damaged checkpoint is set aside;
a changed LR schedule is refused or rebuilt; the NaN guard; launch-time errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from recipes.run_log import read_metrics
from recipes.checkpointing import complete_checkpoints
from tests.conftest import (REPO, _env, cli_error, config_error, pretrain, pretrain_command, read_json, run,
                            sigkill_resume, stage_losses)

STEPS = 8


# The MoE twin (router state, expert grads, plain optimizer) is the slower one. The tiny run
# saves the distributed optimizer in dp_reshardable, the GPU recipe's format, which loads
# only at the layout it was saved at: another TP is refused before launch.
@pytest.mark.parametrize("model,dist_opt", [("tiny", True), pytest.param("tiny_moe", False, marks=pytest.mark.slow)])
def test_sigkill_resume_is_bit_exact(tmp_path, pretrain_data, model, dist_opt):
    # every other step: a full-vocabulary checkpoint with optimizer state is the slow part
    common = ["trainer.save_interval=2", "trainer.micro_batch_size=2", "trainer.optimizer_checkpoint=dp_reshardable",
              f"optim.use_distributed_optimizer={str(dist_opt).lower()}"]
    r = sigkill_resume(tmp_path, pretrain_data, model, *common, steps=STEPS)
    assert "resumed pretrain_s1 from" in r["stderr"]
    expected, got, resumed_from = r["expected"], r["got"], r["resumed_from"]
    assert sorted(got) == list(range(1, STEPS + 1))
    # Bit-identical: JSON floats round-trip exactly.
    assert {s: got[s] for s in got if s > resumed_from} == {s: expected[s] for s in expected if s > resumed_from}
    # keep_last=2: older checkpoints pruned, the newest complete ones kept.
    assert [p.name for p in complete_checkpoints(r["stage"])] == [f"iter_{STEPS - 2:07d}", f"iter_{STEPS:07d}"]
    if dist_opt:
        again = [f"model={model}", f"trainer.max_steps={STEPS}", *common, "parallel.tp=2"]
        error = config_error(pretrain_command(tmp_path / "victim", pretrain_data, *again))
        assert "dp_reshardable format" in error and "saved at tp=1" in error and "this run has tp=2" in error, error


def test_manifest_lists_every_file_and_finds_damage(tmp_path):
    from model.checkpoint import MANIFEST_FILE, verify_manifest, write_manifest

    ckpt = tmp_path / "iter_0000001"
    (ckpt / "sub").mkdir(parents=True)
    shard = ckpt / "__0_0.distcp"
    data = os.urandom(5000)
    shard.write_bytes(data)
    (ckpt / "sub" / "common.pt").write_bytes(b"x" * 10)
    write_manifest(ckpt)
    files = json.loads((ckpt / MANIFEST_FILE).read_text())["files"]
    assert sorted(files) == ["__0_0.distcp", "sub/common.pt"] and files["sub/common.pt"]["size"] == 10
    assert verify_manifest(ckpt) is None
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))   # one bit, same size
    assert verify_manifest(ckpt, checksums=False) is None
    assert verify_manifest(ckpt) == "__0_0.distcp does not match its checksum"
    shard.write_bytes(data[:100])
    assert verify_manifest(ckpt, checksums=False) == "__0_0.distcp has 100 bytes where 5000 were written"
    shard.unlink()
    assert verify_manifest(ckpt) == "__0_0.distcp is missing"
    (ckpt / MANIFEST_FILE).write_text("{")
    assert verify_manifest(ckpt) == f"its {MANIFEST_FILE} is unreadable"
    (ckpt / MANIFEST_FILE).unlink()
    assert verify_manifest(ckpt) is None   # written before manifests: not judged


def test_damaged_latest_is_set_aside_and_the_one_before_resumes(tmp_path, mini_pretrain_data):
    # a fixed decay length: runs of 4 and 6 steps share one LR schedule
    common = ["model=mini", "trainer.save_interval=2", "optim.decay_steps=10"]
    pretrain(tmp_path, mini_pretrain_data, *common, "trainer.max_steps=4")
    stage = tmp_path / "mini" / "pretrain_s1"
    newest = stage / "checkpoints" / "iter_0000004"
    manifest = json.loads((newest / "manifest.json").read_text())["files"]
    assert {"metadata.json", "common.pt", "qwen3_model.json"} <= set(manifest)
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])   # a truncated copy

    proc = pretrain(tmp_path, mini_pretrain_data, *common, "trainer.max_steps=6")
    warnings = [line for line in proc.stderr.splitlines() if "damaged checkpoint" in line]
    assert len(warnings) == 1 and "iter_0000004" in warnings[0] and "resuming from iter_0000002" in warnings[0], \
        proc.stderr[-3000:]
    assert "resumed pretrain_s1 from" in proc.stderr and "at step 2" in proc.stderr
    assert (stage / "checkpoints" / "iter_0000004.damaged" / shard.name).is_file()   # set aside, not deleted
    assert read_json(stage / "final.json")["step"] == 6
    assert sorted(read_metrics(stage)) == list(range(1, 7))

    # none matches: one line naming them, and nothing renamed
    for ckpt in complete_checkpoints(stage):
        (ckpt / "common.pt").write_bytes(b"")
    error = config_error(pretrain_command(tmp_path, mini_pretrain_data, *common, "trainer.max_steps=8"))
    assert "no checkpoint of" in error and "iter_0000004 (common.pt has 0 bytes" in error and "iter_0000006" in error
    assert [p.name for p in complete_checkpoints(stage)] == ["iter_0000004", "iter_0000006"]


@pytest.mark.slow   # default-suite budget (README: make test-slow)
def test_changed_schedule_on_resume_is_refused_unless_overridden(tmp_path, mini_pretrain_data):
    import torch
    import yaml

    from recipes.engine import OptimConfig, lr_scheduler

    common = ["model=mini", "trainer.save_interval=2", "optim.lr=1e-3", "optim.min_lr=1e-4"]
    pretrain(tmp_path, mini_pretrain_data, *common, "trainer.max_steps=2")
    error = config_error(pretrain_command(tmp_path, mini_pretrain_data, *common, "trainer.max_steps=4"))
    assert "lr_decay_steps 2 -> 4" in error and "optim.override_schedule=true" in error, error

    proc = pretrain(tmp_path, mini_pretrain_data, *common, "trainer.max_steps=4", "optim.override_schedule=true")
    assert "LR schedule rebuilt at step 2" in proc.stderr, proc.stderr[-3000:]
    stage = tmp_path / "mini" / "pretrain_s1"
    logged = read_metrics(stage)
    # steps 3 and 4 follow a fresh 4-step schedule, not the finished 2-step one (at min_lr)
    optim = OptimConfig(**yaml.safe_load((stage / "config.yaml").read_text())["optim"])
    scheduler = lr_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3), optim, 4)
    for step in (3, 4):
        scheduler.step(increment=1 if step == 4 else 2)
        assert logged[step]["lr"] == pytest.approx(scheduler.optimizer.param_groups[0]["lr"], rel=1e-9), logged[step]
    assert logged[3]["lr"] > 1e-4 * 1.01


@pytest.mark.slow   # ~70 s; the SIGKILL and SLURM requeue resumes stay in the default suite
def test_tp2_checkpoint_resumes_at_tp1(tmp_path, pretrain_data):
    # A fixed decay length, so that runs of 3 and 4 steps share one LR schedule.
    common = ["model=tiny", "optim.decay_steps=10", "trainer.save_interval=1"]
    pretrain(tmp_path / "ref", pretrain_data, *common, "trainer.max_steps=4", "parallel.tp=2", nprocs=2)
    pretrain(tmp_path / "moved", pretrain_data, *common, "trainer.max_steps=3", "parallel.tp=2", nprocs=2)
    proc = pretrain(tmp_path / "moved", pretrain_data, *common, "trainer.max_steps=4")
    assert "resumed pretrain_s1" in proc.stderr and "at step 3" in proc.stderr
    ref = stage_losses(tmp_path / "ref" / "tiny" / "pretrain_s1")
    moved = stage_losses(tmp_path / "moved" / "tiny" / "pretrain_s1")
    assert moved[3] == ref[3]
    assert moved[4] == pytest.approx(ref[4], rel=1e-6, abs=1e-6)
    assert moved[4] != moved[3]


def test_checkpoints_move_between_the_local_and_te_specs(tmp_path):
    """A CPU (local spec) checkpoint loads into the sharded state dict the Transformer
    Engine spec asks for, whose standalone norms (TENorm: QK-norm, the MoE pre-MLP norm,
    the final norm) also want an `_extra_state` the local RMSNorm never saves; a checkpoint
    with TE's extra states loads into the local spec; no other absent key is let through.
    How the TE request is derived without TE: tests/workers/spec_checkpoints.py."""
    out = tmp_path / "results.json"
    run([sys.executable, "tests/workers/spec_checkpoints.py", "--work", tmp_path, "--out", out])
    res = read_json(out)
    te_norms = ["decoder.final_layernorm._extra_state", "decoder.layers.self_attention.k_layernorm._extra_state",
                "decoder.layers.self_attention.q_layernorm._extra_state"]
    for name, moe_norm in (("tiny", []), ("tiny_moe", ["decoder.layers.pre_mlp_layernorm._extra_state"])):
        r = res[name]
        assert r["te_only"] == sorted(te_norms + moe_norm), r
        assert r["local_to_te_weights_equal"] and r["local_to_te_extra_states"] == ["None"], r
        assert r["te_to_local_weights_equal"] and r["other_missing_refused"], r


@pytest.mark.slow   # default-suite budget (README: make test-slow)
def test_nan_guard_skips_then_aborts(tmp_path, mini_pretrain_data):
    common = ["model=mini", "trainer.max_steps=4", "trainer.save_interval=1", "precision=fp8_delayed"]
    proc = pretrain(tmp_path / "skip", mini_pretrain_data, *common, "trainer.inject_nan_at_steps=[2]")
    # On CPU, FP8 cannot take effect: the run says so and trains in fp32.
    assert "precision=fp8_delayed needs Transformer Engine on a CUDA GPU" in proc.stderr
    m = read_metrics(tmp_path / "skip" / "mini" / "pretrain_s1")
    assert m[2]["skipped"] and m[2]["nan_steps"] == 1 and not m[3]["skipped"]
    assert all(m[s]["loss"] == m[s]["loss"] for s in (1, 3, 4))  # finite again after the skip
    assert read_json(tmp_path / "skip" / "mini" / "pretrain_s1" / "final.json")["step"] == 4

    proc = pretrain(tmp_path / "abort", mini_pretrain_data, *common, "trainer.inject_nan_at_steps=[3]",
                    "trainer.nan_policy=abort", check=False)
    assert proc.returncode == 1
    stage = tmp_path / "abort" / "mini" / "pretrain_s1"
    assert "aborting: 1 non-finite steps" in proc.stderr
    assert (stage / "latest").read_text().strip() == "iter_0000002"
    assert not (stage / "final.json").exists()


@pytest.mark.parametrize("overrides,message", [
    (["parallel.tp=3"], "num_attention_heads=4 is not divisible by tp=3"),
    (["trainer.global_batch_size=3", "trainer.micro_batch_size=2"], "global_batch_size=3 is not divisible"),
    (["+data.blend.nosuch=1.0"], "nosuch"),
    (["stage=pretrain_s2", "run.name=fresh"], "init_from='pretrain_s1' is neither a stage of run"),
    (["optim.decay_style=exp"], "optim.decay_style='exp'"),
    (["trainer.optimizer_checkpoint=zero"], "trainer.optimizer_checkpoint='zero' must be auto, dp_reshardable"),
])
def test_bad_config_fails_before_training(tmp_path, pretrain_data, overrides, message):
    # in this process (recipes.train.validate); the CLI's exit code and stderr: the test below
    assert message in config_error(pretrain_command(tmp_path, pretrain_data, "trainer.max_steps=2", *overrides))


def test_bad_config_on_the_command_line_is_one_error_line(tmp_path, pretrain_data):
    proc = pretrain(tmp_path, pretrain_data, "trainer.max_steps=2", "parallel.tp=3", check=False)
    assert "num_attention_heads=4 is not divisible by tp=3" in cli_error(proc)
    assert not (tmp_path / "tiny").exists() or not any((tmp_path / "tiny").rglob("metrics.jsonl"))


# slow: tests/test_slurm.py's preemption chain (default suite) has srun signal every task
# of a running stage, which then checkpoints, exits 75 and is requeued.
@pytest.mark.slow
def test_signal_to_every_process_checkpoints_and_exits_75(tmp_path, pretrain_data):
    """SLURM's warning: finish the step, checkpoint, exit with EXIT_PREEMPTED. SLURM signals
    every process of the step, so it goes to the whole process group here, after a periodic
    checkpoint has started megatron-core's writer helpers: they must survive it, or the
    save the signal asks for fails."""
    common = ["model=tiny", "trainer.max_steps=12", "trainer.save_interval=2"]
    proc = subprocess.Popen(pretrain_command(tmp_path, pretrain_data, *common), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stage = tmp_path / "tiny" / "pretrain_s1"
    deadline = time.time() + 300
    while 3 not in read_metrics(stage) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=300) == 75, proc.stderr.read()[-3000:]
    stopped = max(read_metrics(stage))
    assert 3 <= stopped < 12 and (stage / "latest").read_text().strip() == f"iter_{stopped:07d}"
    assert not (stage / "final.json").exists()
    pretrain(tmp_path, pretrain_data, *common)
    assert read_json(stage / "final.json")["step"] == 12
    assert sorted(read_metrics(stage)) == list(range(1, 13))


def test_precision_choices():
    from model.config import ConfigError
    from recipes.train import resolve_precision

    assert resolve_precision("auto", cuda=False, te=False)[0] == "fp32"
    assert resolve_precision("auto", cuda=True, te=True)[0] == "bf16"
    dtype, overrides, note = resolve_precision("fp8_blockwise", cuda=False, te=False)
    assert dtype == "fp32" and overrides == {} and "no CUDA" in note
    with pytest.raises(ConfigError, match="needs Transformer Engine"):
        resolve_precision("fp8_delayed", cuda=True, te=False)
    dtype, overrides, note = resolve_precision("fp8_delayed", cuda=True, te=True)
    assert dtype == "bf16" and overrides["fp8_recipe"] == "delayed" and overrides["fp8"] == "hybrid" and note is None
