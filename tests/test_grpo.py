"""The GRPO objective on fixed tensors, against values worked out by hand (recipes/grpo.py),
and the RL loss wired into the training step (vocab-parallel log-probs at TP=2, micro-batch
and data-parallel scaling) against plain torch in a 2-process gloo worker."""

from __future__ import annotations

import json
import math

import pytest
import torch

from recipes import grpo
from recipes.grpo import GRPOConfig
from tests.conftest import torchrun


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 1.0, 1.0]])
    adv = grpo.group_advantages(rewards, normalize_std=True, eps=0.0)
    # group 1: mean 0.5, population std 0.5; group 2: std 0 -> 0/(0+eps) needs eps, see below;
    # group 3: mean 1, std sqrt(0.5)
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    s = math.sqrt(0.5)
    assert torch.allclose(adv[2], torch.tensor([1 / s, -1 / s, 0.0, 0.0]))
    assert torch.equal(grpo.group_advantages(rewards, eps=1e-6)[1], torch.zeros(4))
    assert torch.allclose(grpo.group_advantages(rewards, normalize_std=False)[0],
                          torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert torch.allclose(grpo.group_advantages(rewards, eps=1.0)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / 1.5)


def test_clipped_surrogate_by_hand():
    # ratios 1.5, 0.5, 0.5, 1.5, 4 with advantages +1, +1, -1, -1, -1; clip 0.2 / 0.28
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5, 4.0])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0])
    old = torch.zeros(5)
    loss, clipped = grpo.clipped_surrogate(ratio.log(), old, adv, 0.2, 0.28)
    # +1: min(1.5, 1.28) = 1.28 (clipped); min(0.5, 0.8) = 0.5
    # -1: min(-0.5, -0.8) = -0.8 (clipped); min(-1.5, -1.28) = -1.5; min(-4, -1.28) = -4
    assert torch.allclose(loss, torch.tensor([-1.28, -0.5, 0.8, 1.5, 4.0]))
    assert clipped.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0]
    # dual clip c=3 bounds the negative-advantage loss at 3 * |A|
    loss, clipped = grpo.clipped_surrogate(ratio.log(), old, adv, 0.2, 0.28, dual_clip=3.0)
    assert torch.allclose(loss, torch.tensor([-1.28, -0.5, 0.8, 1.5, 3.0]))
    assert clipped.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    # symmetric clipping (clip-higher off) clips the first token at 1.2
    assert grpo.clipped_surrogate(ratio.log(), old, adv, 0.2, 0.2)[0][0].item() == pytest.approx(-1.2)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    d = math.log(0.5)   # ref - logp
    assert grpo.kl_penalty(logp, ref, "k1").item() == pytest.approx(-d)
    assert grpo.kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * d * d)
    assert grpo.kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - d - 1)   # 0.19315
    assert grpo.kl_penalty(ref, ref, "k3").item() == 0.0
    # k3 is an unbiased estimate of KL(p || q): its mean under samples from p is the KL
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    expected = (p * (p / q).log()).sum()
    k3 = grpo.kl_penalty(p.log(), q.log(), "k3")
    assert (p * k3).sum().item() == pytest.approx(expected.item(), rel=1e-6)


def test_loss_aggregation_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert grpo.aggregate(per_token, mask, "token-mean").item() == pytest.approx(7 / 3)
    assert grpo.aggregate(per_token, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)
    assert grpo.aggregate(per_token, mask, "seq-mean-token-sum").item() == pytest.approx((3 + 4) / 2)
    # numerators add over micro-batches: two halves give the whole batch's aggregate
    for mode in grpo.AGGREGATIONS:
        parts = sum(grpo.loss_terms(per_token[i:i + 1], mask[i:i + 1], mode) for i in range(2))
        assert (parts / grpo.loss_denominator(mask, mode)).item() == pytest.approx(
            grpo.aggregate(per_token, mask, mode).item())


