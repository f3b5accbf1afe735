"""The S1 -> S2 -> S3 pretraining chain on CPU, through the real entry point.

Every run goes through `python -m recipes.pretrain` with Hydra overrides, on data made
by the project's own corpus generator and preprocessor: the default suite's chain trains
`mini` on the mini tokenizer's ids, the slow ones `tiny` and `tiny_moe` on the real Qwen3
tokenizer's.
"""

import json
import math
import re

import pytest
from omegaconf import OmegaConf

from recipes.checkpointing import checkpoint_name
from recipes.run_log import read_metrics, token_count
from tests.conftest import pretrain, read_json

STEPS = {"pretrain_s1": 10, "pretrain_s2": 3, "pretrain_s3": 3}


def run_chain(run_root, data_root, model, *extra, nprocs=None):
    for stage, steps in STEPS.items():
        # The S3 smoke: 128-token samples from length buckets scaled down like the data.
        seq = 128 if stage == "pretrain_s3" else 64
        more = ["trainer.seq_length=128", "data.length_mix.buckets=[64,128,256]"] if stage == "pretrain_s3" else []
        # S2 logs less often than it has steps: its first and last step still print a line.
        interval = 100 if stage == "pretrain_s2" else 1
        proc = pretrain(run_root, data_root, f"stage={stage}", f"model={model}", f"trainer.max_steps={steps}",
                 "trainer.save_interval=100", f"trainer.log_interval={interval}", *more, *extra, nprocs=nprocs)
        previous = {"pretrain_s2": "pretrain_s1", "pretrain_s3": "pretrain_s2"}.get(stage)
        if previous:  # found by stage name in the run directory, not by a typed path
            assert f"initialised {stage} from {run_root / model / previous}/checkpoints/" in proc.stderr
        check_log(proc.stdout, run_root / model / stage, stage, steps, interval, tokens=steps * 4 * seq)
    return run_root / model


def check_log(out: str, stage_dir, stage: str, steps: int, log_interval: int, tokens: int):
    """The job's stdout, as a SLURM job's .out has it: a line per logged step (with an ETA),
    one per checkpoint saved (its path and seconds) and a last line summing the stage up."""
    lines = out.splitlines()
    logged = [int(m.group(1)) for m in (re.match(rf"step (\d+)/{steps} eta \S+ tokens/s=\d+ loss=\S+ lr=\S+ "
                                                 r"grad_norm=\S+", line) for line in lines) if m]
    assert logged == sorted({1, steps, *range(log_interval, steps + 1, log_interval)}), out
    final = stage_dir / "checkpoints" / checkpoint_name(steps)
    assert re.findall(r"^saved checkpoint (\S+) in \d+\.\d s$", out, re.M) == [str(final)], out
    assert re.fullmatch(rf"finished {stage}: {steps} steps, final checkpoint {re.escape(str(final))}, "
                        rf"\S+ wall, {token_count(tokens)} tokens", lines[-1]), out


