"""Rollout throughput: decoding with megatron-core's KV cache against recomputing the prefix.

    python -m bench.rollout [--model tiny] [--batch 8] [--prompt-len 32] [--new-tokens 128]
                            [--repeats 3] [--threads 1] [--seed 1234] [--json FILE]

One process, one single-rank world, one random model (`model.builder.build_model` with
seeded init; bf16 on a GPU, fp32 on CPU), one batch of `--batch` random prompts of
`--prompt-len` tokens. `recipes.generate.generate` continues them by `--new-tokens`
tokens (no stop token, so every row generates all of them), greedy and sampled
(temperature 1, top-p 0.9, top-k 50, a fixed seed), along two paths:

  KV cache   `use_cache=True`: the prompt once, then one token per step through
             megatron-core's StaticInferenceContext (what rollouts use at every layout
             but VPP and CP);
  recompute  `use_cache=False`: the whole prefix again every step through
             `model.inference.forward_only` (what VPP and CP use).

Per decoding mode and path: a short warm-up generation, then `--repeats` timed
generations (wall clock, CUDA synchronised); the table shows the median.

  tokens/s   generated tokens (batch x new tokens) / median time
  peak MiB   GPU: torch.cuda.max_memory_allocated during the timed generations (weights
             included). CPU: peak RSS (VmHWM) during them minus the RSS before the model
             was built (bench.train's MemoryMeter); freed heap is handed back to the OS
             before each path so that one path's leftovers do not count for the next
  speed-up   KV cache tokens/s over recompute tokens/s

Below the table: whether the greedy tokens of the two paths are identical (they must be
in fp32; in bf16 a near-tie can flip) and the largest log-prob difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from model.config import ConfigError, load_model_config
from model.plan import aligned

PATHS = {"KV cache": True, "recompute": False}


@dataclass
class RolloutBench:
    model: str = "tiny"
    batch: int = 8
    prompt_len: int = 32
    new_tokens: int = 128
    repeats: int = 3
    warmup_tokens: int = 4
    threads: int = 1
    seed: int = 1234


def check_config(b: RolloutBench):
    problems = [f"--{k.replace('_', '-')} must be >= 1, got {getattr(b, k)}"
                for k in ("batch", "prompt_len", "new_tokens", "repeats", "threads") if getattr(b, k) < 1]
    if problems:
        raise ConfigError("; ".join(problems))
    cfg = load_model_config(b.model)
    if b.prompt_len + b.new_tokens > cfg.max_position_embeddings:
        raise ConfigError(f"--prompt-len + --new-tokens = {b.prompt_len + b.new_tokens} exceeds {cfg.name}'s "
                          f"max_position_embeddings {cfg.max_position_embeddings}")
    return cfg


def _release_freed_memory() -> None:
    import ctypes
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc: the peak may include the previous path's freed heap


def _timed(chunks, prompts, b: RolloutBench, sampling, use_cache: bool, meter) -> dict:
    import torch

    from recipes.generate import generate

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    generate(chunks, prompts, min(b.warmup_tokens, b.new_tokens), [], sampling, use_cache=use_cache)
    _release_freed_memory()
    meter.start()
    times, first = [], None
    for _ in range(b.repeats):
        sync()
        started = time.perf_counter()
        gens = generate(chunks, prompts, b.new_tokens, [], sampling, use_cache=use_cache)
        sync()
        times.append(time.perf_counter() - started)
        first = first or gens
    return {"times": times, "peak_bytes": meter.peak(), "generated": sum(len(g.tokens) for g in first),
            "tokens": [g.tokens for g in first], "logprobs": [g.logprobs for g in first]}


def _timed_vllm(engine, prompts, b: RolloutBench, sampling, meter) -> dict:
    """The vLLM engine's rows: the same prompts, sampling and repeats as `_timed`."""
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    engine.generate(prompts, min(b.warmup_tokens, b.new_tokens), sampling, None)
    meter.start()
    times, first = [], None
    for _ in range(b.repeats):
        sync()
        started = time.perf_counter()
        gens = engine.generate(prompts, b.new_tokens, sampling, None)
        sync()
        times.append(time.perf_counter() - started)
        first = first or gens
    return {"times": times, "peak_bytes": meter.peak(), "generated": sum(len(g.tokens) for g in first),
            "tokens": [g.tokens for g in first], "logprobs": [g.logprobs for g in first]}


