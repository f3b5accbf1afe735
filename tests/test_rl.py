"""Reasoning RL (GRPO) end to end on CPU: the reward goes up for real.

The task is the arithmetic cold-start model's own (tests/conftest.py: two-digit additions
without carries, column sums as the reasoning, the sum in \\boxed{}; the `mini` model and
tokenizer). An SFT from that model on rows of which three quarters skip the reasoning (an
empty think block) leaves a policy that mostly answers straight away, and is then nearly
always wrong: it is one decision, taken at the first token of the think block, away from
its better self. GRPO on fresh prompts, with the math verifier as the only teacher, has to
find that reasoning pays. The stage's own held-out evaluation (`rl.eval`: 40 problems in no
training set, 4 samples each, one seed) measures the mean reward before the first update
and after the last; the rollouts' mean response length shows the mechanism (a skipped think
block answers in 10 tokens, a reasoned one in 29).

Why this task (measured on the full vocabulary, see the RL issue's closing notes): on the
plain addition model, tens of GRPO steps moved held-out reward by little more than the
noise, because its errors are scattered digit slips; and a parity task whose SFT answers
were coin flips stayed at chance, because the tiny model had to grow a new feature, not
reweight one it has. A choice that the policy already makes both ways gives every group
the same signal.

Why these settings (measured on mini): rollouts and evaluation sample at temperature 0.5.
At 1 the cold start slips in its own column sums, by how well its seed learned the task
(sampled held-out accuracy 0.73-0.99 over seeds 0-3, against 0.96-1.0 at 0.5), and the
reward measures those slips as much as the choice to reason (with an earlier, 150-step
cold start, a 20-step skip SFT and temperature 1, the gain over 10 updates ranged from 0.04
to 0.38 by seed). The skip SFT runs 60 steps with its rate decayed, so that the share of
reasoned answers settles near the data's: the first rollout's mean length is 11.2-12.4
tokens at seeds 0-3 (about 10% reasoned); 20 steps at a constant rate left anywhere from
3% to 65% reasoned (over seeds, rates 1e-3 and 3e-4, skipped shares 0.5 and 0.8).

Measured (QWEN3_TEST_SEED; held-out reward before -> after the 16 updates; rollout mean
response length: first rollout, and mean of the first three -> of the last three):

    seed 0: 0.188 -> 0.963   11.2, 14.1 -> 29.0
    seed 1: 0.131 -> 0.825   12.4, 14.4 -> 28.7
    seed 2: 0.100 -> 1.000   11.2, 13.3 -> 29.0
    seed 3: 0.119 -> 0.994   12.4, 15.0 -> 29.0

Each bar sits at least twice the spread over these seeds away from seed 0's value: before
<= 0.5 (0.188, spread 0.088) and a first rollout of fewer than half reasoned answers
(length <= 19.5; 11.2, spread 1.2); growth of the mean length >= 10 tokens, about half of
the answers turned to reasoning (14.9, spread 1.6); a held-out gain >= 0.35 (0.775, spread
0.21: seed 1, the cold start that learned the task least, levels off near 0.8 after 8
updates, the others near 1).

The other tests run GRPO steps on `mini_moe` (load-balancing stats, an off-policy second
minibatch) and at TP=2, and check that bad settings fail before anything starts.
"""

from __future__ import annotations

import json
import math
import random
import sys

import pytest

from recipes.run_log import read_metrics
from tests.conftest import (TEST_SEED, cli_error, config_error, make_hf_model, python_module, read_json, run,
                            write_jsonl)

SFT_STEPS, RL_STEPS = 60, 16
NO_THINK = 0.75   # fraction of the SFT rows without reasoning
RL_ARGS = ["model=mini", "trainer.seq_length=64", "trainer.global_batch_size=32",
           "trainer.micro_batch_size=16", "rl.grpo.prompts_per_rollout=8", "rl.grpo.group_size=8",
           "rl.grpo.max_new_tokens=40", "optim.lr=1e-4", "optim.min_lr=1e-4", "trainer.log_interval=1",
           f"seed={1234 + TEST_SEED}", "logging.progress=false", "logging.wandb.mode=disabled"]


@pytest.fixture(scope="module")
def rl_data(arith_task):
    """The SFT rows (most without reasoning), the RL prompts and the held-out problems."""
    from data_pipeline.corpus import addition_problems

    root = arith_task / "rl"
    root.mkdir(exist_ok=True)
    held = [json.loads(line) for line in (arith_task / "held.jsonl").read_text().splitlines()]
    seen = {tuple(r["pair"]) for r in held}
    sft = addition_problems(400, 2, seed=7 + 10 * TEST_SEED, exclude=seen, with_carries=False)
    # an exact share, so that the seeds differ in which rows skip, not in how many
    for i in random.Random(TEST_SEED).sample(range(len(sft)), round(NO_THINK * len(sft))):
        sft[i]["messages"][1]["reasoning_content"] = ""
    write_jsonl(root / "sft.jsonl", sft)
    seen |= {tuple(r["pair"]) for r in sft}
    prompts = addition_problems(256, 2, seed=2 + 10 * TEST_SEED, exclude=seen, with_carries=False)
    assert not seen & {tuple(r["pair"]) for r in prompts}
    write_jsonl(root / "rl.jsonl", [{"messages": r["messages"], "reference": r["reference"]} for r in prompts])
    write_jsonl(root / "held.jsonl", [{"messages": r["messages"], "reference": r["reference"]} for r in held])
    with (root / "rl.jsonl").open("a") as f:   # rows the reader must skip and count, not fail on
        f.write("{not json\n")
        f.write(json.dumps({"prompt": "What is 1+1?", "reference": "2", "reward": "no_such_reward"}) + "\n")
        f.write(json.dumps({"reference": "3"}) + "\n")
    return root


