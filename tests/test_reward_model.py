"""Model-based rewards: the reward model (value head on a Qwen3 GPTModel) and the judge.

The model work runs once, in a child process (`python -m tests.test_reward_model OUT TOK`,
the `__main__` block below), because megatron-core on CPU needs a process group and the
CPU compatibility layer, which the test process itself should not carry. It builds a
random `tiny` model, fits the value head to a rule (+1 when the sequence ends with token
X, -1 otherwise) and writes what the tests check to results.json.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

from model.config import ConfigError
from recipes.rewards import REWARDS, get_reward, reference_problem, safe_reward
from recipes.rewards import model_based as mb
from recipes.rewards.model_based import GenerativeJudge, parse_score
from tests.conftest import python_module, read_json

X = 4242            # the rewarded final token
TRAIN, HELD_OUT = 64, 64

MALFORMED = [None, "", "\x00\xff\ufffd garbage \x1b[2J", "<think> never closed", "</think></think>",
             "<|im_end|><|im_start|>user\nhi", "word " * 100_000]


# ----------------------------------------------------------------------------- the child process

def _sequences(n: int, seed: int) -> tuple[list[list[int]], list[float]]:
    """Random prompt+response ids of varied lengths (so batches pad); odd rows end with X.
    The negatives contain X elsewhere, so only its final position decides the class."""
    rng = random.Random(seed)
    seqs, targets = [], []
    for i in range(n):
        seq = [rng.randrange(100, 30_000) for _ in range(rng.randint(6, 20))]
        seq[rng.randrange(len(seq) - 1)] = X
        if i % 2:
            seq[-1] = X
        seqs.append(seq)
        targets.append(1.0 if i % 2 else -1.0)
    return seqs, targets


def _worker(out: Path, tokenizer_dir: str) -> None:
    from data_pipeline.tokenizer import load_tokenizer
    from model.builder import build_model
    from model.checkpoint import save_model
    from model.config import ParallelConfig, load_model_config
    from model.inference import forward_logits
    from model.parallel import init_distributed
    from recipes.rewards.model_based import ModelReward, RewardModel, fit_value_head, use_reward_model

    cfg = load_model_config("tiny")   # the real vocabulary, so the real tokenizer's ids fit
    init_distributed(ParallelConfig(), seed=3, model=cfg)
    save_model(build_model(cfg, ParallelConfig()), out / "lm", cfg)
    rm = RewardModel.from_checkpoint(out / "lm")
    res: dict = {}

    # The features are the decoder's output (after its final layernorm) in a full forward,
    # and the output layer maps them to the logits (tied embeddings).
    seq = _sequences(1, seed=9)[0][0]
    captured = []
    hook = rm.gpt.decoder.register_forward_hook(lambda m, i, o: captured.append(o))
    logits = forward_logits(rm.chunks, torch.tensor([seq]))[0, -1]
    hook.remove()
    feature = rm.features([seq])[0]
    res["hook_diff"] = float((captured[0][-1, 0] - feature).abs().max())
    embedding = rm.gpt.embedding.word_embeddings.weight
    res["logits_diff"] = float((feature @ embedding.T - logits).abs().max())
    res["logits_scale"] = float(logits.abs().max())

    train, train_y = _sequences(TRAIN, seed=0)
    held, held_y = _sequences(HELD_OUT, seed=1)
    res["train_rmse"] = fit_value_head(rm, train, train_y, l2=1e-3)
    res["held_y"] = held_y
    res["scores"] = rm.score(held, batch_size=8)
    res["scores_one_by_one"] = rm.score(held, batch_size=1)
    rm.save(out / "rm")
    loaded = RewardModel.load(out / "rm")
    res["scores_loaded"] = loaded.score(held, batch_size=8)
    res["info_loaded"] = loaded.info

    tok = load_tokenizer(tokenizer_dir)
    reward = ModelReward(loaded, tok, max_tokens=64)
    prompts = ["What is 2+2?", [{"role": "user", "content": "What is 2+2?"}], {"prompt": "What is 2+2?"}]
    res["prompt_forms"] = reward.score_batch(prompts, ["4"] * 3)
    use_reward_model(reward)
    registry = get_reward("reward_model")
    res["malformed"] = [safe_reward(registry, r, "Say something.") for r in MALFORMED]
    res["longest_tokens"] = max(len(reward.tokens("Say something.", r)) for r in MALFORMED)
    res["registry_vs_batch"] = [registry("4", "What is 2+2?"), res["prompt_forms"][0]]

    # Short: the prefill computes full-vocabulary logits at every prompt position.
    judge = GenerativeJudge(loaded.chunks, tok, max_new_tokens=4, max_prompt_tokens=128)
    judged = MALFORMED[::2]
    res["judge"] = judge.judge_batch(["What is 2+2?"] * len(judged), judged, ["4"] * len(judged))
    res["judge_counts"] = [judge.calls, judge.parse_failures]
    (out / "results.json").write_text(json.dumps(res))


# ----------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def trained(tmp_path_factory, qwen3_tokenizer_dir) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("reward_model")
    python_module("tests.test_reward_model", out, qwen3_tokenizer_dir)
    return out, read_json(out / "results.json")


def test_features_are_the_final_layernorm_state_at_the_last_token(trained):
    _, res = trained
    assert res["hook_diff"] < 1e-5
    assert res["logits_diff"] < 1e-4 * max(1.0, res["logits_scale"])


def test_fitted_head_separates_held_out_sequences(trained):
    _, res = trained
    pos = [s for s, y in zip(res["scores"], res["held_y"]) if y > 0]
    neg = [s for s, y in zip(res["scores"], res["held_y"]) if y < 0]
    auc = sum(p > n for p in pos for n in neg) / (len(pos) * len(neg))
    accuracy = sum((s > 0) == (y > 0) for s, y in zip(res["scores"], res["held_y"])) / len(res["held_y"])
    assert auc > 0.9 and accuracy > 0.8
    assert sum(pos) / len(pos) - sum(neg) / len(neg) > 1.0   # targets are 2 apart


def test_padding_does_not_change_scores(trained):
    _, res = trained
    assert res["scores"] == pytest.approx(res["scores_one_by_one"], abs=1e-5)


def test_save_load_roundtrip_gives_identical_scores(trained):
    out, res = trained
    assert res["scores_loaded"] == res["scores"]
    assert res["info_loaded"]["method"] == "ridge" and res["info_loaded"]["samples"] == TRAIN
    described = read_json(out / "rm" / mb.REWARD_MODEL_FILE)
    assert described["hidden_size"] == 128 and described["value_head"] == mb.VALUE_HEAD_FILE
    assert not (out / "rm.rm.tmp").exists()


def test_model_reward_scores_text_and_never_raises(trained):
    _, res = trained
    forms = res["prompt_forms"]
    assert forms[0] == pytest.approx(forms[1], abs=1e-6) and forms[0] == pytest.approx(forms[2], abs=1e-6)
    for value, error in res["malformed"]:
        assert error is None and math.isfinite(value)
    assert res["longest_tokens"] <= 64
    assert res["registry_vs_batch"][0] == pytest.approx(res["registry_vs_batch"][1], abs=1e-6)


def test_generative_judge_on_a_real_model_gives_a_score_in_range(trained):
    _, res = trained
    calls, failures = res["judge_counts"]
    assert calls == len(MALFORMED[::2]) and 0 <= failures <= calls
    assert all(0.0 <= s <= 1.0 for s in res["judge"])
    # A random model rarely writes a score; every failure must be a 0.0.
    assert sum(s == 0.0 for s in res["judge"]) >= failures


def _copy_rm(trained, tmp_path) -> Path:
    """The reward-model directory without its weights, which the head check never reaches."""
    out, _ = trained
    (tmp_path / "rm").mkdir()
    for name in ("metadata.json", "qwen3_model.json", mb.VALUE_HEAD_FILE):
        shutil.copy(out / "rm" / name, tmp_path / "rm" / name)
    return tmp_path / "rm"


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.unlink(), "has no value_head.pt"),
    (lambda p: p.write_bytes(b"\x00not a torch file"), "is not a readable value head"),
    (lambda p: p.write_bytes(p.read_bytes()[:40]), "is not a readable value head"),
    (lambda p: torch.save({"weight": torch.zeros(1, 7), "bias": torch.zeros(1)}, p), "hidden size 128"),
    (lambda p: torch.save({"weight": torch.zeros(1, 128)}, p), "hidden size 128"),
    (lambda p: torch.save({"weight": torch.full((1, 128), float("nan")), "bias": torch.zeros(1)}, p),
     "non-finite"),
])
def test_damaged_value_head_is_a_clear_error(trained, tmp_path, damage, message):
    rm_dir = _copy_rm(trained, tmp_path)
    damage(rm_dir / mb.VALUE_HEAD_FILE)
    # Checked before any model is built, so this runs without a process group.
    with pytest.raises(ConfigError, match=message):
        mb.RewardModel.load(rm_dir)


def test_a_directory_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not a reward-model directory"):
        mb.RewardModel.load(tmp_path)
    with pytest.raises(ConfigError, match="not a megatron-core model checkpoint"):
        mb.RewardModel.from_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- judge parsing

@pytest.mark.parametrize("reply, expected", [
    ("Score: 7/10", 0.7),
    ("score : 7 / 10", 0.7),
    ("**Score:** 8/10", 0.8),
    ("Score: 7.5/10", 0.75),
    ("Score: 10/10", 1.0),
    ("Score: 0/10", 0.0),
    ("Score: 3", 0.3),                                   # a bare score is out of 10
    ("Score:9", 0.9),
    ("Rating: 4 out of 5", 0.8),
    ("Score: 85%", 0.85),
    ("The answer is 42, which matches. Score: 9/10", 0.9),   # the label wins over later numbers
    ("Score: 2/10 at first... on reflection, Score: 6/10", 0.6),
    ("The response says 4, as the reference does. I give it 8 out of 10.", 0.8),
    ("Correct on both of 2 parts. Final: 9", 0.9),       # no label: the final number
    ("Score: 11/10", None),                              # out of range is no score
    ("Score: 7/0", None),
    ("Score: -2/10", None),                              # negative, and 10 is a denominator
    ("Score: N/10", None),                               # the template echoed back
    ("The response is correct.", None),
    ("", None),
    (None, None),
    (b"Score: 7/10", None),
    ("\x00\xff\ufffd", None),
    ("Score: " + "9" * 5000 + "/10", None),              # overflows to inf
    ("blah " * 200_000 + "Score: 6/10", 0.6),
])
def test_parse_score(reply, expected):
    got = parse_score(reply)
    assert got == (None if expected is None else pytest.approx(expected))


@pytest.fixture(scope="module")
def tok(qwen3_tokenizer_dir):
    from data_pipeline.tokenizer import load_tokenizer

    return load_tokenizer(qwen3_tokenizer_dir)


def test_judge_counts_parse_failures_and_scores_the_answer_only(monkeypatch, tok):
    import recipes.generate as gen

    replies = ["Score: 7/10", "I cannot tell.", "<think>maybe Score: 2/10</think>\n\nScore: 9/10"]
    seen = []

    def fake_generate(chunks, prompts, max_new_tokens, stop, **kw):
        seen.extend(prompts)
        assert stop == gen.stop_ids(tok) and kw.get("sampling") is None   # greedy
        return [gen.Generation(tokens=tok.encode(r, add_special_tokens=False)) for r in replies]

    monkeypatch.setattr(gen, "generate", fake_generate)
    judge = GenerativeJudge(None, tok)
    prompts = ["What is 2+2?", [{"role": "user", "content": "What is 3+3?"}], {"prompt": "What is 4+4?"}]
    scores = judge.judge_batch(prompts, ["<think>secret steps</think>\n\nIt is 4.", None, "8"], ["4", "6", 8])
    assert scores == pytest.approx([0.7, 0.0, 0.9])
    assert (judge.calls, judge.parse_failures) == (3, 1)
    first = tok.decode(seen[0])
    assert "What is 2+2?" in first and "It is 4." in first and "secret steps" not in first
    assert first.startswith("<|im_start|>user\n") and first.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "What is 3+3?" in tok.decode(seen[1]) and "What is 4+4?" in tok.decode(seen[2])
    assert "Reference answer:\n8\n" in tok.decode(seen[2])


def test_judge_prompt_is_bounded(tok):
    judge = GenerativeJudge(None, tok, max_prompt_tokens=256)
    ids = judge.judge_prompt("Q?", "word " * 100_000, "A")
    assert len(ids) == 256
    text = judge.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nYou are grading") and text.endswith("assistant\n<think>\n\n</think>\n\n")


def test_judge_template_must_name_its_fields():
    with pytest.raises(ConfigError, match="exactly the fields"):
        GenerativeJudge(None, None, template="Grade {response} please")


def test_registered_and_unconfigured_rewards_fail_softly():
    assert REWARDS["reward_model"] is mb.reward_model_reward and REWARDS["judge"] is mb.judge_reward
    mb.use_reward_model(None)
    mb.use_judge(None)
    value, error = safe_reward(get_reward("judge"), "4", {"prompt": "2+2?", "reference": "4"})
    assert value == 0.0 and "use_judge" in error


@pytest.mark.parametrize("name, reference, problem", [
    ("reward_model", "What is 2+2?", None),
    ("reward_model", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], None),
    ("reward_model", {"messages": [{"role": "user", "content": "2+2?"}]}, None),
    ("reward_model", None, "a prompt is text"),
    ("reward_model", [{"role": "system", "content": "Be brief."}], "no user turn"),
    ("judge", {"prompt": "2+2?", "reference": "4"}, None),
    ("judge", {"prompt": "2+2?"}, "a judge reference is"),
    ("judge", "4", "a judge reference is"),
    ("judge", {"prompt": 7, "reference": "4"}, "a prompt is text"),
])
def test_rows_without_a_usable_prompt_are_rejected_before_training(name, reference, problem):
    got = reference_problem(name, reference)
    assert got is None if problem is None else problem in got


class _FixedJudge:
    def judge(self, prompt, response, reference):
        return 1.0 if (prompt, response, reference) == ("2+2?", "4", "4") else 0.25


def test_judge_reward_passes_prompt_and_reference(monkeypatch):
    monkeypatch.setitem(mb._active, "judge", None)   # put back after the test
    mb.use_judge(_FixedJudge())
    assert get_reward("judge")("4", {"prompt": "2+2?", "reference": "4"}) == 1.0
    assert get_reward("judge")("5", {"prompt": "2+2?", "reference": "4"}) == 0.25
    assert get_reward("judge")("4", None) == 0.25   # a row without the dict still scores


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2])
