"""SFT stages end to end on CPU: a small Qwen3 learns a generated verifiable task.

The base model is a random HF Qwen3 (`mini`: tiny's body on the mini tokenizer's 4,096
ids, untied) converted with model.convert, so the stages are shown to start from "any
converted Qwen3 checkpoint". Cold-start SFT trains it on two-digit column addition with
the digit sums in <think>; greedy answers on held-out problems (pairs never seen in
training) are scored with the math verifier (math-verify) before and after. Thinking-mode
fusion then starts from the cold-start stage by name.

No column carries, so that each answer digit is one digit sum: the task is learnable in a
CPU test's budget. Measured held-out exact match (40 problems; QWEN3_TEST_SEED 0, 1, 2, 3):
150 steps 0.925, 0.25, 1.0, 0.975 (one seed in four had not learnt to read the operands
yet); 200 steps (STEPS) 1.0, 0.95, 1.0, 1.0. The bars (0.5, and the best constant answer
+ 0.4, about 0.475) sit more than 2x that spread (0.05) below the seed-0 value.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest

from recipes.run_log import read_metrics
from tests.conftest import (STEPS, arith_sft as sft, arith_sft_command, cli_error, config_error, evaluate, read_json,
                            run, write_jsonl as _write_jsonl)


@pytest.fixture(scope="module")
def task(arith_task):
    return arith_task


@pytest.fixture(scope="module")
def cold_start(arith_cold_start):
    return arith_cold_start


@pytest.mark.slow   # a learning test (README: "Learning tests")
def test_cold_start_learns_the_task(task, mini_tokenizer_dir, cold_start):
    metrics = read_metrics(cold_start)
    steps = [metrics[k] for k in sorted(metrics)]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    first, last = (sum(m["loss"] for m in part) / len(part) for part in (steps[:5], steps[-5:]))
    assert last < 0.25 * first
    assert 0.5 < steps[-1]["data/packing_efficiency"] <= 1
    before = evaluate(task, mini_tokenizer_dir, task / "base", "before")
    after = evaluate(task, mini_tokenizer_dir, cold_start, "after")
    held = [json.loads(line) for line in (task / "held.jsonl").read_text().splitlines()]
    # What answering one fixed number would score: the bar for having read the operands.
    constant = max(Counter(r["reference"] for r in held).values()) / len(held)
    print(f"held-out: base {before}, after cold-start SFT {after}, best constant answer {constant}")
    (task / "accuracy.json").write_text(json.dumps({"before": before, "after": after, "constant": constant}))
    assert before["well_formed"] == 0
    assert after["well_formed"] >= 0.9
    assert after["exact_match"] >= 0.5
    assert after["exact_match"] >= max(before["exact_match"], constant) + 0.4


def test_fusion_starts_from_cold_start(task, mini_tokenizer_dir, cold_start):
    from data_pipeline.corpus import addition_problems

    rows = addition_problems(16, 2, seed=7)
    for r in rows[::2]:   # half non-thinking: flag and empty think block
        r["messages"][0]["content"] += " /no_think"
        r["messages"][1]["reasoning_content"] = ""
    _write_jsonl(task / "fusion.jsonl", rows)
    proc = sft(task, mini_tokenizer_dir, "stage=sft_fusion", "stage.init_from=sft_cold_start",
               "trainer.max_steps=2", "trainer.save_interval=2", "trainer.log_interval=1", "optim.warmup_steps=0",
               f"sft.data.files=[{task / 'fusion.jsonl'}]")
    final = cold_start / read_json(cold_start / "final.json")["checkpoint"]
    assert f"initialised sft_fusion from {final} (weights only)" in proc.stdout + proc.stderr
    assert read_json(task / "runs" / "arith" / "sft_fusion" / "final.json")["step"] == 2


@pytest.mark.parametrize("override, message", [
    ("sft.data.overlength=chop", "sft.data.overlength='chop' must be one of"),
    ("sft.data.files=[/nonexistent.jsonl]", "SFT data file(s) not found: /nonexistent.jsonl"),
    ("tokenizer=/nonexistent", "tokenizer directory /nonexistent does not exist"),
])
def test_bad_config_fails_before_launch(task, mini_tokenizer_dir, override, message):
    args = (task, mini_tokenizer_dir, "stage=sft_cold_start", "stage.init_from=null",
            f"sft.data.files=[{task / 'train.jsonl'}]", override)
    if not override.startswith("sft.data.overlength"):   # in this process: recipes.train.validate
        assert message in config_error(arith_sft_command(*args))
        return
    proc = sft(*args, check=False)   # one real launch: exit code 2 and one stderr line
    assert message in cli_error(proc)


def test_sft_stage_under_the_pretrain_entry_point_is_refused(task, mini_tokenizer_dir):
    proc = run([sys.executable, "-m", "recipes.pretrain", "stage=sft_cold_start", f"run.root={task / 'runs'}"],
               check=False)
    assert proc.returncode == 2
    assert "error: stage sft_cold_start is a sft stage; run it with python -m recipes.sft" in proc.stderr
