"""The parts the RL and distillation tasks are built from (recipes/rl_parts.py), on plain
data: no model, no process group. The end-to-end runs are tests/test_rl.py and
tests/test_distill.py."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest
import torch

from recipes.rl_parts import DataParallel, HeldOutSchedule, MicroBatcher, PromptStream, Rollout


def test_prompt_stream_shuffles_each_epoch_and_resumes_from_its_cursor():
    prompts = [f"p{i}" for i in range(10)]
    state = {"entropy_coef": 0.5}   # the Task's checkpointed state, shared with other keys
    stream = PromptStream(prompts, seed=7, state=state)
    drawn = stream.take(13)
    assert state == {"entropy_coef": 0.5, "prompt_cursor": 13}
    # epoch e is randperm(seed + e): the order older checkpoints' cursors index into
    for epoch, part in enumerate((drawn[:10], drawn[10:])):
        order = torch.randperm(10, generator=torch.Generator().manual_seed(7 + epoch))
        assert part == [prompts[int(i)] for i in order[:len(part)]]
    assert sorted(drawn[:10]) == sorted(prompts)

    saved = pickle.loads(pickle.dumps(state))   # a checkpoint ...
    uninterrupted = stream.take(12)
    restored = {}
    resumed = PromptStream(prompts, seed=7, state=restored)   # ... restored in place, as recipes.train does
    restored.update(saved)
    assert resumed.take(12) == uninterrupted
    assert restored["prompt_cursor"] == state["prompt_cursor"] == 25


def rollout(n: int, prompt_len: int = 3) -> Rollout:
    """n sequences: prompt [1, 2, 3], response of 1 + i % 4 tokens, the last one forced."""
    r = Rollout()
    for i in range(n):
        k = 1 + i % 4
        r.prompts.append(list(range(1, prompt_len + 1)))
        r.responses.append(SimpleNamespace(tokens=[10 + i] * k, logprobs=[-0.5 - i] * k,
                                           forced=[False] * (k - 1) + [True], finish="stop"))
    return r


def test_micro_batcher_tensors_are_padded_to_the_width_multiple():
    b = MicroBatcher(rollout_size=4, global_batch_size=4, micro_batch_size=2, width_multiple=4, dp=DataParallel())
    t = b.tensors(rollout(4))
    # longest: 3 + 4 tokens -> 6 input positions, padded to 8
    assert t["tokens"].shape == t["targets"].shape == t["loss_mask"].shape == t["rollout_logp"].shape == (4, 8)
    assert t["tokens"][3, :7].tolist() == [1, 2, 3, 13, 13, 13, 13] and t["targets"][3, :6].tolist() == [2, 3, 13,
                                                                                                         13, 13, 13]
    # targets of response tokens from position 2; the forced last token is not trained on
    assert t["loss_mask"][3].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert t["loss_mask"][0].tolist() == [0] * 8
    assert t["rollout_logp"][1, 2:4].tolist() == [-1.5, -1.5]


def test_micro_batcher_gives_each_rank_its_share_of_every_minibatch():
    """A rollout of 16 in minibatches of 8 at DP=2, micro-batches of 2: every row trained
    once per rollout, rank r's rows the r-th half of each minibatch, the rollout prepared
    once per index, and the loss scale adding up to the minibatch's aggregate."""
    t = {"tokens": torch.arange(16)[:, None].expand(16, 5).clone(), "loss_mask": torch.ones(16, 5)}
    t["loss_mask"][::3, 2:] = 0
    ranks = [MicroBatcher(16, 8, 2, 1, DataParallel(rank=r, size=2)) for r in range(2)]
    assert ranks[0].rows() == [0, 1, 2, 3, 8, 9, 10, 11] and ranks[1].rows() == [4, 5, 6, 7, 12, 13, 14, 15]
    prepared = []

    def prepare(index):
        prepared.append(index)
        return t

    for consumed in (0, 8, 16):
        for b in ranks:
            micro = b.batches(consumed, prepare, "token-mean")
            assert b.new_rollout == (consumed != 8)
            rows = [int(x) for m in micro for x in m["tokens"][:, 0]]
            start = consumed % 16
            assert rows == b.rows()[start // 2:start // 2 + 4]
            assert all(m["position_ids"].shape == (2, 5) for m in micro)
            minibatch = t["loss_mask"][start:start + 8].sum()
            # numerator * loss_scale summed over 2 ranks x 2 micro-batches, divided by 4
            # (megatron-core's micro-batch mean and DDP's average): numerator / minibatch tokens
            assert all(m["loss_scale"][0].item() == pytest.approx(4 / minibatch.item()) for m in micro)
        assert sum(m["denominator"].sum().item() for b in ranks for m in b.minibatch(t, consumed % 16, "token-mean")
                   ) == pytest.approx(minibatch.item())
    assert prepared == [0, 0, 1, 1]


def test_micro_batcher_trims_to_the_longest_row():
    b = MicroBatcher(4, 4, 2, 4, DataParallel())
    mask = torch.zeros(2, 16)
    mask[1, 3:5] = 1   # last loss position 4 -> width 5, padded to 8
    (out,) = b.trim([{"tokens": torch.zeros(2, 16), "loss_mask": mask}])
    assert out["tokens"].shape == (2, 8) and out["loss_mask"].sum() == 2


def test_held_out_schedule_runs_before_the_first_update_every_interval_and_after_the_last():
    calls = []

    def evaluate(updates):
        calls.append(updates)
        return {"eval": float(updates)}

    s = HeldOutSchedule(evaluate, interval=3, max_steps=7, global_batch_size=4)
    logged = {}
    for step in range(1, 8):
        s.start(4 * (step - 1))
        logged[step] = s.after_step({"consumed_samples": 4 * step})
    assert calls == [0, 3, 6, 7]
    assert logged[1] == {"eval": 0.0} and logged[3] == {"eval": 3.0} and logged[2] == {}
    # a resumed stage (consumed > 0) does not evaluate its starting point again
    s.start(8)
    assert s.after_step({"consumed_samples": 16}) == {} and calls == [0, 3, 6, 7]
    off = HeldOutSchedule(None, interval=1, max_steps=2, global_batch_size=4)
    off.start(0)
    assert off.after_step({"consumed_samples": 8}) == {}
