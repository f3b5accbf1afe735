"""DeepSpeed ZeRO as the second training engine (trainer.backend=deepspeed), on CPU/gloo.

- ZeRO-1/2/3 follow the Megatron engine's loss curve (DP=2, same weights and batches);
- a DeepSpeed run killed with SIGKILL resumes with bit-identical losses;
- DeepSpeed checkpoint -> megatron-core -> HF gives transformers logits equal to the
  DeepSpeed model's;
- an SFT stage (packed rows) runs on DeepSpeed with the Megatron engine's losses;
- the combinations DeepSpeed cannot run fail before launch with one clear line.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from model.config import ConfigError
from recipes.run_log import read_metrics
from tests.conftest import pretrain, python_module, read_json, run, torchrun
from tests.conftest import stage_losses as losses, start_pretrain as start
from tests.test_hydra import composed

# float32 on 2 gloo ranks: the engines reduce gradients in different orders (megatron-core's
# DDP buckets vs DeepSpeed's ZeRO partitions), so losses differ in the last bits; measured
# |Δloss| <= 4e-7 and relative Δgrad-norm <= 8e-6 over 10 steps of tiny / tiny_moe.
LOSS_ATOL = 1e-4
GRAD_NORM_RTOL = 1e-3


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """One torchrun launch: Megatron DP=2 and ZeRO-1/2/3 on tiny, ZeRO-2 on tiny_moe."""
    work = tmp_path_factory.mktemp("ds_engines")
    torchrun("tests/workers/ds_engines.py", "--work", work, "--out", work / "r.json",
             "--plan", "tiny=1,2,3", "tiny_moe=2")
    return work, read_json(work / "r.json")


@pytest.mark.parametrize("model,stage", [("tiny", 1), ("tiny", 2), ("tiny", 3), ("tiny_moe", 2)])
def test_zero_stage_follows_megatron_loss_curve(engines, model, stage):
    _, results = engines
    ref, ds = results[model]["megatron"], results[model][f"zero{stage}"]
    assert len(ds["loss"]) == len(ref["loss"]) == 10
    assert ref["loss"][-1] < ref["loss"][0] - 0.5, "the reference did not train"
    assert ds["lr"] == ref["lr"]   # the same megatron-core schedule drives both
    assert ds["loss"] == pytest.approx(ref["loss"], rel=0, abs=LOSS_ATOL)
    assert ds["grad_norm"] == pytest.approx(ref["grad_norm"], rel=GRAD_NORM_RTOL)
    for key in (k for k in ref if k.startswith("moe/")):
        assert ds[key] == pytest.approx(ref[key], rel=1e-3), key


def test_cpu_path_compiles_nothing(engines):
    """No JIT op build (shared-memory comm op, FusedAdam/CPU Adam): it would land in the
    worker's TORCH_EXTENSIONS_DIR, the run's scratch directory."""
    work, _ = engines
    assert not (work / "torch_extensions").exists()


def test_deepspeed_checkpoint_to_mcore_to_hf_matches_logits(engines, tmp_path):
    from transformers import AutoModelForCausalLM

    work, _ = engines
    (ckpt,) = (work / "ds_zero3" / "checkpoints").glob("iter_*")
    assert (work / "ds_zero3" / "latest").read_text().strip() == ckpt.name
    python_module("model.convert", "ds-to-mcore", "--ckpt", ckpt, "--out", tmp_path / "mcore")
    python_module("model.convert", "mcore-to-hf", "--ckpt", tmp_path / "mcore", "--out", tmp_path / "hf")
    probe = torch.load(work / "ds_zero3_logits.pt")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    with torch.no_grad():
        logits = hf(probe["tokens"]).logits
    expected = probe["logits"]
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


# ----------------------------------------------------------------------------- resume

STEPS = 4
DS = ["trainer.backend=deepspeed", "deepspeed.zero_stage=3"]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and its ranks at once (torchrun starts ranks in sessions of
    their own, so a process-group kill would leave them running)."""
    for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        p.send_signal(signal.SIGKILL)
    proc.wait()


