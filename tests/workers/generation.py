"""torchrun worker: the generation helper at TP=1, TP=2, PP=2 and EP=2, on the same weights.

    torchrun --nproc-per-node 2 tests/workers/generation.py --tokenizer DIR --out R.json

A random `tiny` model (the real vocabulary, so the real tokenizer's ids fit) continues a
thinking prompt (the generation prompt plus "<think>\\n", as if the model had opened its
thinking) under budgets of 6 and 1 tokens, a non-thinking prompt (a different length in the same
batch), and sampled decoding; with the KV cache (TP=1, and TP=2 with sequence parallelism,
which the decode turns off) and without it. `mixed` is a greedy batch of three prompts of
very different lengths with no budget: at TP=1 with the cache and without, at PP=2 (a
cache per stage), and on a random `tiny_moe` at EP=1 and EP=2 (the cache serves EP).
Each layout after the first loads the first one's checkpoint, so all see the same weights.
Rank 0 records the token ids, log-probs and whether the KV cache was used.

At TP=1 `mixed` and `sampled` also run with the model configured for FP8 (`config.fp8`,
as precision=fp8_* sets it; without Transformer Engine megatron-core's FP8 context is a
no-op, so only the shapes change), for their first 8 tokens: the cached decode pads the
batch to 16 rows (`model.inference.decode_rows`), recorded as the row counts the model
was called with.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from model.config import load_model_config  # noqa: E402
from model.parallel import destroy_distributed, init_distributed, reset_model_parallel  # noqa: E402
from tests.workers.layouts import LAYOUTS  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from data_pipeline.chat import render
    from data_pipeline.tokenizer import load_tokenizer
    from model.builder import build_model
    from model.checkpoint import load_model, save_model
    from recipes.generate import Sampling, generate, kv_cache_usable, stop_ids, thinking_budget

    tok = load_tokenizer(args.tokenizer)
    messages = [{"role": "user", "content": "What is 12+30?"}]
    thinking = tok.encode(render(messages, add_generation_prompt=True).text + "<think>\n", add_special_tokens=False)
    plain = tok.encode(render(messages, add_generation_prompt=True, enable_thinking=False).text,
                       add_special_tokens=False)
    # the shortest row decodes from its 3rd token while the others still read their prompts
    mixed = [tok.encode("Say", add_special_tokens=False) + tok.encode(" hello", add_special_tokens=False)
             + tok.encode(" now", add_special_tokens=False), thinking, plain]
    budget_runs = [
        ("budget6", [thinking, plain], 6, Sampling(), True, 24),
        ("budget6_recompute", [thinking, plain], 6, Sampling(), False, 24),
        ("budget1", [thinking], 1, Sampling(), True, 24),
        ("nobudget", [thinking], None, Sampling(), True, 24),
        ("sampled", [thinking, thinking], None, Sampling(temperature=1.0, top_p=0.9, top_k=50, seed=3), True, 24),
    ]
    mixed_run = ("mixed", mixed, None, Sampling(), True, 16)
    mixed_recompute = ("mixed_recompute", mixed, None, Sampling(), False, 16)
    cases = [   # (model, layout, runs); the first layout of a model saves the weights
        ("tiny", "tp1", [*budget_runs, mixed_run, mixed_recompute]),
        ("tiny", "tp2", budget_runs),
        ("tiny", "pp2", [mixed_run]),
        ("tiny_moe", "tp1", [mixed_run]),
        ("tiny_moe", "ep2", [mixed_run]),
    ]
    results = {"prompt_thinking": thinking, "prompt_plain": plain, "prompt_mixed": mixed}
    saved = set()
    for model, layout, runs in cases:
        cfg = load_model_config(model)
        ckpt = Path(args.out).parent / f"{model}_random"
        init_distributed(LAYOUTS[layout], seed=5, model=cfg)
        chunks = build_model(cfg, LAYOUTS[layout])
        if model in saved:
            load_model(chunks, ckpt)
        else:
            save_model(chunks, ckpt, cfg)
            saved.add(model)
        run = {"kv_cache_usable": kv_cache_usable(chunks)}
        for name, prompts, budget, sampling, cache, new_tokens in runs:
            gens = generate(chunks, prompts, new_tokens, stop_ids(tok), sampling, thinking_budget(tok, budget),
                            vocab_limit=len(tok), use_cache=cache)
            run[name] = [{"tokens": g.tokens, "forced": g.forced, "logprobs": g.logprobs,
                          "finish": g.finish, "budget_stopped": g.budget_stopped} for g in gens]
        if model == "tiny" and layout == "tp1":
            rows = []
            hook = chunks[0].register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
            chunks[0].config.fp8 = "hybrid"
            for name, prompts, budget, sampling, cache, new_tokens in (mixed_run, budget_runs[-1]):
                gens = generate(chunks, prompts, min(new_tokens, 8), stop_ids(tok), sampling,
                                thinking_budget(tok, budget), vocab_limit=len(tok), use_cache=cache)
                run[f"{name}_fp8"] = [{"tokens": g.tokens, "logprobs": g.logprobs} for g in gens]
            chunks[0].config.fp8 = None
            hook.remove()
            run["fp8_rows"] = sorted(set(rows))
        results[layout if model == "tiny" else f"{model}/{layout}"] = run
        reset_model_parallel()
    results["stop_phrase"] = thinking_budget(tok, 0).stop_phrase
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results))
    destroy_distributed()


if __name__ == "__main__":
    main()