@pytest.fixture(scope="module")
def skips_reasoning(rl_data, arith_cold_start, mini_tokenizer_dir):
    """The SFT that teaches the policy to skip its reasoning most of the time. Long enough,
    with the learning rate decayed, for the share of skipped think blocks to settle near the
    data's (see the module docstring)."""
    root = rl_data
    run([sys.executable, "-m", "recipes.sft", "stage=sft_cold_start", f"run.root={root / 'runs'}", "run.name=skip",
         f"init_from={arith_cold_start}", f"sft.data.files=[{root / 'sft.jsonl'}]",
         f"tokenizer={mini_tokenizer_dir}", "model=mini", "trainer.seq_length=92", f"seed={1234 + TEST_SEED}",
         "trainer.global_batch_size=8", "trainer.micro_batch_size=8", f"trainer.max_steps={SFT_STEPS}",
         f"trainer.save_interval={SFT_STEPS}", "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=0",
         "logging.progress=false", "logging.wandb.mode=disabled"], timeout=1200)
    return root / "runs" / "skip" / "sft_cold_start"


def rl_command(root, tokenizer, data, *overrides) -> list:
    return [sys.executable, "-m", "recipes.rl", "stage=rl_reasoning", f"run.root={root / 'runs'}",
            f"rl.data.files=[{data}]", f"tokenizer={tokenizer}", *RL_ARGS, *map(str, overrides)]


def rl(root, tokenizer, data, *overrides, check=True):
    return run(rl_command(root, tokenizer, data, *overrides), check=check, timeout=1800)


@pytest.mark.slow   # a learning test (README: "Learning tests")
def test_reasoning_rl_raises_held_out_reward(rl_data, skips_reasoning, mini_tokenizer_dir):
    root = rl_data
    proc = rl(root, mini_tokenizer_dir, root / "rl.jsonl", "run.name=rl", "trainer.nprocs=2",
              f"init_from={skips_reasoning}", f"trainer.max_steps={RL_STEPS}", f"trainer.save_interval={RL_STEPS}",
              # one on-policy minibatch per rollout, no KL anchor: the learning rate alone sets the pace
              "trainer.global_batch_size=64", "rl.grpo.recompute_old_logprobs=false", "rl.grpo.reference=false",
              "rl.grpo.kl_coef=0",
              # the cold start's own slips in its column sums, sampled at temperature 1, would
              # weigh on the reward as much as the choice to reason (module docstring)
              "rl.grpo.temperature=0.5",
              f"rl.eval.files=[{root / 'held.jsonl'}]", "rl.eval.samples=4", "rl.eval.interval=0")
    output = proc.stdout + proc.stderr
    assert "rl data: 256 prompts; skipped 3 rows (unknown reward: 1, unreadable row or no prompt: 2)" in output
    assert "held-out rl data: 40 prompts" in output
    metrics = read_metrics(root / "runs" / "rl" / "rl_reasoning")
    steps = [metrics[k] for k in sorted(metrics)]
    assert [m["step"] for m in steps] == list(range(1, RL_STEPS + 1))
    for m in steps:
        for key in ("loss", "rl/reward_mean", "rl/reward_std", "rl/accuracy", "rl/response_length", "rl/entropy",
                    "rl/kl", "rl/clip_fraction", "rl/logp_mismatch", "grad_norm"):
            assert math.isfinite(m[key]), (m["step"], key)
        assert m["rl/new_rollout"] == 1.0 and m["rl/logp_mismatch"] < 1e-3
    evals = {int(m["rl/eval_step"]): round(m["rl/eval_reward"], 3) for m in steps if "rl/eval_step" in m}
    assert sorted(evals) == [0, RL_STEPS]   # before the first update, after the last
    lengths = [round(m["rl/response_length"], 1) for m in steps]
    (root / "rl_curve.json").write_text(json.dumps({"held_out_reward": evals, "response_length": lengths}))
    print(f"held-out reward by update {evals}; rollout response length {lengths}")
    before, after = evals[0], evals[RL_STEPS]
    # The SFT made the policy skip its reasoning: fewer than half of the first rollout's
    # responses reason (10 tokens skipped, 29 reasoned), and most held-out answers are wrong ...
    assert lengths[0] <= 19.5 and before <= 0.5
    # ... and GRPO made it reason again: responses grow as it writes its column sums ...
    assert sum(lengths[-3:]) / 3 >= sum(lengths[:3]) / 3 + 10
    # ... which pays on held-out problems.
    assert after >= before + 0.35


