"""torchrun worker (2 processes, TP=2): the distillation loss's pieces against plain torch.

    torchrun --nproc-per-node 2 tests/workers/distill.py --out R.json

Fixed logits over a vocabulary of 10 (the last row padding, as the model's padded
vocabulary past the tokenizer), each rank holding half:

1. `topk_logprobs` of the teacher's half against torch.topk of the full log_softmax.
2. `recipes.distill_loss.per_token` on the student's half, with the teacher's top k
   from (1), for every divergence, at k=4 and at k=9 (the whole vocabulary), against the
   formulas written out below in float64 on the full logits: values, and the gradient each
   rank's slice of the student logits receives. At k=9 the reference is the plain
   full-vocabulary divergence (no "rest" outcome), which the k+1 construction must equal.
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

V, LIMIT, T, BETA = 10, 9, 0.8, 0.3
CE_WEIGHT, KL_WEIGHT = 0.5, 2.0


def reference(student, teacher, targets, k, kind):
    """Per-token loss in float64 from the full logits."""
    s = torch.log_softmax(student.double()[..., :LIMIT] / T, -1)
    t = torch.log_softmax(teacher.double()[..., :LIMIT] / T, -1)
    top_t, ids = t.topk(k, -1)
    top_s = s.gather(-1, ids)
    if k < LIMIT:   # "every other token" as one more outcome
        p = torch.cat([top_t.exp(), 1 - top_t.exp().sum(-1, keepdim=True)], -1)
        q = torch.cat([top_s.exp(), 1 - top_s.exp().sum(-1, keepdim=True)], -1)
    else:
        p, q = t.exp(), s.exp()
    if kind == "forward":
        div = (p * (p.log() - q.log())).sum(-1)
    elif kind == "reverse":
        div = (q * (q.log() - p.log())).sum(-1)
    else:
        m = BETA * p + (1 - BETA) * q
        div = BETA * (p * (p.log() - m.log())).sum(-1) + (1 - BETA) * (q * (q.log() - m.log())).sum(-1)
    ce = -torch.log_softmax(student.double()[..., :LIMIT], -1).gather(-1, targets[:, None])[:, 0]
    return CE_WEIGHT * ce + KL_WEIGHT * T * T * div


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    init_distributed(ParallelConfig(tp=2, sp=False), seed=0)
    rank = dist.get_rank()
    from model.inference import topk_logprobs
    from recipes.distill_loss import DistillLoss, per_token

    g = torch.Generator().manual_seed(0)
    n = 6
    teacher = torch.randn(n, V, generator=g) * 2.5
    student = torch.randn(n, V, generator=g) * 2.0
    targets = torch.randint(0, LIMIT, (n,), generator=g)
    weights = torch.rand(n, generator=g) + 0.5
    half = slice(rank * V // 2, (rank + 1) * V // 2)
    result = {}

    values, ids = topk_logprobs(teacher[:, half], 4, T, LIMIT)
    ref_values, ref_ids = torch.log_softmax(teacher[:, :LIMIT] / T, -1).topk(4, -1)
    result["topk_ids_equal"] = bool((ids == ref_ids).all())
    result["topk_max_error"] = (values - ref_values).abs().max().item()

    for k in (4, LIMIT):
        t_logp, t_ids = topk_logprobs(teacher[:, half], k, T, LIMIT)
        for kind in ("forward", "reverse", "jsd"):
            c = DistillLoss(ce_weight=CE_WEIGHT, kl_weight=KL_WEIGHT, divergence=kind, jsd_beta=BETA, temperature=T,
                            top_k=k)
            local = student[:, half].clone().requires_grad_(True)
            loss, _, _ = per_token(local, targets, t_logp, t_ids, c, LIMIT)
            (loss * weights).sum().backward()
            full = student.clone().double().requires_grad_(True)
            ref = reference(full, teacher, targets, k, kind)
            (ref * weights.double()).sum().backward()
            result[f"{kind}_k{k}"] = {"value_error": (loss.double() - ref).abs().max().item(),
                                      "grad_error": (local.grad.double() - full.grad[:, half]).abs().max().item(),
                                      "mean": ref.mean().item()}
    results = [None, None]
    dist.all_gather_object(results, result)
    if rank == 0:
        Path(args.out).write_text(json.dumps(results))
    destroy_distributed()


if __name__ == "__main__":
    main()
