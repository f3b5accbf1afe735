"""The GRPO objective: group advantages, clipped surrogate, KL estimators, entropy, and
loss aggregation. Pure tensor math, no model and no distributed state, so that every
formula is checked on fixed tensors (tests/test_grpo.py); recipes/rl.py applies it.

Per response token t of sequence i in a group of G samples of one prompt:

    A_i        = (r_i - mean(r_group)) / (std(r_group) + eps)      (std optional)
    ratio      = exp(logp - old_logp)
    pg         = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
    dual clip  : for A < 0, pg = min(pg, -c * A)                   (when dual_clip c is set)
    TIS weight = min(exp(old_logp - rollout_logp), tis_cap)        (detached; 1 when tis_cap is null)
    loss_t     = w * pg + kl_coef * KL_t - entropy_coef * H_t

`std` is the population std of the group (torch.std(unbiased=False)), so a group of two
rewards {0, 1} has advantages {-1, +1} up to eps.

KL to the reference policy, with d = ref_logp - logp on the sampled token:
    k1 = -d,   k2 = d^2 / 2,   k3 = exp(d) - d - 1   (k3: unbiased and always >= 0).

Aggregation over a minibatch, with m the response-token mask:
    token-mean          : sum_i sum_t m*l / sum_i sum_t m
    seq-mean-token-mean : mean_i (sum_t m*l / sum_t m)
    seq-mean-token-sum  : mean_i (sum_t m*l)
A minibatch is cut into micro-batches and data-parallel ranks, so the loss is written
as a numerator summed over micro-batches and a denominator of the whole minibatch
(`loss_terms` and `loss_denominator`); their ratio is the aggregated loss, which
`scale_to_minibatch` and `scaled_loss` hand to megatron-core's schedule (distillation
scales its token mean the same way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import ConfigError

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


@dataclass
class GRPOConfig:
    # Rollout: prompts per rollout and samples per prompt (G). A rollout of
    # prompts_per_rollout * group_size sequences is cut into optimizer minibatches of
    # trainer.global_batch_size sequences: more than one is off-policy (PPO-style) updates.
    prompts_per_rollout: int = 64
    group_size: int = 16
    max_new_tokens: int = 1024
    enable_thinking: bool = True
    thinking_budget: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # Advantages
    normalize_std: bool = True
    eps: float = 1e-6
    # Clipped surrogate: 1 - clip_low <= ratio <= 1 + clip_high (clip-higher: high > low);
    # dual_clip c > 1 bounds the loss of negative-advantage tokens at -c * A.
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = None
    # KL to the frozen reference (the stage's starting weights); kl_coef 0 or reference
    # false builds no reference model.
    reference: bool = True
    kl_coef: float = 0.001
    kl_estimator: str = "k3"
    # Entropy bonus; with entropy_target set, a controller moves the coefficient by
    # entropy_lr * (target - entropy) each step (within [0, entropy_coef_max]) so that
    # entropy is held at the target instead of collapsing.
    entropy_coef: float = 0.0
    entropy_target: float | None = None
    entropy_lr: float = 0.01
    entropy_coef_max: float = 0.1
    loss_agg: str = "token-mean"
    # Dynamic sampling: groups whose rewards are all equal carry no signal; drop them and
    # sample more prompts to refill the rollout, up to this many extra rounds.
    dynamic_sampling: bool = True
    max_sampling_rounds: int = 3
    # Old log-probs for the ratio: recomputed by the training forward before the first
    # update (true), or the rollout's own (false). Truncated importance sampling caps
    # exp(old - rollout) at tis_cap (null: off) to correct a rollout engine whose numerics
    # differ from training's (bf16 kernels, an external vLLM).
    recompute_old_logprobs: bool = True
    tis_cap: float | None = 2.0

    def problems(self) -> list[str]:
        p = []
        for name in ("prompts_per_rollout", "group_size", "max_new_tokens", "max_sampling_rounds"):
            low = 0 if name == "max_sampling_rounds" else 1
            if getattr(self, name) < low:
                p.append(f"rl.grpo.{name}={getattr(self, name)} must be >= {low}")
        if self.group_size < 2:
            p.append(f"rl.grpo.group_size={self.group_size} must be >= 2 (advantages compare samples of a prompt)")
        if self.kl_estimator not in KL_ESTIMATORS:
            p.append(f"rl.grpo.kl_estimator={self.kl_estimator!r} must be one of {', '.join(KL_ESTIMATORS)}")
        if self.loss_agg not in AGGREGATIONS:
            p.append(f"rl.grpo.loss_agg={self.loss_agg!r} must be one of {', '.join(AGGREGATIONS)}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            p.append(f"rl.grpo.clip_low={self.clip_low} must be in [0, 1) and clip_high={self.clip_high} >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1:
            p.append(f"rl.grpo.dual_clip={self.dual_clip} must be > 1 (or null)")
        if self.tis_cap is not None and self.tis_cap < 1:
            p.append(f"rl.grpo.tis_cap={self.tis_cap} must be >= 1 (or null)")
        if self.temperature <= 0:
            p.append(f"rl.grpo.temperature={self.temperature} must be > 0: GRPO needs sampled groups")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            p.append(f"rl.grpo.top_p={self.top_p} must be in (0, 1] and top_k={self.top_k} >= 0")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            p.append("rl.grpo.kl_coef and entropy_coef must be >= 0")
        if self.thinking_budget is not None and self.thinking_budget < 0:
            p.append(f"rl.grpo.thinking_budget={self.thinking_budget} must be >= 0 (or null)")
        return p

    @property
    def uses_reference(self) -> bool:
        return self.reference and self.kl_coef > 0


def group_advantages(rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """[groups, G] rewards -> [groups, G] advantages."""
    centered = rewards - rewards.mean(-1, keepdim=True)
    if not normalize_std:
        return centered
    return centered / (rewards.std(-1, unbiased=False, keepdim=True) + eps)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs."""
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown KL estimator {estimator!r}")


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      clip_low: float, clip_high: float, dual_clip: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token policy loss, per-token 1.0 where clipping decided the loss)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    was_clipped = clipped < unclipped
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
        was_clipped = was_clipped | dual
    return loss, was_clipped.float()