# ~35 s; MoE training steps and their balance metrics are in the default suite
# (test_train_step, test_moe_balance), this is their RL twin.
@pytest.mark.slow
def test_mini_moe_rl_logs_load_balance(tmp_path, mini_tokenizer_dir, rl_data):
    """Two optimizer minibatches from one rollout on the MoE model: load balance logged, and
    the second minibatch is off-policy (its importance ratio has left 1)."""
    from data_pipeline.tokenizer import MINI_VOCAB

    hf = make_hf_model(tmp_path / "hf", "mini_moe", vocab_size=MINI_VOCAB, weight_std=0.02, norm_std=0.0)
    python_module("model.convert", "hf-to-mcore", "--hf-dir", hf, "--out", tmp_path / "base")
    rl(tmp_path, mini_tokenizer_dir, rl_data / "rl.jsonl", "model=mini_moe", "run.name=moe",
       f"init_from={tmp_path / 'base'}", "trainer.max_steps=2",
       "trainer.save_interval=2", "rl.grpo.prompts_per_rollout=4", "rl.grpo.max_new_tokens=12",
       "rl.grpo.max_sampling_rounds=0", "rl.grpo.dynamic_sampling=false", "trainer.global_batch_size=16",
       f"rl.eval.files=[{rl_data / 'held.jsonl'}]", "rl.eval.samples=1", "rl.eval.interval=0")
    metrics = read_metrics(tmp_path / "runs" / "moe" / "rl_reasoning")
    assert sorted(metrics) == [1, 2]
    for m in metrics.values():
        assert m["moe/global_load_balancing_loss"] > 0
        assert m["moe/expert_load_max_over_mean"] >= 1.0
        assert math.isfinite(m["loss"]) and math.isfinite(m["rl/entropy"])
    assert [metrics[k]["rl/new_rollout"] for k in (1, 2)] == [1.0, 0.0]
    assert abs(metrics[1]["rl/ratio"] - 1) < 1e-5 < abs(metrics[2]["rl/ratio"] - 1)
    # held-out evaluation: before the first update (in step 1's record) and after the last
    assert [metrics[k].get("rl/eval_step") for k in (1, 2)] == [0.0, 2.0]
    assert all(0 <= metrics[k]["rl/eval_reward"] <= 1 for k in (1, 2))
    assert read_json(tmp_path / "runs" / "moe" / "rl_reasoning" / "final.json")["step"] == 2


@pytest.mark.slow   # default-suite budget (README: make test-slow)
def test_grpo_step_at_tp2(rl_data, arith_cold_start, mini_tokenizer_dir, tmp_path):
    """Two gloo processes at TP=2 (KV-cache rollouts), from the TP=1 arithmetic SFT checkpoint."""
    rl(tmp_path, mini_tokenizer_dir, rl_data / "rl.jsonl", "run.name=tp2", "parallel.tp=2", "parallel.sp=false",
       f"init_from={arith_cold_start}", "trainer.max_steps=1", "trainer.save_interval=1", "trainer.seq_length=64",
       "rl.grpo.prompts_per_rollout=4", "rl.grpo.max_new_tokens=40", "rl.grpo.max_sampling_rounds=1")
    (m,) = read_metrics(tmp_path / "runs" / "tp2" / "rl_reasoning").values()
    assert m["step"] == 1 and m["update_successful"]
    assert m["grad_norm"] > 0 and 0 <= m["rl/reward_mean"] <= 1
    # rollout and training log-probs come from the same weights: they agree
    assert m["rl/logp_mismatch"] < 1e-3


@pytest.mark.parametrize("override, message", [
    ("rl.grpo.prompts_per_rollout=3", "is not a whole number of trainer.global_batch_size=32 minibatches"),
    ("rl.grpo.kl_estimator=k9", "rl.grpo.kl_estimator='k9' must be one of k1, k2, k3"),
    ("rl.rewards=[no_such_reward]", "rl.rewards names unknown reward 'no_such_reward'"),
    ("init_from=null", "the KL reference is the stage's starting weights: set init_from="),
    ("rl.eval.files=[/no/such/held.jsonl]", "rl.eval.files: /no/such/held.jsonl not found"),
])
def test_bad_config_fails_before_launch(tmp_path, arith_task, mini_tokenizer_dir, override, message):
    from data_pipeline.corpus import addition_problems

    write_jsonl(tmp_path / "rl.jsonl", addition_problems(4, 2, seed=3))
    start = [] if override.startswith("init_from=") else [f"init_from={arith_task / 'base'}"]
    args = (tmp_path, mini_tokenizer_dir, tmp_path / "rl.jsonl", "stage.init_from=null", *start, override)
    if override != "rl.grpo.kl_estimator=k9":   # in this process: recipes.train.validate
        assert message in config_error(rl_command(*args))
        return
    proc = rl(*args, check=False)   # one real launch: exit code 2 and one stderr line
    assert message in cli_error(proc)
