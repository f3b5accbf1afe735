"""torchrun worker (2 ranks): `recipes.generate.generate` at the layouts rollouts run at scale.

    torchrun --nproc-per-node 2 tests/workers/generate_scale.py --tokenizer DIR --out R.json

One random model per layout (no checkpoint: every comparison is within one layout). Each
check runs on both ranks and rank 0 rewrites the JSON after it, so a check that hangs
(until the process groups' 2-minute timeout) leaves the earlier ones' results; a check
that raises records {"error": ...} and the next one runs.

  sp/tiny, sp/tiny_moe   TP=2 with sequence parallelism: the KV cache against recomputing,
                         greedy with a thinking budget of 3; the token widths the model was
                         called with (the cache: the prefix once, then 1 a step); the
                         sequence-parallel flags before a decode that raised in its third
                         forward and after it.
  pp2                    PP=2: the same comparison, with each stage's widths.
  chunks                 DP=2 (each rank the same call): 5 prompts in one chunk against
                         chunks of at most 2 rows (`max_cache_bytes`), greedy with the budget
                         and top-k log-probs, and sampled; the number of prefills (chunks);
                         in each of these decodes, the calls from recipes/generate.py that
                         copy a tensor's value to the host (.item/.tolist/.cpu/.numpy,
                         int/float/bool of a tensor) against the model forwards; with the
                         model configured for FP8 (shapes only on CPU), 20 prompts in chunks
                         of at most 16 rows: the rows each forward ran, the prefills, the
                         results.
  ep2                    tiny_moe at EP=2 over DP=2 (the MoE all-to-alls span both ranks):
                         rank 0 one 3-token prompt, rank 1 three of 16 to 21 tokens, so rank
                         0 is done first; cached, recomputed, cached in chunks of 2 rows
                         (rank 1: 2 chunks, rank 0: 1), and rank 0 with no prompt at all;
                         each rank's results against its prompts decoded by both ranks
                         together. Last, since the code before lockstep decoding hangs here.
"""

import argparse
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from model.config import load_model_config  # noqa: E402
from model.parallel import destroy_distributed, init_distributed, reset_model_parallel  # noqa: E402
from tests.workers.layouts import LAYOUTS  # noqa: E402

GENERATE = str(Path(__file__).resolve().parents[2] / "recipes" / "generate.py")
NEW = 8   # new tokens per decode


