"""SFT stages end to end on CPU: a tiny Qwen3 learns a generated verifiable task.

The base model is a random HF Qwen3 converted with model.convert (so the stages are shown
to start from "any converted Qwen3 checkpoint"). Cold-start SFT trains it on two-digit
column addition with the digit sums in <think>; greedy answers on held-out problems
(pairs never seen in training) are scored with the math verifier (math-verify) before and
after. Thinking-mode fusion then starts from the cold-start stage by name.

Two choices make the task learnable within a CPU test (measured with the same model shape
and schedule, see the SFT issue's closing note):
- no column carries, so each answer digit is one digit sum (with carries the same budget
  reaches ~25% held-out exact match);
- `tiny` with untied embeddings. From a *random* init with the tied 151,936-row table,
  Adam pushes every row that never appears in the data the same way, and that shared
  drift also swamps the digits' own (input) embeddings: the model stops telling digits
  apart and answers with the training prior (4% exact match at this budget, against 93%
  untied; with a 30-row vocabulary, tied learns as fast). A pretrained base, as in the
  real pipeline, has no such problem.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter

import pytest

from recipes.run_log import read_metrics
from tests.conftest import make_hf_model, python_module, read_json, run

TRAIN_PROBLEMS, HELD_OUT = 1200, 40
STEPS = 150
# Every training conversation is 52 tokens (51 next-token positions): two fill a row exactly.
SFT_ARGS = ["model.tie_word_embeddings=false", "trainer.seq_length=102", "trainer.global_batch_size=8",
            "trainer.micro_batch_size=8", f"trainer.max_steps={STEPS}", f"trainer.save_interval={STEPS}",
            "trainer.log_interval=10", "optim.lr=3e-3", "optim.min_lr=3e-4", "optim.warmup_steps=5",
            "logging.progress=false", "logging.wandb.mode=disabled"]
# A well-formed Qwen3 thinking answer: the think block, then the answer in \boxed{}.
WELL_FORMED = re.compile(r"<think>\n[^<]+\n</think>\n\n\\boxed\{\d+\}")


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def task(tmp_path_factory, qwen3_tokenizer_dir):
    from data_pipeline.corpus import addition_problems

    root = tmp_path_factory.mktemp("sft")
    train = addition_problems(TRAIN_PROBLEMS, 2, seed=0, with_carries=False)
    held = addition_problems(HELD_OUT, 2, seed=1, exclude={tuple(r["pair"]) for r in train}, with_carries=False)
    _write_jsonl(root / "train.jsonl", train)
    _write_jsonl(root / "held.jsonl", held)
    hf = make_hf_model(root / "base_hf", "tiny", vocab_size=151936, weight_std=0.02, norm_std=0.0,
                       tie_word_embeddings=False)
    python_module("model.convert", "hf-to-mcore", "--hf-dir", hf, "--out", root / "base")
    return root


def sft(task, tokenizer, *overrides, check=True):
    cmd = [sys.executable, "-m", "recipes.sft", f"run.root={task / 'runs'}", "run.name=arith",
           f"sft.data.tokenizer={tokenizer}", *SFT_ARGS, *map(str, overrides)]
    return run(cmd, check=check, timeout=1200)


def evaluate(task, tokenizer, checkpoint, name) -> dict:
    """Greedy answers on the held-out problems: exact match (math verifier) and format rate."""
    from recipes.rewards.math import math_reward

    out = task / f"{name}.jsonl"
    python_module("recipes.generate", f"checkpoint={checkpoint}", f"tokenizer={tokenizer}",
                  f"input={task / 'held.jsonl'}", f"output={out}", "max_new_tokens=40", "batch_size=40",
                  "progress=false")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == HELD_OUT
    return {"exact_match": sum(math_reward(r["answer"], r["reference"]) for r in rows) / len(rows),
            "well_formed": sum(bool(WELL_FORMED.fullmatch(r["response"])) for r in rows) / len(rows)}


@pytest.fixture(scope="module")
def cold_start(task, qwen3_tokenizer_dir):
    sft(task, qwen3_tokenizer_dir, "stage=sft_cold_start", f"init_from={task / 'base'}",
        f"sft.data.files=[{task / 'train.jsonl'}]")
    return task / "runs" / "arith" / "sft_cold_start"


def test_cold_start_learns_the_task(task, qwen3_tokenizer_dir, cold_start):
    metrics = read_metrics(cold_start)
    steps = [metrics[k] for k in sorted(metrics)]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    first, last = (sum(m["loss"] for m in part) / len(part) for part in (steps[:5], steps[-5:]))
    assert last < 0.25 * first
    assert 0.5 < steps[-1]["data/packing_efficiency"] <= 1
    before = evaluate(task, qwen3_tokenizer_dir, task / "base", "before")
    after = evaluate(task, qwen3_tokenizer_dir, cold_start, "after")
    held = [json.loads(line) for line in (task / "held.jsonl").read_text().splitlines()]
    # What answering one fixed number would score: the bar for having read the operands.
    constant = max(Counter(r["reference"] for r in held).values()) / len(held)
    print(f"held-out: base {before}, after cold-start SFT {after}, best constant answer {constant}")
    (task / "accuracy.json").write_text(json.dumps({"before": before, "after": after, "constant": constant}))
    assert before["well_formed"] == 0
    assert after["well_formed"] >= 0.9
    assert after["exact_match"] >= 0.5
    assert after["exact_match"] >= max(before["exact_match"], constant) + 0.4


def test_fusion_starts_from_cold_start(task, qwen3_tokenizer_dir, cold_start):
    from data_pipeline.corpus import addition_problems

    rows = addition_problems(16, 2, seed=7)
    for r in rows[::2]:   # half non-thinking: flag and empty think block
        r["messages"][0]["content"] += " /no_think"
        r["messages"][1]["reasoning_content"] = ""
    _write_jsonl(task / "fusion.jsonl", rows)
    proc = sft(task, qwen3_tokenizer_dir, "stage=sft_fusion", "stage.init_from=sft_cold_start",
               "trainer.max_steps=2", "trainer.save_interval=2", "trainer.log_interval=1", "optim.warmup_steps=0",
               f"sft.data.files=[{task / 'fusion.jsonl'}]")
    final = cold_start / read_json(cold_start / "final.json")["checkpoint"]
    assert f"initialised sft_fusion from {final} (weights only)" in proc.stdout + proc.stderr
    assert read_json(task / "runs" / "arith" / "sft_fusion" / "final.json")["step"] == 2


@pytest.mark.parametrize("override, message", [
    ("sft.data.overlength=chop", "sft.data.overlength='chop' must be one of"),
    ("sft.data.files=[/nonexistent.jsonl]", "SFT data file(s) not found: /nonexistent.jsonl"),
    ("sft.data.tokenizer=/nonexistent", "tokenizer directory /nonexistent does not exist"),
])
def test_bad_config_fails_before_launch(task, qwen3_tokenizer_dir, override, message):
    proc = sft(task, qwen3_tokenizer_dir, "stage=sft_cold_start", "stage.init_from=null",
               f"sft.data.files=[{task / 'train.jsonl'}]", override, check=False)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], proc.stderr[-2000:]


def test_sft_stage_under_the_pretrain_entry_point_is_refused(task, qwen3_tokenizer_dir):
    proc = run([sys.executable, "-m", "recipes.pretrain", "stage=sft_cold_start", f"run.root={task / 'runs'}"],
               check=False)
    assert proc.returncode == 2
    assert "error: stage sft_cold_start is a sft stage; run it with python -m recipes.sft" in proc.stderr
