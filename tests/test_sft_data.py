"""SFT data: packing, skip counting, caching, and packed attention (logits equal to each
conversation run alone), plus the generation helper's thinking budget."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from data_pipeline import sft_data
from model.config import ConfigError
from tests.conftest import read_json, torchrun


def test_pack_fills_bins_without_overflow():
    lengths = [9, 3, 7, 1, 5, 5, 2, 8]
    bins = sft_data.pack(lengths, capacity=10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 4   # 40 tokens into bins of 10: best fit finds the optimum here


def test_assemble_segments_and_padding():
    triples = [(np.arange(3), np.arange(1, 4), np.array([0, 1, 1], np.uint8)),
               (np.arange(4), np.arange(1, 5), np.array([1, 1, 1, 1], np.uint8))]
    out = sft_data.assemble(triples, [[1, 0]], seq_length=9, pad_id=99)
    assert out["segment_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]
    assert out["tokens"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 99, 99]
    assert out["loss_mask"][0].tolist() == [1, 1, 1, 1, 0, 1, 1, 0, 0]


def test_segment_positions_restart():
    from model.packing import block_causal_mask, segment_positions

    seg = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0]]
    allowed = ~block_causal_mask(seg)[0, 0]
    assert allowed[4].tolist() == [False, False, False, True, True, False]
    assert allowed[2].tolist() == [True, True, True, False, False, False]


def _conv(user: str, answer: str, reasoning: str = "") -> dict:
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": answer, "reasoning_content": reasoning}]}


def test_build_counts_skipped_rows_and_caches(tmp_path, qwen3_tokenizer_dir):
    rows = [_conv("What is 1+1?", "2", "1+1=2"), _conv("Hi", "Hello"),
            _conv("Tell a long story", "word " * 200),                       # too long for 64 tokens
            {"messages": [{"role": "user", "content": "x"}]},               # no assistant turn
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
            {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    data, cache = sft_data.build([path], qwen3_tokenizer_dir, 64, tmp_path / "cache", progress=False)
    st = data.stats
    assert st["skipped"] == {"bad_json": 1, "bad_role": 1, "empty_assistant_turn": 1,
                             "no_assistant_turn": 1, "too_long": 1}
    assert st["conversations_used"] == 2 and st["conversations_read"] == 7
    assert len(data) == 1   # both short conversations share one packed row
    assert set(data.segment_ids[0].tolist()) == {0, 1, 2}
    assert 0 < st["packing_efficiency"] < 1
    assert st["packing_efficiency"] == pytest.approx((data.segment_ids[0] < 2).mean())
    # the same inputs and settings reuse the cache; other settings do not
    stamp = os.stat(cache / "tokens.npy").st_mtime_ns
    again, cache2 = sft_data.build([path], qwen3_tokenizer_dir, 64, tmp_path / "cache", progress=False)
    assert cache2 == cache and os.stat(cache / "tokens.npy").st_mtime_ns == stamp
    truncated, cache3 = sft_data.build([path], qwen3_tokenizer_dir, 64, tmp_path / "cache",
                                       overlength="truncate", progress=False)
    assert cache3 != cache and truncated.stats["conversations_used"] == 3
    assert "too_long" not in truncated.stats["skipped"]


def test_build_rejects_missing_file_and_empty_data(tmp_path, qwen3_tokenizer_dir):
    with pytest.raises(ConfigError, match="not found"):
        sft_data.build([tmp_path / "nope.jsonl"], qwen3_tokenizer_dir, 64, tmp_path, progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"messages": []}) + "\n")
    with pytest.raises(ConfigError, match="no usable SFT conversations"):
        sft_data.build([empty], qwen3_tokenizer_dir, 64, tmp_path, progress=False)


def test_samples_are_a_pure_function_of_index(tmp_path, qwen3_tokenizer_dir):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(_conv(f"q{i}", "a" * (i % 7 + 1))) + "\n" for i in range(20)))
    data, _ = sft_data.build([path], qwen3_tokenizer_dir, 32, tmp_path / "c", pack_rows=False, progress=False)
    a, b = sft_data.SFTSamples(data, seed=1), sft_data.SFTSamples(data, seed=1)
    order_a = [a[i]["tokens"].tolist() for i in range(45)]
    assert order_a == [b[i]["tokens"].tolist() for i in reversed(range(45))][::-1]
    first_epoch = sorted(map(tuple, order_a[:20]))
    assert first_epoch == sorted(tuple(r) for r in np.asarray(data.tokens).tolist())   # each row once per epoch


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "r.json"
    torchrun("tests/workers/packed.py", "--out", out)
    return read_json(out)


@pytest.mark.parametrize("case", ["tiny/tp1", "tiny/tp2", "tiny_moe/tp1"])
def test_packed_logits_equal_each_document_alone(packed, case):
    r = packed[case]
    assert r["logit_diff"] < 1e-5 * max(1.0, r["logit_scale"])
    assert r["loss_diff"] < 1e-5
    # the same row without the block mask differs: the check can fail
    assert r["unmasked_diff"] > 1e-2


def test_unpacked_rows_take_the_plain_causal_path_at_any_micro_batch(packed):
    """sft.data.pack=false: no batch carries segment_ids (which on the TE path mean THD,
    one row per micro-batch), and micro-batches of 2 rows give the loss of 1 row each."""
    r = packed["unpacked_sft"]
    assert not r["segment_ids"]
    assert r["loss_mbs2"] == pytest.approx(r["loss_mbs1"], rel=1e-6)


def test_unpacked_samples_need_no_thd():
    """The rows the SFT stage hands the model when unpacked: no segment_ids, positions
    0..seq-1, so model.packing's attention inputs stay (None, None) on the TE path too
    (thd_params would refuse two rows)."""
    from model.packing import attention_inputs
    from recipes.data import SampleBatches

    triples = [(np.arange(5), np.arange(1, 6), np.ones(5)), (np.arange(3), np.arange(1, 4), np.ones(3))]
    rows = sft_data.assemble(triples, [[0], [1]], 8, pad_id=0)
    for pack in (False, True):
        samples = sft_data.SFTSamples(sft_data.SFTData(**rows, stats={"pack": pack}), seed=0)
        batch = SampleBatches(samples, [], 2, 2, 0, 1)(0)[0]
        assert ("segment_ids" in batch) is pack
        if pack:
            assert batch["position_ids"][0].tolist() in ([0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3, 4])
            with pytest.raises(ValueError, match="micro_batch_size=1"):
                attention_inputs(batch["segment_ids"], use_te=True)
        else:
            assert batch["position_ids"].tolist() == [list(range(8))] * 2
            assert attention_inputs(batch.get("segment_ids"), use_te=True) == (None, None)


@pytest.fixture(scope="module")
def generations(tmp_path_factory, qwen3_tokenizer_dir):
    out = tmp_path_factory.mktemp("gen") / "r.json"
    torchrun("tests/workers/generation.py", "--tokenizer", qwen3_tokenizer_dir, "--out", out)
    return read_json(out)


def _thinking_tokens_before_stop(prompt: list[int], gen: dict, think_open: int = 151667) -> int:
    full = prompt + gen["tokens"]
    first_forced = len(prompt) + gen["forced"].index(True)
    opened = max(i for i in range(first_forced) if full[i] == think_open)
    return first_forced - opened - 1


@pytest.mark.parametrize("budget", [6, 1])
def test_thinking_budget_inserts_stop_phrase_at_exactly_n_tokens(generations, budget):
    g = generations["tp1"][f"budget{budget}"][0]
    phrase = generations["stop_phrase"]
    assert g["budget_stopped"]
    assert _thinking_tokens_before_stop(generations["prompt_thinking"], g) == budget
    start = g["forced"].index(True)
    forced = g["tokens"][start:start + len(phrase)]
    assert forced == phrase[:len(forced)]
    assert all(g["forced"][start:start + len(forced)]) and not any(g["forced"][:start])


def test_no_budget_and_non_thinking_prompts_are_left_alone(generations):
    assert not any(generations["tp1"]["nobudget"][0]["forced"])
    plain = generations["tp1"]["budget6"][1]   # enable_thinking=False: the think block is closed
    assert not any(plain["forced"]) and not plain["budget_stopped"]
    assert generations["prompt_plain"][-6:] != generations["prompt_thinking"][-6:]


def _same_generations(runs_a: list[dict], runs_b: list[dict], name: str) -> None:
    assert len(runs_a) == len(runs_b), name
    for a, b in zip(runs_a, runs_b):
        assert a["tokens"] == b["tokens"], name
        assert np.allclose(a["logprobs"], b["logprobs"], atol=1e-4), name


def test_generation_same_at_tp2_and_logprobs_valid(generations):
    assert generations["tp2"]["kv_cache_usable"]   # sequence parallelism off for the decode
    for name, runs in generations["tp2"].items():
        if name != "kv_cache_usable":
            _same_generations(generations["tp1"][name], runs, name)
            assert all(lp <= 1e-6 for g in generations["tp1"][name] for lp in g["logprobs"])
    s1, s2 = generations["tp1"]["sampled"]
    assert s1["tokens"] != s2["tokens"]   # sampling, not greedy


@pytest.mark.parametrize("name", ["budget6", "mixed"])
def test_kv_cache_equals_recompute_for_prompts_of_different_lengths(generations, name):
    tp1 = generations["tp1"]
    assert tp1["kv_cache_usable"]
    lengths = {len(p) for p in (generations["prompt_mixed"] if name == "mixed"
                                else [generations["prompt_thinking"], generations["prompt_plain"]])}
    assert len(lengths) == len(tp1[name])   # every row's prompt has its own length
    _same_generations(tp1[name], tp1[f"{name}_recompute"], name)


@pytest.mark.parametrize("layout,reference,cached", [("pp2", "tp1", True),
                                                     ("tiny_moe/ep2", "tiny_moe/tp1", True)])
def test_greedy_rollouts_same_under_pp2_and_ep2(generations, layout, reference, cached):
    assert generations[layout]["kv_cache_usable"] is cached
    assert generations[reference]["kv_cache_usable"]
    _same_generations(generations[reference]["mixed"], generations[layout]["mixed"], layout)
    for g in generations[layout]["mixed"]:
        assert len(g["tokens"]) == len(g["logprobs"]) == 16
        # the random dense model mostly repeats a token, but its log-probs move from step to
        # step, so a layout that saw a wrong prefix would not match them
        assert np.ptp(g["logprobs"]) > 1e-2
    # the MoE model has other weights: its tokens differ from the dense model's
    assert generations["tiny_moe/tp1"]["mixed"][0]["tokens"] != generations["tp1"]["mixed"][0]["tokens"]


@pytest.mark.parametrize("name", ["mixed", "sampled"])
def test_fp8_decode_pads_the_batch_and_keeps_the_prompts_results(generations, name):
    """With the model configured for FP8 the KV-cache decode runs 16 rows (3 or 2 prompts
    plus idle ones); the prompts' first 8 tokens are those of the unpadded batch (sampling
    draws for the real rows only) and their log-probs agree to fp32 rounding."""
    run = generations["tp1"]
    assert run["fp8_rows"] == [16]
    for ref, got in zip(run[name], run[f"{name}_fp8"], strict=True):
        n = len(got["tokens"])
        assert n == min(len(ref["tokens"]), 8) and got["tokens"] == ref["tokens"][:n]
        assert got["logprobs"] == pytest.approx(ref["logprobs"][:n], abs=1e-5)


def test_decode_rows_pad_to_the_fp8_multiple():
    from types import SimpleNamespace

    from model.inference import decode_rows

    def cfg(fp8, recipe="delayed"):
        return SimpleNamespace(fp8=fp8, fp8_recipe=recipe)

    assert [decode_rows(cfg(None), n) for n in (1, 3, 17)] == [1, 3, 17]
    assert [decode_rows(cfg("e4m3"), n) for n in (1, 16, 17)] == [16, 16, 32]
    assert decode_rows(cfg("e4m3", "mxfp8"), 3) == 32   # MXFP8 scales blocks of 32


def test_pick_top_k_and_top_p():
    from recipes.generate import Sampling, _pick

    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    ids, _ = _pick(logits, Sampling(temperature=1.0, top_k=2), g)
    assert set(ids.tolist()) == {1, 3}
    ids, _ = _pick(logits, Sampling(temperature=1.0, top_p=0.5), g)   # token 1 alone has p > 0.5
    assert set(ids.tolist()) == {1}
    ids, logp = _pick(logits[:1], Sampling(), g)
    assert ids.tolist() == [1] and logp.item() == pytest.approx(torch.log_softmax(logits[0], -1)[1].item())


def test_pick_draws_follow_the_tempered_distribution():
    """The inverse-CDF sampler: frequencies match softmax(logits / T) on a real-size
    vocabulary, tokens without mass (top-k) are never drawn, and a seed repeats its draws."""
    from recipes.generate import Sampling, _pick

    vocab, rows, rounds = 151936, 250, 16   # 4,000 draws (the tolerance is 2.6 sigma), 250 x vocab floats at a time
    marked = torch.tensor([5, 70000, vocab - 1])   # the last row too: off-by-one bait
    logits = torch.full((vocab,), -30.0)
    logits[marked] = torch.tensor([1.0, 0.0, 2.0])
    logits = logits.repeat(rows, 1)
    for temperature in (1.0, 0.5):
        expected = torch.softmax(logits[0] / temperature, -1)[marked]
        g = torch.Generator().manual_seed(1)
        draws = [_pick(logits, Sampling(temperature=temperature), g) for _ in range(rounds)]
        ids, logp = torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])
        freq = torch.stack([(ids == k).float().mean() for k in marked])
        assert torch.allclose(freq, expected, atol=0.02), (temperature, freq, expected)
        assert torch.allclose(logp.exp(), expected[torch.searchsorted(marked, ids)])
    ids, _ = _pick(logits, Sampling(temperature=1.0, top_k=2), torch.Generator().manual_seed(2))
    assert set(ids.tolist()) == {5, vocab - 1}
    again, _ = _pick(logits, Sampling(temperature=1.0, top_k=2), torch.Generator().manual_seed(2))
    assert torch.equal(ids, again)