# Two ranks (ZeRO-3 partitions and RNG per rank) cost ~70 s on 2 busy cores, hence slow.
# Both slow since the GRPO learning test joined the default suite (the 1-rank case ~25 s);
# the Megatron engine's SIGKILL resume stays in the default suite.
@pytest.mark.parametrize("nprocs", [pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_sigkill_resume_is_bit_exact_on_deepspeed(tmp_path, pretrain_data, nprocs):
    # One micro-batch of 32 tokens per rank and step: checkpoints (~230 MB at tiny's full
    # vocabulary) and process start dominate anyway.
    common = [*DS, f"trainer.nprocs={nprocs}", f"trainer.max_steps={STEPS}", "trainer.save_interval=1",
              "trainer.seq_length=32", f"trainer.global_batch_size={nprocs}"]
    ref, victim = (start(tmp_path / name, pretrain_data, *common) for name in ("ref", "victim"))
    stage = tmp_path / "victim" / "tiny" / "pretrain_s1"
    deadline = time.time() + 300
    while 2 not in read_metrics(stage) and time.time() < deadline and victim.poll() is None:
        time.sleep(0.02)
    kill_tree(victim)   # possibly mid-save
    logged = read_metrics(stage)
    resumed_from = int((stage / "latest").read_text().strip().removeprefix("iter_"))
    assert not (stage / "final.json").exists() and 1 <= resumed_from <= max(logged) < STEPS
    assert ref.wait() == 0, ref.stderr.read()[-3000:]

    resumed = pretrain(tmp_path / "victim", pretrain_data, *common)
    assert f"at step {resumed_from}" in resumed.stderr
    after = {s: loss for s, loss in losses(stage).items() if s > resumed_from}
    uninterrupted = losses(tmp_path / "ref" / "tiny" / "pretrain_s1")
    assert list(after) == list(range(resumed_from + 1, STEPS + 1))
    # Bit-identical: JSON floats round-trip exactly.
    assert after == {s: uninterrupted[s] for s in after}
    final = read_json(stage / "final.json")
    assert final["step"] == STEPS and (stage / final["checkpoint"] / "qwen3_deepspeed.json").is_file()


@pytest.mark.slow
def test_next_stage_continues_on_either_engine(tmp_path, pretrain_data):
    """S1 trained on DeepSpeed; S2 starts from it by name on both engines (Megatron takes
    the DeepSpeed weights directly at TP=PP=1) and sees the same first loss."""
    pretrain(tmp_path, pretrain_data, "trainer.backend=deepspeed", "trainer.max_steps=3", "optim.lr=3e-3")
    first = {}
    for backend in ("megatron", "deepspeed"):
        pretrain(tmp_path, pretrain_data, "stage=pretrain_s2", f"stage.name=s2_{backend}", "trainer.max_steps=1",
                 f"trainer.backend={backend}")
        first[backend] = read_metrics(tmp_path / "tiny" / f"s2_{backend}")[1]["loss"]
    s1 = read_metrics(tmp_path / "tiny" / "pretrain_s1")
    assert first["megatron"] == pytest.approx(first["deepspeed"], abs=LOSS_ATOL)
    assert first["megatron"] < s1[1]["loss"] - 0.2   # trained weights, not a fresh init


# ----------------------------------------------------------------------------- SFT

SFT_ARGS = ["stage=sft_cold_start", "stage.init_from=null", "trainer.seq_length=128", "trainer.global_batch_size=4",
            "trainer.micro_batch_size=2", "trainer.max_steps=2", "trainer.save_interval=2", "trainer.log_interval=1",
            "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=0", "logging.progress=false",
            "logging.wandb.mode=disabled"]


# slow: the ZeRO-1/2/3 parity tests keep the engine in the default suite, and the SFT
# tests keep the stage there; this is the cross-check of the two.
@pytest.mark.slow
def test_sft_stage_runs_on_deepspeed(tmp_path, qwen3_tokenizer_dir):
    from data_pipeline.corpus import addition_problems

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_problems(64, 2, seed=0)))
    runs = {}
    for backend in ("megatron", "deepspeed"):
        run([sys.executable, "-m", "recipes.sft", f"run.root={tmp_path / backend}", "run.name=arith",
             f"tokenizer={qwen3_tokenizer_dir}", f"sft.data.files=[{data}]", *SFT_ARGS,
             f"trainer.backend={backend}", "deepspeed.zero_stage=2"], timeout=600)
        runs[backend] = tmp_path / backend / "arith" / "sft_cold_start"
    ds, ref = read_metrics(runs["deepspeed"]), read_metrics(runs["megatron"])
    assert sorted(ds) == [1, 2]
    assert ds[1]["data/packing_efficiency"] > 0.5   # packed rows, so segment_ids reached the model
    # Same seed, same initial weights and packed batches: the same losses as Megatron's.
    assert [ds[s]["loss"] for s in (1, 2)] == pytest.approx([ref[s]["loss"] for s in (1, 2)], abs=LOSS_ATOL)
    final = read_json(runs["deepspeed"] / "final.json")
    assert (runs["deepspeed"] / final["checkpoint"] / "qwen3_deepspeed.json").is_file()


# ----------------------------------------------------------------------------- errors


def settings_for(*overrides):
    from recipes.train import settings_from

    cfg = composed(*overrides)
    return cfg, settings_from(cfg)


