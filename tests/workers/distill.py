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
3. At DP=2 (the same two processes, a new layout): one off-policy step of the `tiny`
   model through `DistillTask.batches`/`loss` and `Engine.train_step` (megatron-core's
   schedule and DDP), two micro-batches per rank with 2 to 15 response tokens each. The
   gradient must be that of the whole global batch's token mean computed in one forward
   and backward of a copy of the model, not the mean of per-micro-batch means.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model.config import ParallelConfig  # noqa: E402
from model.parallel import destroy_distributed, init_distributed, reset_model_parallel  # noqa: E402

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


def check_global_token_mean(rank: int) -> dict:
    """Part 3 of the module docstring: the step's loss and gradient against the reference."""
    from megatron.core import parallel_state

    from model.builder import build_model
    from model.config import load_model_config
    from recipes.distill import DistillTask
    from recipes.distill_loss import DistillLoss, per_token
    from recipes.engine import OptimConfig, build_engine, forward_per_token
    from recipes.rl_parts import DataParallel, MicroBatcher
    from tests.conftest import TEST_VOCAB

    cfg, layout, seq, k = load_model_config("tiny", vocab_size=TEST_VOCAB, num_layers=2), ParallelConfig(), 16, 4
    init_distributed(layout, seed=3, model=cfg)
    engine = build_engine(cfg, layout, OptimConfig(lr=1e-3, clip_grad=0.0, use_distributed_optimizer=False))
    g = torch.Generator().manual_seed(5)
    rows = []   # the global batch, 4 micro-batches of 2 rows; rank r trains micro-batches 2r and 2r + 1
    for response in (1, 1, 6, 9, 2, 3, 7, 8):
        mask = torch.zeros(seq)
        mask[seq - 1 - response:seq - 1] = 1   # the last position is padding
        rows.append({"tokens": torch.randint(0, TEST_VOCAB, (seq,), generator=g),
                     "targets": torch.randint(0, TEST_VOCAB, (seq,), generator=g), "loss_mask": mask,
                     "position_ids": torch.arange(seq),
                     "teacher_logp": torch.log_softmax(torch.randn(seq, TEST_VOCAB, generator=g) * 3, -1).topk(k)[0],
                     "teacher_ids": torch.randint(0, TEST_VOCAB, (seq, k), generator=g)})
    micro = [{key: torch.stack([r[key] for r in rows[i:i + 2]]) for key in rows[0]} for i in range(0, 8, 2)]
    c = DistillLoss(ce_weight=0.5, kl_weight=1.0, top_k=k)

    # the reference: one forward and backward of the whole global batch's token mean, same weights
    ref = build_model(cfg, layout)[0]
    ref.load_state_dict(engine.chunks[0].module.state_dict())
    whole = {key: torch.cat([m[key] for m in micro]) for key in micro[0]}
    batch, logits = forward_per_token(ref, whole, loss_positions_only=True)
    where = batch["loss_mask"].bool()
    loss, _, _ = per_token(logits, batch["targets"][where], batch["teacher_logp"][where],
                           batch["teacher_ids"][where], c, TEST_VOCAB)
    ref_loss = loss.sum() / where.sum()
    ref_loss.backward()

    # the stage's path, with this rank's share as recipes.data.SampleBatches hands it out
    batcher = MicroBatcher(rollout_size=8, global_batch_size=8, micro_batch_size=2, width_multiple=1,
                           dp=DataParallel(rank, 2, parallel_state.get_data_parallel_group()))
    task = DistillTask(c, "off_policy", [None] * TEST_VOCAB, engine, batcher, sampler=None,
                       samples=lambda consumed: [dict(m) for m in micro[2 * rank:2 * rank + 2]])
    engine.loss_fn, engine.loss_positions_only = task.loss, True
    step = engine.train_step(task.batches(0))
    worst = max((p.main_grad - q.grad).abs().max().item()
                for p, q in zip(engine.chunks[0].module.parameters(), ref.parameters()))
    scale = max(q.grad.abs().max().item() for q in ref.parameters())
    out = {"loss": step["loss"], "ref_loss": ref_loss.item(), "grad_error": worst / scale}
    reset_model_parallel()
    return out


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
    reset_model_parallel()
    result["global_mean"] = check_global_token_mean(rank)
    results = [None, None]
    dist.all_gather_object(results, result)
    if rank == 0:
        Path(args.out).write_text(json.dumps(results))
    destroy_distributed()


if __name__ == "__main__":
    main()