def test_whole_objective_by_hand():
    """Advantages, clipped loss, k3 KL and token-mean on one fixed group, end to end."""
    rewards = torch.tensor([[1.0, 0.0]])                       # advantages +1, -1
    adv = grpo.group_advantages(rewards, eps=0.0).reshape(-1, 1)
    logp = torch.log(torch.tensor([[0.6, 0.3], [0.2, 0.5]]))
    old = torch.log(torch.tensor([[0.4, 0.3], [0.4, 0.5]]))   # ratios 1.5, 1 / 0.5, 1
    ref = torch.log(torch.tensor([[0.3, 0.3], [0.2, 0.25]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    pg, _ = grpo.clipped_surrogate(logp, old, adv, 0.2, 0.28)
    kl = grpo.kl_penalty(logp, ref, "k3")
    loss = grpo.aggregate(pg + 0.1 * kl, mask, "token-mean")
    # pg: seq 1 (A=+1): -1.28, -1 ; seq 2 (A=-1): ratio 0.5 -> -min(-0.5, -0.8) = 0.8
    # k3 with d = ref - logp: [ln .5, 0], [0, ln .5]: exp(d) - d - 1 = 0.5 - ln .5 - 1 = 0.193147
    k = 0.5 - math.log(0.5) - 1
    expected = ((-1.28 + 0.1 * k) + (-1.0) + 0.8) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_tis_weight_and_dynamic_sampling():
    old, rollout = torch.log(torch.tensor([0.5, 0.5, 0.1])), torch.log(torch.tensor([0.25, 0.5, 0.5]))
    assert torch.allclose(grpo.tis_weight(old, rollout, 1.5), torch.tensor([1.5, 1.0, 0.2]))
    assert torch.equal(grpo.tis_weight(old, rollout, None), torch.ones(3))   # null: off, as documented
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.5, 0.25]])
    assert grpo.informative_groups(rewards).tolist() == [False, True, False, True]


def test_entropy_controller_moves_toward_target():
    g = GRPOConfig(entropy_target=0.5, entropy_lr=0.1, entropy_coef_max=0.05)
    assert grpo.next_entropy_coef(0.0, 0.3, g) == pytest.approx(0.02)    # below target: raise
    assert grpo.next_entropy_coef(0.02, 0.9, g) == 0.0                   # above: lower, not < 0
    assert grpo.next_entropy_coef(0.04, 0.0, g) == 0.05                  # capped
    assert grpo.next_entropy_coef(0.01, 0.0, GRPOConfig()) == 0.01       # no target: fixed


@pytest.mark.parametrize("field, value, message", [
    ("group_size", 1, "group_size=1 must be >= 2"),
    ("kl_estimator", "k4", "kl_estimator='k4'"),
    ("loss_agg", "sum", "loss_agg='sum'"),
    ("dual_clip", 0.5, "dual_clip=0.5 must be > 1"),
    ("temperature", 0.0, "temperature=0.0 must be > 0"),
    ("tis_cap", 0.5, "tis_cap=0.5"),
])
def test_bad_settings_are_named(field, value, message):
    from model.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        grpo.check(GRPOConfig(**{field: value}))


@pytest.fixture(scope="module")
def wiring(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "wiring.json"
    torchrun("tests/workers/grpo.py", "--out", out)
    return json.loads(out.read_text())


def test_vocab_parallel_logprobs_and_entropy_match_torch(wiring):
    """TP=2 halves of the vocabulary give plain torch's log-softmax, entropy and gradients,
    with the padded rows past the tokenizer left out."""
    for key in ("logp", "entropy", "grad"):
        assert wiring[f"{key}_max_error"] < 1e-5, key
    assert wiring["logp_range"] > 1.0   # the check is not on trivial values


def test_rl_loss_micro_batches_add_up_to_the_aggregate(wiring):
    """MicroBatcher.batches + grpo_loss (GRPOTask's batches and loss) over the micro-batches
    of a minibatch, as megatron-core scales them, equal the objective computed directly in plain torch, per aggregation."""
    for mode, (ours, reference) in wiring["objective"].items():
        assert ours == pytest.approx(reference, rel=1e-5, abs=1e-7), mode
    assert len({round(v[1], 6) for v in wiring["objective"].values()}) == 3   # modes differ
