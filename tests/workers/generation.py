"""torchrun worker: the generation helper at TP=1 and TP=2, with and without a thinking budget.

    torchrun --nproc-per-node 2 tests/workers/generation.py --tokenizer DIR --out R.json

A random `tiny` model (the real vocabulary, so the real tokenizer's ids fit) continues a
thinking prompt (the generation prompt plus "<think>\\n", as if the model had opened its
thinking) under budgets of 6 and 1 tokens, a non-thinking prompt (a different length in the same
batch), and sampled decoding; with the KV cache (TP=1; TP=2 uses sequence parallelism, so
it recomputes) and without it.
Rank 0 records the token ids; the test checks where the stop phrase went.
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
    from recipes.generate import Sampling, generate, stop_ids, thinking_budget

    tok = load_tokenizer(args.tokenizer)
    cfg = load_model_config("tiny")
    messages = [{"role": "user", "content": "What is 12+30?"}]
    thinking = tok.encode(render(messages, add_generation_prompt=True).text + "<think>\n", add_special_tokens=False)
    plain = tok.encode(render(messages, add_generation_prompt=True, enable_thinking=False).text,
                       add_special_tokens=False)
    ckpt = Path(args.out).parent / "tiny_random"
    results = {"prompt_thinking": thinking, "prompt_plain": plain}
    for layout in ("tp1", "tp2"):
        init_distributed(LAYOUTS[layout], seed=5, model=cfg)
        chunks = build_model(cfg, LAYOUTS[layout])
        if layout == "tp1":
            save_model(chunks, ckpt, cfg)
        else:
            load_model(chunks, ckpt)   # the same weights at TP=2
        run = {}
        for name, prompts, budget, sampling, cache in [
            ("budget6", [thinking, plain], 6, Sampling(), True),
            ("budget6_recompute", [thinking, plain], 6, Sampling(), False),
            ("budget1", [thinking], 1, Sampling(), True),
            ("nobudget", [thinking], None, Sampling(), True),
            ("sampled", [thinking, thinking], None, Sampling(temperature=1.0, top_p=0.9, top_k=50, seed=3), True),
        ]:
            gens = generate(chunks, prompts, 24, stop_ids(tok), sampling, thinking_budget(tok, budget),
                            vocab_limit=len(tok), use_cache=cache)
            run[name] = [{"tokens": g.tokens, "forced": g.forced, "logprobs": g.logprobs,
                          "finish": g.finish, "budget_stopped": g.budget_stopped} for g in gens]
        results[layout] = run
        reset_model_parallel()
    results["stop_phrase"] = thinking_budget(tok, 0).stop_phrase
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results))
    destroy_distributed()


if __name__ == "__main__":
    main()
