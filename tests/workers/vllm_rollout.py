"""torchrun worker (2 processes): the vLLM rollout engine against the built-in one and the
trainer, at TP=2, PP=2 (a dense checkpoint) and EP=2 (a MoE checkpoint).

    torchrun --nproc-per-node 2 tests/workers/vllm_rollout.py --tokenizer DIR \\
        --arch dense|moe --ckpt CKPT --out R.json

Each rank starts one vLLM engine (recipes.rollout.make_engine, so from dummy weights and a
first in-memory sync; vLLM allows one per process) and keeps it across the layouts: every
layout after the first reaches it only through `sync_weights`. Per layout, from the same converted
checkpoint:

1. greedy: vLLM's tokens and log-probs against `recipes.generate.generate` on the
   megatron-core chunks, for prompts of different lengths, and for two prompts that open a
   think block under a thinking budget of 3 (forced stop phrase);
2. one optimizer step (megatron-core's optimizer, lr 1e-2), then the log-probs of a fixed
   sequence: the trainer's (`model.inference.forward_token_logprobs`) against vLLM's
   prompt log-probs before the sync (the old weights) and after it.

Rank 0 writes the per-layout numbers; every rank checks the same on its own engine.
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

NEW_TOKENS = 16


def vllm_logprobs(engine, sequence: list[int]) -> torch.Tensor:
    """vLLM's log p(token | prefix) for every token of `sequence` after the first."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = engine.llm.generate([TokensPrompt(prompt_token_ids=sequence)],
                              SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False)
    return torch.tensor([entry[token].logprob for token, entry in zip(sequence[1:], out[0].prompt_logprobs[1:])])


def check_layout(name: str, ckpt: Path, layout: ParallelConfig, tokenizer, rollout) -> tuple[dict, object]:
    from model.checkpoint import read_model_config
    from model.inference import forward_token_logprobs
    from recipes.checkpointing import load_weights
    from recipes.engine import OptimConfig, build_engine
    from recipes.generate import Sampling, generate, stop_ids, thinking_budget
    from recipes.rollout import RolloutConfig, make_engine

    cfg = read_model_config(ckpt)
    init_distributed(layout, seed=7, model=cfg)
    engine = build_engine(cfg, layout, OptimConfig(lr=1e-2, min_lr=1e-2, clip_grad=0.0,
                                                   use_distributed_optimizer=False),
                          init=lambda chunks: load_weights(chunks, ckpt))
    if rollout is None:
        rollout = make_engine(RolloutConfig(backend="vllm"), engine.chunks, cfg, tokenizer, 256, seed=0)
    else:
        rollout.sync_weights(engine.chunks)
    budget = thinking_budget(tokenizer, 3)
    cases = {"plain": ([[5, 6, 7, 8, 9, 10], [11, 12], list(range(100, 140))], None),
             "budget": ([[5, 6, budget.think_open], [7, budget.think_open, 8, 9]], budget)}
    out = {}
    for case, (prompts, b) in cases.items():
        ours = generate(engine.chunks, prompts, NEW_TOKENS, stop_ids(tokenizer), Sampling(), b,
                        vocab_limit=len(tokenizer))
        theirs = rollout.generate(prompts, NEW_TOKENS, Sampling(), b)
        out[case] = {
            "same_tokens": all(x.tokens == y.tokens for x, y in zip(ours, theirs)),
            "same_forced": all(x.forced == y.forced for x, y in zip(ours, theirs)),
            "budget_stopped": [y.budget_stopped for y in theirs],
            "logprob_diff": max((abs(u - v) for x, y in zip(ours, theirs) if x.tokens == y.tokens
                                 for u, v in zip(x.logprobs, y.logprobs)), default=float("inf")),
            "tokens": [y.tokens for y in theirs]}

    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 32),
             "position_ids": torch.arange(32).expand(2, -1)}
    step = engine.train_step([batch])
    sequence = list(range(200, 232))
    seq = torch.tensor([sequence])
    trainer = forward_token_logprobs(engine.chunks, seq[:, :-1], seq[:, 1:])
    holder = [None if trainer is None else trainer[0].float().cpu()]
    if layout.pp > 1:   # the log-probs live on the last stage
        dist.broadcast_object_list(holder, src=dist.get_world_size() - 1)
    trainer = holder[0]
    before = vllm_logprobs(rollout, sequence)
    engine.gather_params()
    rollout.sync_weights(engine.chunks)
    after = vllm_logprobs(rollout, sequence)
    out["update"] = {"update_successful": bool(step["update_successful"]),
                     "stale_diff": float((before - trainer).abs().max()),
                     "synced_diff": float((after - trainer).abs().max())}
    reset_model_parallel()
    return out, rollout


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--arch", choices=("dense", "moe"), required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    from data_pipeline.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(a.tokenizer)
    layouts = {"dense": {"tp2": ParallelConfig(tp=2, sp=False), "pp2": ParallelConfig(pp=2)},
               "moe": {"ep2": ParallelConfig(ep=2)}}[a.arch]
    results, rollout = {}, None
    for label, layout in layouts.items():
        results[f"{a.arch}/{label}"], rollout = check_layout(a.arch, Path(a.ckpt), layout, tokenizer, rollout)
    if dist.get_rank() == 0:
        Path(a.out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    rollout.close()   # vLLM's shutdown takes the default process group with it
    if dist.is_initialized():
        destroy_distributed()


if __name__ == "__main__":
    main()