def check_chain(run, model):
    """What every chain must show, whatever the model and layout."""
    metrics = {stage: read_metrics(run / stage) for stage in STEPS}
    for stage, steps in STEPS.items():
        final = read_json(run / stage / "final.json")
        assert final["step"] == steps, stage
        assert sorted(metrics[stage]) == list(range(1, steps + 1)), stage
    s1 = [metrics["pretrain_s1"][i]["loss"] for i in range(1, STEPS["pretrain_s1"] + 1)]
    # Loss decreases over S1 from about ln(vocabulary), where a random init starts (11.9 at
    # 151,936 ids, 8.3 at the mini tokenizer's 4,096).
    vocab = OmegaConf.load(run / "pretrain_s1" / "config.yaml").model.vocab_size
    assert s1[0] > math.log(vocab) - 0.9 and sum(s1[-3:]) / 3 < sum(s1[:3]) / 3 - 0.5, (vocab, s1)
    # Each later stage starts from the previous one's weights: its first loss is well
    # below a fresh model's (S3 less so: new RoPE base, long code documents).
    assert metrics["pretrain_s2"][1]["loss"] < s1[0] - 0.5
    assert metrics["pretrain_s3"][1]["loss"] < s1[0] - 0.25
    config = json.loads((run / "pretrain_s2" / "checkpoints" / "iter_0000003" / "qwen3_model.json").read_text())
    assert config["model"]["rope_theta"] == 10000.0
    s3_final = run / "pretrain_s3" / read_json(run / "pretrain_s3" / "final.json")["checkpoint"]
    assert read_json(s3_final / "qwen3_model.json")["model"]["rope_theta"] == 1_000_000.0
    # S3 draws 75% of its samples from the long bucket and 25% from the shorter one.
    last = metrics["pretrain_s3"][STEPS["pretrain_s3"]]
    assert last["data/long_len128-256"] == pytest.approx(0.75, abs=0.09)
    assert last["data/long_len64-128"] == pytest.approx(0.25, abs=0.09)
    # S2's blend is the reasoning mix.
    s2 = metrics["pretrain_s2"][STEPS["pretrain_s2"]]
    assert s2["data/math"] > 0.2 and s2["data/code"] > 0.2
    return metrics


@pytest.mark.slow   # a learning test (README: "Learning tests"); the default suite's S1-S3 hand-over is test_pipeline's
def test_mini_chain(tmp_path, mini_pretrain_data):
    run = run_chain(tmp_path, mini_pretrain_data, "mini")
    check_chain(run, "mini")


# The dense chain above runs the recipe; MoE training is covered per step by
# test_train_step and test_deepspeed, so the MoE chain is the slower twin.
@pytest.mark.slow
def test_tiny_moe_chain(tmp_path, pretrain_data):
    run = run_chain(tmp_path, pretrain_data, "tiny_moe")
    metrics = check_chain(run, "tiny_moe")
    step = metrics["pretrain_s1"][1]
    assert step["moe/global_load_balancing_loss"] > 0
    assert step["moe/expert_load_max_over_mean"] >= 1.0


@pytest.mark.parametrize("model,layout", [
    # TP=2 training is covered by test_resume's TP=2 -> TP=1 resume and the SLURM tests,
    # PP per step by test_train_step; the two-rank chains are their slower twins.
    pytest.param("tiny", "parallel.tp=2", marks=pytest.mark.slow),
    pytest.param("tiny_moe", "parallel.pp=2", marks=pytest.mark.slow),
])
def test_chain_on_two_ranks(tmp_path, pretrain_data, model, layout):
    run = run_chain(tmp_path, pretrain_data, model, layout, nprocs=2)
    check_chain(run, model)


@pytest.mark.slow   # ~27 s
def test_recompute_and_wandb_offline(tmp_path, pretrain_data):
    """Full activation recompute changes memory, not results; wandb logs offline by default."""
    common = ["model=tiny", "trainer.max_steps=2", "trainer.save_interval=100"]
    pretrain(tmp_path / "plain", pretrain_data, *common, "logging.wandb.mode=offline")
    pretrain(tmp_path / "recompute", pretrain_data, *common, "trainer.recompute=full")
    plain = read_metrics(tmp_path / "plain" / "tiny" / "pretrain_s1")
    recomputed = read_metrics(tmp_path / "recompute" / "tiny" / "pretrain_s1")
    for step in (1, 2):
        assert recomputed[step]["loss"] == pytest.approx(plain[step]["loss"], rel=1e-6)
        assert recomputed[step]["grad_norm"] == pytest.approx(plain[step]["grad_norm"], rel=1e-5)
    runs = list((tmp_path / "plain" / "tiny" / "pretrain_s1" / "wandb").glob("offline-run-*/*.wandb"))
    assert runs and runs[0].stat().st_size > 0