def run_benchmark(b: RolloutBench) -> dict:
    """Both paths, greedy and sampled, on one model and one batch: {"environment", "config", "rows", "checks"}."""
    import torch
    import torch.distributed as dist

    from bench.train import MemoryMeter, environment
    from model.builder import build_model
    from model.config import ParallelConfig
    from model.parallel import destroy_distributed, init_distributed
    from recipes.generate import Sampling, kv_cache_usable

    cfg = check_config(b)
    if not torch.cuda.is_available():
        torch.set_num_threads(b.threads)
    par = ParallelConfig()
    init_distributed(par, seed=b.seed, model=cfg)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    meter = MemoryMeter()
    meter.baseline()
    chunks = build_model(cfg, par, dtype=dtype)
    if not kv_cache_usable(chunks):
        raise RuntimeError("the KV cache path is not usable on a single-rank world")
    g = torch.Generator().manual_seed(b.seed)
    prompts = torch.randint(0, cfg.vocab_size, (b.batch, b.prompt_len), generator=g).tolist()
    modes = {"greedy": Sampling(seed=b.seed),
             "sampled": Sampling(temperature=1.0, top_p=0.9, top_k=50, seed=b.seed)}
    rows, runs = [], {}
    for mode, sampling in modes.items():
        for path, use_cache in PATHS.items():
            r = _timed(chunks, prompts, b, sampling, use_cache, meter)
            runs[mode, path] = r
            median = statistics.median(r["times"])
            rows.append({"decoding": mode, "path": path, "batch": b.batch, "prompt_len": b.prompt_len,
                         "new_tokens": b.new_tokens, "median_s": median, "times": r["times"],
                         "generated": r["generated"], "tokens_per_s": r["generated"] / median,
                         "peak_bytes": r["peak_bytes"], "speedup": None})
        cached, full = rows[-2], rows[-1]
        cached["speedup"] = cached["tokens_per_s"] / full["tokens_per_s"]
    from recipes.rollout import RolloutConfig, launch_problem

    skipped = launch_problem(RolloutConfig(backend="vllm"), cfg)   # why vLLM's rows are left out
    startup = None
    if skipped is None:
        from recipes.rollout import VLLMSettings
        from recipes.rollout.vllm_engine import VLLMEngine

        started = time.perf_counter()
        engine = VLLMEngine(cfg, [], cfg.vocab_size, VLLMSettings(), b.prompt_len + b.new_tokens, b.seed, dtype)
        engine.sync_weights(chunks)
        startup = time.perf_counter() - started
        recompute = {r["decoding"]: r for r in rows if r["path"] == "recompute"}
        for mode, sampling in modes.items():
            r = _timed_vllm(engine, prompts, b, sampling, meter)
            runs[mode, "vLLM"] = r
            median = statistics.median(r["times"])
            rows.append({"decoding": mode, "path": "vLLM", "batch": b.batch, "prompt_len": b.prompt_len,
                         "new_tokens": b.new_tokens, "median_s": median, "times": r["times"],
                         "generated": r["generated"], "tokens_per_s": r["generated"] / median,
                         "peak_bytes": r["peak_bytes"],
                         "speedup": r["generated"] / median / recompute[mode]["tokens_per_s"]})
    checks = {}
    for mode in modes:
        cached, full = runs[mode, "KV cache"], runs[mode, "recompute"]
        diffs = [abs(a - c) for la, lc in zip(cached["logprobs"], full["logprobs"]) for a, c in zip(la, lc)]
        checks[mode] = {"tokens_identical": cached["tokens"] == full["tokens"],
                        "max_logprob_diff": max(diffs) if diffs else 0.0}
    if skipped is None:   # vLLM samples with its own generator: only greedy tokens can agree
        theirs = runs["greedy", "vLLM"]["tokens"]
        ours = runs["greedy", "KV cache"]["tokens"]
        checks["vllm"] = {"startup_s": startup, "greedy_rows_identical": sum(a == c for a, c in zip(theirs, ours)),
                          "rows": len(ours),
                          "greedy_token_agreement": sum(x == y for a, c in zip(theirs, ours) for x, y in zip(a, c))
                          / max(sum(len(c) for c in ours), 1)}
    else:
        checks["vllm"] = {"skipped": skipped}
    if dist.is_initialized():   # vLLM's shutdown at exit may take the default group first
        destroy_distributed()
    return {"environment": environment(), "config": {**asdict(b), "dtype": str(dtype).removeprefix("torch.")},
            "rows": rows, "checks": checks}


def format_table(rows: list[dict]) -> str:
    table = [("decoding", "path", "batch x prompt", "new", "median s", "tokens/s", "peak MiB", "speed-up")]
    for r in rows:
        table.append((r["decoding"], r["path"], f"{r['batch']}x{r['prompt_len']}", str(r["new_tokens"]),
                      f"{r['median_s']:.3f}", f"{r['tokens_per_s']:.1f}", f"{r['peak_bytes'] / 2**20:.0f}",
                      "" if r["speedup"] is None else f"{r['speedup']:.2f}x"))
    return aligned(table, left=2)


def report(result: dict) -> str:
    c = result["config"]
    lines = [", ".join(f"{k} {v}" for k, v in result["environment"].items()),
             f"model {c['model']} ({c['dtype']}, random weights), warm-up {c['warmup_tokens']} tokens + "
             f"{c['repeats']} timed generations per row, median shown"
             + ("" if "cores" not in result["environment"]["device"] else f"; {c['threads']} thread(s)"),
             format_table(result["rows"])]
    for mode, check in result["checks"].items():
        if mode == "vllm":
            if "skipped" in check:
                lines.append(f"vLLM rows left out: {check['skipped']}")
            else:
                lines.append(f"vLLM (same weights, synced in memory; start-up {check['startup_s']:.1f} s): greedy rows "
                             f"identical to the KV cache's {check['greedy_rows_identical']}/{check['rows']}, token "
                             f"agreement {check['greedy_token_agreement']:.1%}; its speed-up column is over recompute")
            continue
        lines.append(f"{mode} tokens identical (KV cache vs recompute): {check['tokens_identical']}; "
                     f"max |log-prob diff| {check['max_logprob_diff']:.2e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rollout", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="hydra_conf/model name or yaml (random weights)")
    p.add_argument("--batch", type=int, default=8, help="prompts in the batch")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per row (median shown)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1; no effect on GPU)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", default=None, help="also write all results (every repeat's time) here")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    b = RolloutBench(model=args.model, batch=args.batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                     repeats=args.repeats, threads=args.threads, seed=args.seed)
    try:
        check_config(b)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run_benchmark(b)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
