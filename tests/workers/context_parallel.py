"""torchrun worker: context parallelism against cp=1, on the same weights and batches.

    torchrun --nproc-per-node 2 tests/workers/context_parallel.py --work DIR --out R.json \
        --plan tiny=tp1:cp2 tiny_moe=tp1:cp2

For each MODEL=REFERENCE:LAYOUT[,LAYOUT...] entry it saves random weights of the model (at
conftest.TEST_VOCAB), then at the reference layout (cp=1) and at each context-parallel
layout loads them and records, through the code paths the stages use:
  * logits (`model.inference.forward_logits`) of plain rows and of a packed row, and
    log-probs at a partial mask (`forward_token_logprobs`, the output layer at the masked
    positions only);
  * two training steps (`recipes.engine.Engine.train_step`) on three kinds of batch:
    `pretrain` (plain rows, megatron-core's per-token loss), `sft` (packed rows with
    segment ids, loss on part of each document, the output layer at the loss positions
    only) and `rl` (no labels: the loss_fn gets vocab-parallel logits, as RL and
    distillation do; dense only); the first step's loss, every logged mean, the grad norm and every
    parameter's gradient, and the second step's loss.
Every rank compares its own gradients (same TP shard at both layouts) and the results are
reduced to the worst relative difference per layout and quantity, written by rank 0.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model.config import load_model_config  # noqa: E402
from model.parallel import destroy_distributed, init_distributed, reset_model_parallel  # noqa: E402
from tests.conftest import TEST_VOCAB  # noqa: E402
from tests.workers.layouts import LAYOUTS  # noqa: E402

GLOBAL_BATCH, SEQ = 4, 32
DOCS = (7, 11, 9)   # packed into SEQ, then 5 tokens of padding: no document boundary on a chunk edge


def batches(vocab: int) -> dict:
    """{kind: global batch (micro-batches of one row)}, identical on every rank."""
    from model.packing import segment_positions
    from recipes.engine import lm_batch

    g = torch.Generator().manual_seed(1234)
    plain = [lm_batch(torch.randint(0, vocab, (1, SEQ + 1), generator=g)) for _ in range(GLOBAL_BATCH)]
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(DOCS + (SEQ - sum(DOCS),))])[None]
    packed = []
    for b in plain:
        mask = (torch.rand(1, SEQ, generator=g) < 0.6).float() * (segments < len(DOCS))
        packed.append({**b, "loss_mask": mask, "segment_ids": segments, "position_ids": segment_positions(segments)})
    logits = [{"tokens": b["tokens"], "targets": b["labels"], "loss_mask": b["loss_mask"],
               "position_ids": b["position_ids"]} for b in packed]
    return {"pretrain": plain, "sft": packed, "rl": logits}


def logprob_loss(batch: dict, logits: torch.Tensor):
    """A loss on vocab-parallel logits at the loss positions (the RL/distillation form)."""
    from model.inference import target_logprobs_and_entropy

    where = batch["loss_mask"].bool()
    logp, entropy = target_logprobs_and_entropy(logits, batch["targets"][where])
    loss = -(logp + 0.1 * entropy).sum()
    tokens = where.sum()
    return loss, tokens.to(torch.int), {"lm loss": torch.stack([loss.detach(), tokens.float()]),
                                        "entropy": torch.stack([entropy.detach().sum(), tokens.float()])}


def run_layout(cfg, layout: str, ckpt: Path, data: dict) -> dict:
    """Everything recorded at one layout, on this rank."""
    from model.checkpoint import load_model
    from model.inference import forward_logits, forward_token_logprobs
    from recipes.engine import OptimConfig, build_engine, split_for_data_parallel

    out = {}
    for kind, rows in data.items():
        init_distributed(LAYOUTS[layout], seed=7, model=cfg)
        # plain optimizer: the distributed one leaves each rank only its shard of the reduced grads
        optim = OptimConfig(lr=1e-3, clip_grad=0.0, use_distributed_optimizer=False)
        engine = build_engine(cfg, LAYOUTS[layout], optim, init=lambda chunks: load_model(chunks, ckpt))
        if kind == "pretrain":   # the inference paths, on the same weights
            tokens = torch.cat([b["tokens"] for b in rows[:2]])
            out["logits/plain"] = forward_logits(engine.chunks, tokens)
            packed = data["sft"][0]
            out["logits/packed"] = forward_logits(engine.chunks, packed["tokens"], packed["segment_ids"])
            out["logprobs/masked"] = forward_token_logprobs(engine.chunks, tokens, torch.cat(
                [b["labels"] for b in rows[:2]]), mask=torch.cat([b["loss_mask"] for b in data["sft"][:2]]).bool())
        engine.loss_positions_only = kind != "pretrain"
        if kind == "rl":
            engine.loss_fn, engine.report_keys = logprob_loss, ("lm loss", "entropy")
        grads = out[f"{kind}/grads"] = {}
        finalize = engine.finalize_grads

        def keep_grads(*args, **kwargs):   # reduced over DP x CP, before the optimizer touches them
            result = finalize(*args, **kwargs)
            grads.update({f"{i}.{name}": p.main_grad.detach().clone()
                          for i, c in enumerate(engine.chunks) for name, p in c.module.named_parameters()})
            return result

        engine.finalize_grads = keep_grads
        mine = split_for_data_parallel(rows)
        first = engine.train_step(mine)
        engine.finalize_grads = finalize
        out[f"{kind}/step1"] = {k: v for k, v in first.items() if isinstance(v, float) and k != "lr"}
        out[f"{kind}/step2"] = {"loss": engine.train_step(mine)["loss"]}
        del engine
        reset_model_parallel()
    return out


def relative(a, b) -> float:
    """max |a - b| / max |b| over tensors, dicts of tensors or floats."""
    if b is None:   # logits live on the last pipeline stage only
        assert a is None
        return 0.0
    if isinstance(b, dict):
        return max(relative(a[k], b[k]) for k in b)
    if isinstance(b, float):
        return abs(a - b) / max(abs(b), 1e-30)
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--plan", nargs="+", required=True, help="MODEL=REFERENCE:LAYOUT[,LAYOUT...]")
    args = p.parse_args()
    from model.builder import build_model
    from model.checkpoint import save_model

    results = {}
    for entry in args.plan:
        name, layouts = entry.split("=")
        reference, others = layouts.split(":")
        # MoE: the micro-batch balancing loss. The global-batch one averages expert loads over
        # the micro-batches a rank has seen so far, which differ between DP=2 (the reference's
        # two ranks) and DP=1 x CP=2 (README, "Known limits"), whatever CP does.
        over = {"moe_aux_loss_type": "aux_loss"} if name.endswith("moe") else {}
        cfg = load_model_config(name, vocab_size=TEST_VOCAB, **over)
        ckpt = Path(args.work) / f"{name}_{reference}_init"
        init_distributed(LAYOUTS["tp1"], seed=7, model=cfg)
        save_model(build_model(cfg, LAYOUTS["tp1"]), ckpt, cfg)
        reset_model_parallel()
        data = batches(cfg.vocab_size)
        if cfg.is_moe:   # after the output layer the rl path is the dense one's; saves the launch 5 s
            del data["rl"]
        ref = run_layout(cfg, reference, ckpt, data)
        for layout in others.split(","):
            got = run_layout(cfg, layout, ckpt, data)
            diffs = torch.tensor([relative(got[k], ref[k]) for k in sorted(ref)], dtype=torch.float64)
            dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
            results[f"{name}/{layout}"] = dict(zip(sorted(ref), diffs.tolist()))
            results[f"{name}/{layout}"]["loss"] = ref["pretrain/step1"]["loss"]   # the scale, for a vacuous pass
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    destroy_distributed()


if __name__ == "__main__":
    main()