def tis_weight(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Truncated importance weight of the training policy against the rollout engine's;
    a null cap turns the correction off (weight 1), as `GRPOConfig.tis_cap` documents: an
    uncapped ratio is the variance TIS exists to bound."""
    if cap is None:
        return torch.ones_like(old_logp)
    return torch.exp(old_logp - rollout_logp).clamp(max=cap).detach()


def loss_terms(per_token: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """This micro-batch's share of the aggregated loss's numerator ([b, s] -> scalar)."""
    mask = mask.to(per_token.dtype)
    if mode == "token-mean":
        return (per_token * mask).sum()
    per_seq = (per_token * mask).sum(-1)
    if mode == "seq-mean-token-sum":
        return per_seq.sum()
    if mode == "seq-mean-token-mean":
        return (per_seq / mask.sum(-1).clamp(min=1)).sum()
    raise ValueError(f"unknown loss aggregation {mode!r}")


def loss_denominator(mask: torch.Tensor, mode: str) -> float:
    """The whole minibatch's denominator: its response tokens, or its sequences."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}")
    return float(mask.sum()) if mode == "token-mean" else float(mask.shape[0])


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The aggregated loss of one whole minibatch."""
    return loss_terms(per_token, mask, mode) / max(loss_denominator(mask, mode), 1.0)


def scale_to_minibatch(micro: list[dict], denominator: float, dp_size: int) -> list[dict]:
    """This rank's micro-batches, each given the `loss_scale` that makes the sum of their
    loss numerators, over every micro-batch and data-parallel rank, divided by the whole
    minibatch's `denominator` the objective, and each row's share of `denominator` (for
    the logged loss). Every rank holds the same number of micro-batches and rows.

    Why the scale: megatron-core divides each micro-batch's loss by its token count and
    the micro-batch count, and DDP averages over data-parallel ranks; a loss_fn returning
    (numerator * loss_scale, 1) undoes all three, where (sum, tokens) would optimise the
    mean of per-micro-batch means instead (tokens of sparse micro-batches weigh more)."""
    parts = len(micro) * dp_size
    for batch in micro:
        rows = len(batch["loss_mask"])
        batch["loss_scale"] = torch.full((rows,), parts / max(denominator, 1.0))
        batch["denominator"] = torch.full((rows,), denominator / (parts * rows))
    return micro


def scaled_loss(numerator: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, token count) for megatron-core from a micro-batch of `scale_to_minibatch`
    and its numerator, and the "lm loss" report entry [numerator, share of denominator]."""
    return (numerator * batch["loss_scale"][0], torch.ones((), dtype=torch.int),
            torch.stack([numerator.detach(), batch["denominator"].sum()]))


def next_entropy_coef(coef: float, entropy: float, g: GRPOConfig) -> float:
    """The entropy controller: raise the bonus while entropy is under the target."""
    if g.entropy_target is None:
        return coef
    return min(max(coef + g.entropy_lr * (g.entropy_target - entropy), 0.0), g.entropy_coef_max)


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[groups] bool: groups whose rewards are not all equal (dynamic sampling keeps these)."""
    return (rewards.max(-1).values - rewards.min(-1).values) > 0


def check(g: GRPOConfig) -> GRPOConfig:
    problems = g.problems()
    if problems:
        raise ConfigError("; ".join(problems))
    return g
