"""torchrun worker (2 processes, TP=2): the RL loss's pieces against plain torch.

    torchrun --nproc-per-node 2 tests/workers/grpo.py --out R.json

1. `target_logprobs_and_entropy` on each rank's half of fixed logits (vocabulary 10, the
   last row padding) against log_softmax over the full 9-token vocabulary: values and the
   gradient each rank's slice receives.
2. `MicroBatcher.batches` (recipes/rl_parts.py, what `GRPOTask.batches` calls) cuts a
   fixed rollout into micro-batches and `recipes.rl.grpo_loss` (`GRPOTask.loss`) scores
   them; summed the way megatron-core's schedule scales them (divide by the micro-batch
   count), they must equal the objective written out below in plain torch, for each
   aggregation mode. The reference is deliberately not built from recipes/grpo.py.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model.config import ParallelConfig  # noqa: E402
from model.parallel import destroy_distributed, init_distributed  # noqa: E402

V, LIMIT, T = 10, 9, 0.7


def reference_logp_entropy(logits, targets):
    z = logits[..., :LIMIT] / T
    logsm = torch.log_softmax(z, -1)
    return logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logsm.exp() * logsm).sum(-1)


def check_logprobs(rank: int) -> dict:
    from model.inference import target_logprobs_and_entropy

    g = torch.Generator().manual_seed(0)
    full = torch.randn(2, 3, V, generator=g) * 3
    targets = torch.randint(0, LIMIT, (2, 3), generator=g)
    w1, w2 = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    local = full[..., rank * V // 2:(rank + 1) * V // 2].clone().requires_grad_(True)
    logp, ent = target_logprobs_and_entropy(local, targets, T, LIMIT)
    ((logp * w1).sum() + (ent * w2).sum()).backward()
    ref_in = full.clone().requires_grad_(True)
    ref_logp, ref_ent = reference_logp_entropy(ref_in, targets)
    ((ref_logp * w1).sum() + (ref_ent * w2).sum()).backward()
    ref_grad = ref_in.grad[..., rank * V // 2:(rank + 1) * V // 2]
    return {"logp_max_error": (logp - ref_logp).abs().max().item(),
            "entropy_max_error": (ent - ref_ent).abs().max().item(),
            "grad_max_error": (local.grad - ref_grad).abs().max().item(),
            "logp_range": (ref_logp.max() - ref_logp.min()).item()}


def reference_objective(logits, t, g, mode) -> float:
    logp, ent = reference_logp_entropy(logits, t["targets"])
    ratio = torch.exp(logp - t["old_logp"])
    a = t["advantages"][:, None]
    pg = -torch.minimum(ratio * a, torch.clamp(ratio, 1 - g.clip_low, 1 + g.clip_high) * a)
    pg = pg * torch.clamp(torch.exp(t["old_logp"] - t["rollout_logp"]), max=g.tis_cap)
    d = t["ref_logp"] - logp
    per = pg + g.kl_coef * (torch.exp(d) - d - 1) - g.entropy_coef * ent
    m = t["loss_mask"]
    if mode == "token-mean":
        return ((per * m).sum() / m.sum()).item()
    if mode == "seq-mean-token-sum":
        return (per * m).sum(-1).mean().item()
    return ((per * m).sum(-1) / m.sum(-1)).mean().item()


def check_objective(rank: int) -> dict:
    from recipes.grpo import GRPOConfig
    from recipes.rl import grpo_loss
    from recipes.rl_parts import DataParallel, MicroBatcher

    g = torch.Generator().manual_seed(1)
    n, s = 4, 5
    logits = torch.randn(n, s, V, generator=g) * 2
    t = {"tokens": torch.randint(0, LIMIT, (n, s), generator=g),
         "targets": torch.randint(0, LIMIT, (n, s), generator=g),
         "loss_mask": torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0.0]]),
         "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5]),
         "rollout_logp": -torch.rand(n, s, generator=g) * 3}
    t["old_logp"] = t["rollout_logp"] + torch.randn(n, s, generator=g) * 0.3
    t["ref_logp"] = t["rollout_logp"] + torch.randn(n, s, generator=g) * 0.3
    out = {}
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        cfg = GRPOConfig(loss_agg=mode, kl_coef=0.05, entropy_coef=0.01, tis_cap=1.2, prompts_per_rollout=2,
                         group_size=2, temperature=T)
        batcher = MicroBatcher(rollout_size=n, global_batch_size=n, micro_batch_size=2, width_multiple=1,
                               dp=DataParallel())
        micro = batcher.batches(0, lambda index: t, cfg.loss_agg)   # the fixed rollout, as GRPOTask.batches
        total = 0.0
        for k, batch in enumerate(micro):
            rows = slice(2 * k, 2 * k + 2)
            local = logits[rows][..., rank * V // 2:(rank + 1) * V // 2]
            # the engine hands the loss the logits at the loss positions only (logits_at)
            loss, num_tokens, _ = grpo_loss(batch, local[batch["loss_mask"].bool()], cfg, cfg.entropy_coef, LIMIT)
            total += (loss / num_tokens.clamp(min=1) / len(micro)).item()   # megatron-core's scaling
        out[mode] = [total, reference_objective(logits, t, cfg, mode)]
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    init_distributed(ParallelConfig(tp=2, sp=False), seed=0)
    rank = dist.get_rank()
    result = {**check_logprobs(rank), "objective": check_objective(rank)}
    results = [None, None]
    dist.all_gather_object(results, result)
    if rank == 0:
        worst = {k: max(r[k] for r in results) for k in ("logp_max_error", "entropy_max_error", "grad_max_error")}
        Path(args.out).write_text(json.dumps({**results[0], **worst}))
    destroy_distributed()


if __name__ == "__main__":
    main()