class HostTransfers(TorchFunctionMode):
    """Counts the calls made from recipes/generate.py that copy a tensor's value to the
    host (on a GPU: a device-to-host copy and a wait for the stream)."""

    NAMES = {"item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES and sys._getframe(1).f_code.co_filename == GENERATE:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _widths(chunks) -> tuple[list, object]:
    """(the token widths the model is called with, the hook's handle)."""
    widths = []
    hook = chunks[0].register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    return widths, hook


def _gens(gens) -> list[dict]:
    return [{"tokens": g.tokens, "logprobs": g.logprobs, "forced": g.forced, "finish": g.finish,
             "budget_stopped": g.budget_stopped, "top_ids": [t.tolist() for t in g.top_ids],
             "top_logprobs": [t.tolist() for t in g.top_logprobs]} for g in gens]


def _sp_flags(chunks) -> list[bool]:
    """Every sequence-parallel flag of the model's modules and configs."""
    flags = []
    for module in chunks[0].modules():
        own = vars(module)
        flags += [v for k, v in own.items() if k in ("sequence_parallel", "reduce_scatter_embeddings")]
        if "config" in own and own["config"] is not None and "sequence_parallel" in vars(own["config"]):
            flags.append(own["config"].sequence_parallel)
    return flags


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from data_pipeline.chat import render
    from data_pipeline.tokenizer import load_tokenizer
    from model.builder import build_model
    from recipes.generate import (Sampling, decode_row_bytes, generate, kv_cache_usable, lockstep_group, stop_ids,
                                  thinking_budget)

    tok = load_tokenizer(args.tokenizer)
    messages = [{"role": "user", "content": "What is 12+30?"}]
    thinking = tok.encode(render(messages, add_generation_prompt=True).text + "<think>\n", add_special_tokens=False)
    plain = tok.encode(render(messages, add_generation_prompt=True, enable_thinking=False).text,
                       add_special_tokens=False)
    short = tok.encode("Say hello now", add_special_tokens=False)
    # three lengths, close together: a decode's steps run from the shortest prompt's end
    mixed = [thinking[:-3], thinking, plain]
    five = [*mixed, thinking[:-1], plain[:-2]]
    stop, budget = stop_ids(tok), thinking_budget(tok, 3)
    # top-k, not top-p: top-p sorts the 151,936-entry vocabulary every step, the slowest part here
    sampled = Sampling(temperature=1.0, top_k=50, seed=3)
    results = {"prompt_lengths": [len(x) for x in mixed]}

    def save():
        if dist.get_rank() == 0:
            tmp = Path(args.out).with_suffix(".tmp")
            tmp.write_text(json.dumps(results))
            tmp.replace(args.out)

    def check(name, model, layout, body):
        init_distributed(LAYOUTS[layout], seed=5, model=load_model_config(model), timeout_minutes=2)
        try:
            chunks = build_model(load_model_config(model), LAYOUTS[layout])
            results[name] = body(chunks)
        except Exception:
            results[name] = {"error": traceback.format_exc()[-3000:]}
        finally:
            reset_model_parallel()
        save()

    def decode(chunks, prompts, sampling=None, b=None, **kw):
        """(generations as dicts, the token widths the model was called with, host transfers)."""
        widths, hook = _widths(chunks)
        counter = HostTransfers()
        try:
            with counter:
                gens = generate(chunks, prompts, NEW, stop, sampling or Sampling(), b, vocab_limit=len(tok), **kw)
        finally:
            hook.remove()
        return _gens(gens), widths, counter.count

    def cache_vs_recompute(chunks, inject=True):
        """The cache against recomputing, greedy with the budget; with `inject`, a decode
        whose third forward raises on every rank (at PP=2 a stage that raised would leave
        the next one waiting for its hidden states)."""
        group = lockstep_group(chunks)
        r = {"kv_cache_usable": kv_cache_usable(chunks),
             "lockstep_ranks": None if group is None else dist.get_process_group_ranks(group)}
        r["greedy"], r["greedy_widths"], _ = decode(chunks, mixed, Sampling(), budget)
        r["greedy_recompute"], _, _ = decode(chunks, mixed, Sampling(), budget, use_cache=False)
        if not inject:
            return r
        before = _sp_flags(chunks)

        def fail_third(module, args, calls=[]):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected")

        hook = chunks[0].register_forward_pre_hook(fail_third)
        try:
            generate(chunks, mixed, NEW, stop, vocab_limit=len(tok))
            r["raised"] = False
        except RuntimeError:
            r["raised"] = True
        hook.remove()
        r["sp_flags"] = {"before": before, "after_error": _sp_flags(chunks)}
        return r

    def pipeline(chunks):
        r = cache_vs_recompute(chunks, inject=False)
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, r["greedy_widths"])
        r["greedy_widths_per_stage"] = shares
        return r

    def chunked(chunks):
        two_rows = 2 * decode_row_bytes(chunks, max(map(len, five)) + NEW, 4) + 1
        r = {"two_rows_bytes": two_rows, "transfers": {}}
        # the one-chunk greedy decode first: the code before chunking runs it too
        for name, sampling, b, k in (("greedy", Sampling(), budget, 4), ("sampled", sampled, None, 0)):
            r[name], widths, transfers = decode(chunks, five, sampling, b, top_k_logprobs=k)
            r["transfers"][name] = {"transfers": transfers, "forwards": len(widths), "chunks": 1}
            r[f"{name}_chunked"], widths, transfers = decode(chunks, five, sampling, b, top_k_logprobs=k,
                                                             max_cache_bytes=two_rows)
            r[f"{name}_prefills"] = sum(w > 1 for w in widths)
            r["transfers"][f"{name}_chunked"] = {"transfers": transfers, "forwards": len(widths),
                                                 "chunks": r[f"{name}_prefills"]}
        # FP8: 20 prompts (`five` 4 times) with a budget of 16 rows, FP8's row multiple: 2
        # chunks of 10, each padded to 16 rows
        rows = []
        hook = chunks[0].register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
        chunks[0].config.fp8 = "hybrid"
        try:
            r["fp8_chunked"], widths, _ = decode(chunks, five * 4, Sampling(), budget, top_k_logprobs=4,
                                                 max_cache_bytes=8 * two_rows)
        finally:
            chunks[0].config.fp8 = None
            hook.remove()
        r["fp8_rows"], r["fp8_prefills"] = sorted(set(rows)), sum(w > 1 for w in widths)
        return r

    def lockstep(chunks):
        group = lockstep_group(chunks)
        r = {"lockstep_ranks": None if group is None else dist.get_process_group_ranks(group)}
        theirs = [[short], mixed]
        mine = theirs[dist.get_rank()]
        # the reference: both ranks decode the same prompts, so they step together anyway
        r["reference"] = [decode(chunks, p, Sampling(), budget)[0] for p in theirs]
        runs = {"cached": dict(), "recompute": dict(use_cache=False),
                "chunked": dict(max_cache_bytes=2 * decode_row_bytes(chunks, max(map(len, mine)) + NEW) + 1),
                "no_prompts_on_rank0": dict()}
        for name, kw in runs.items():
            prompts = [] if name == "no_prompts_on_rank0" and dist.get_rank() == 0 else mine
            gens, widths, _ = decode(chunks, prompts, Sampling(), budget, **kw)
            shares = [None] * dist.get_world_size()
            dist.all_gather_object(shares, {"gens": gens, "forwards": len(widths),
                                            "prefills": sum(w > 1 for w in widths)})
            r[name] = shares
        return r

    check("sp/tiny", "tiny", "tp2", cache_vs_recompute)
    check("sp/tiny_moe", "tiny_moe", "tp2", cache_vs_recompute)
    check("pp2", "tiny", "pp2", pipeline)
    check("chunks", "tiny", "tp1", chunked)
    check("ep2", "tiny_moe", "ep2", lockstep)
    destroy_distributed()


if __name__ == "__main__":
    main()