@pytest.mark.parametrize("overrides,message", [
    (["parallel.tp=2"], "parallel.tp=2 is not supported with trainer.backend=deepspeed"),
    (["parallel.pp=2"], "parallel.pp=2 is not supported with trainer.backend=deepspeed"),
    (["model=tiny_moe", "parallel.ep=2"], "parallel.ep=2 is not supported with trainer.backend=deepspeed"),
    (["parallel.cp=2"], "parallel.cp=2 is not supported with trainer.backend=deepspeed"),
    (["model=tiny_moe", "parallel.etp=2"], "parallel.etp=2 is not supported with trainer.backend=deepspeed"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage=4 must be 1, 2 or 3"),
    (["deepspeed.zero_stage=0"], "deepspeed.zero_stage=0 must be 1, 2 or 3"),
    (["deepspeed.offload_param=cpu"], "deepspeed.offload_param=cpu needs deepspeed.zero_stage=3"),
    (["deepspeed.offload_optimizer=nvme"], "deepspeed.offload_optimizer='nvme' must be 'none' or 'cpu'"),
    (["precision=fp8_delayed"], "precision=fp8_delayed is not supported with trainer.backend=deepspeed"),
    (["stage.recipe=rl"], "stage.recipe=rl is not supported with backend=deepspeed"),
    (["stage.recipe=distill"], "stage.recipe=distill is not supported with backend=deepspeed"),
    (["deepspeed.config=/nonexistent/ds.json"], "deepspeed.config=/nonexistent/ds.json: no such file"),
])
def test_unsupported_combination_is_one_clear_error(overrides, message):
    from recipes.train import check_settings

    cfg, s = settings_for("trainer.backend=deepspeed", *overrides)
    with pytest.raises(ConfigError) as err:
        check_settings(s, world_size=4, recipe=str(cfg.stage.recipe))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_backends_are_checked(tmp_path):
    from recipes.train import check_settings

    cfg, s = settings_for("trainer.backend=fsdp")
    with pytest.raises(ConfigError, match="trainer.backend='fsdp' must be one of megatron, deepspeed"):
        check_settings(s, world_size=1)
    cfg, s = settings_for("trainer.backend=deepspeed", "deepspeed.zero_stage=3", "deepspeed.offload_param=cpu",
                          "deepspeed.offload_optimizer=cpu")
    check_settings(s, world_size=2, recipe="pretrain")   # a valid ZeRO-3 offload config passes


def test_raw_json_is_laid_over_the_generated_config(tmp_path):
    from recipes.deepspeed_engine import DeepSpeedSettings, deepspeed_config
    from recipes.engine import OptimConfig

    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1000},
                               "communication_data_type": "fp32"}))
    config = deepspeed_config(DeepSpeedSettings(zero_stage=1, config=str(raw)), OptimConfig(clip_grad=0.5),
                              micro_batch_size=2, grad_accum=3, world_size=4, dtype=torch.bfloat16, cuda=False)
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["stage3_max_live_parameters"] == 1000
    assert config["zero_optimization"]["reduce_bucket_size"] == DeepSpeedSettings().reduce_bucket_size
    assert config["communication_data_type"] == "fp32"
    assert config["train_batch_size"] == 24 and config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] and config["optimizer"]["params"]["torch_adam"]
    # Keys the trainer owns are refused, not silently overridden.
    raw.write_text(json.dumps({"train_batch_size": 64}))
    cfg, s = settings_for("trainer.backend=deepspeed", f"deepspeed.config={raw}")
    from recipes.train import check_settings

    with pytest.raises(ConfigError, match="'train_batch_size' comes from the trainer/optim/precision config"):
        check_settings(s, world_size=1, recipe="pretrain")


def test_cli_error_and_engine_mismatch_on_resume(tmp_path, pretrain_data):
    """One line on stderr, exit 2, nothing trained; a DeepSpeed stage cannot be resumed by
    the Megatron engine (and says how to continue from it instead)."""
    proc = pretrain(tmp_path, pretrain_data, "trainer.max_steps=2", *DS, "parallel.tp=2", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "parallel.tp=2 is not supported with trainer.backend=deepspeed" in errors[0]
    assert not any(tmp_path.rglob("metrics.jsonl"))

    from recipes.checkpointing import CHECKPOINTS, LATEST
    from recipes.train import check_start

    stage = tmp_path / "run" / "pretrain_s1"
    fake = stage / CHECKPOINTS / "iter_0000001"
    fake.mkdir(parents=True)
    (fake / "qwen3_deepspeed.json").write_text("{}")
    (stage / LATEST).write_text("iter_0000001\n")
    _, s = settings_for(f"run.root={tmp_path}", "run.name=run")
    with pytest.raises(ConfigError, match="DeepSpeed checkpoint and cannot be resumed with trainer.backend=megatron"):
        check_start(fake, None, s, world_size=1)
    _, s = settings_for(f"run.root={tmp_path}", "run.name=run", "parallel.tp=2")
    with pytest.raises(ConfigError, match="convert it first: python -m model.convert ds-to-mcore"):
        check_start(None, fake, s, world_size=2)
    # DeepSpeed reloads its partitions only at the ZeRO stage and rank count that wrote them.
    (fake / "qwen3_deepspeed.json").write_text(json.dumps({"zero_stage": 2, "layout": {"world_size": 2}}))
    _, s = settings_for(f"run.root={tmp_path}", "run.name=run", "trainer.backend=deepspeed", "deepspeed.zero_stage=3")
    with pytest.raises(ConfigError, match="written with ZeRO-2; resume it with deepspeed.zero_stage=2"):
        check_start(fake, None, s, world_size=2)
    _, s = settings_for(f"run.root={tmp_path}", "run.name=run", "trainer.backend=deepspeed", "deepspeed.zero_stage=2")
    with pytest.raises(ConfigError, match="written by 2 DeepSpeed ranks, this run has 1"):
        check_start(fake, None, s, world_size=1)
    check_start(fake, None, s, world_size=2)
