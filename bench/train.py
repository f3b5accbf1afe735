"""Training throughput of our recipe's step against HF transformers on the same weights and batch.

    python -m bench.train [--model tiny --model tiny_moe] [--precision auto] [--seq 128] [--mbs 2]
                          [--microbatches 1] [--warmup 1] [--steps 3] [--recompute none]
                          [--layers N] [--vocab N] [--peak-tflops X] [--threads 1] [--json FILE]

For each model, in one invocation:

  ours  `recipes.engine.build_engine` + `Engine.train_step`, the step the training loop
        runs (megatron-core schedule, DDP with fp32 main grads, distributed optimizer,
        Adam, grad clipping at 1.0), on a single-rank world from
        `model.parallel.init_distributed`; the Transformer Engine spec with the GPU
        path's fusions and DDP overlap (model.builder) and FP8 (`--precision fp8_*`,
        through `recipes.train.resolve_precision`) on a GPU with TE, megatron-core's local
        spec on CPU.
  HF    transformers' Qwen3ForCausalLM / Qwen3MoeForCausalLM loaded from the same
        safetensors with attn_implementation="sdpa" (MoE experts: transformers' default,
        grouped_mm where it can), parameters in the run's dtype (bf16 for FP8 runs, which
        HF cannot train in), cross-entropy in fp32, clip_grad_norm_ 1.0 and torch.optim.AdamW
        (fused on CUDA) with the same hyper-parameters and no weight decay on 1-D weights,
        as megatron-core does.

The weights are a random HF model saved once; our side fills its parameters from those
files with the converter (`model.convert.fill_from_hf`), so both start from identical
weights, and both train on the same random token batch (mbs x microbatches sequences of
seq + 1 tokens). The step-1 losses must agree: that is the harness's correctness check.

Each side runs in its own process (so one's memory and global state, e.g. the CPU
compatibility layer megatron-core needs, cannot touch the other). Per side: `--warmup`
steps are run and dropped, then `--steps` timed steps (wall clock around the whole
optimizer step, CUDA synchronised); the table shows the median. On CPU each side gets
`--threads` threads (default 1).

  tokens/s   mbs * microbatches * seq / median step time
  TFLOP/s    model.plan.flops_per_token(model, seq) * tokens/s: 6 * N_active + 12 * L *
             seq * heads * head_dim per token (N_active: GEMM weights a token uses,
             logit layer included, MoE router + top-k experts only); docs/PERFORMANCE.md
  MFU        TFLOP/s / the GPU's dense peak for the arithmetic used (bf16, or fp8 for FP8
             runs; model.plan.PEAK_TFLOPS), or --peak-tflops; "n/a" on CPU without it
  peak mem   GPU: torch.cuda.max_memory_allocated over the timed and warm-up steps (reset
             just before them; weights, grads and optimizer state included). CPU: the
             process's peak RSS (VmHWM, reset through /proc/self/clear_refs before the
             first step) minus its RSS before the model was built
  ours/HF    ours tokens/s over HF tokens/s
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from model.config import REPO_ROOT, ConfigError, load_model_config, model_config_to_dict
from model.plan import PEAK_TFLOPS, aligned, compute_precision, flops_per_token, gpu_kind

DEFAULT_MODELS = ("tiny", "tiny_moe")
RECOMPUTE = ("none", "selective", "full")
# The training defaults (recipes.engine.OptimConfig); the LR stays constant so both sides
# take the same update.
OPTIM = {"lr": 3e-4, "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1e-8,
         "clip_grad": 1.0}


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    precision: str = "auto"
    seq: int = 128
    mbs: int = 2
    microbatches: int = 1
    warmup: int = 1
    steps: int = 3
    recompute: str = "none"
    layers: int | None = None      # fewer layers of a big model (a per-layer-exact slice)
    vocab: int | None = None
    peak_tflops: float | None = None
    seed: int = 1234
    threads: int = 1               # CPU threads per side (ignored on GPU)


# ------------------------------------------------------------------------ measuring


class MemoryMeter:
    """Peak memory of the steps: CUDA allocator peak, or peak RSS above a baseline on CPU."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.base = 0

    @staticmethod
    def _status_kib(key: str) -> int:
        return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))

    def baseline(self) -> None:
        """Call before the model is built."""
        if not self.cuda:
            self.base = self._status_kib("VmRSS") * 1024

    def start(self) -> None:
        """Call right before the first step."""
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        import torch

        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return self._status_kib("VmHWM") * 1024 - self.base


def _timed_steps(step, warmup: int, steps: int, meter: MemoryMeter) -> dict:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times, losses = [], []
    meter.start()
    for _ in range(warmup + steps):
        sync()
        started = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - started)
    return {"step_times": times[warmup:], "warmup_times": times[:warmup], "losses": losses,
            "peak_bytes": meter.peak()}


# -------------------------------------------------------------------------- workers


def _cpu_threads(job: dict) -> None:
    import torch

    # On a shared CPU, multi-threaded small ops time the contention for cores rather than
    # the code, and unevenly between the two sides: give each side the same fixed count.
    if not torch.cuda.is_available():
        torch.set_num_threads(job["threads"])


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def weights_worker(job: dict) -> dict:
    """Random HF models (transformers' own init) and the token batch, saved for both sides."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from model.config import model_config_from_dict, to_hf_config

    for entry in job["models"]:
        cfg = model_config_from_dict(entry["model"])
        torch.manual_seed(job["seed"])
        hf_cfg = AutoConfig.for_model(**to_hf_config(cfg, str(_dtype(entry["dtype"])).removeprefix("torch.")))
        # On a GPU, initialising there takes seconds where the CPU takes minutes for real sizes.
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(hf_cfg, dtype=_dtype(entry["dtype"]))
        model.save_pretrained(entry["hf_dir"])
        del model
        g = torch.Generator().manual_seed(job["seed"])
        tokens = torch.randint(0, cfg.vocab_size, (job["microbatches"], job["mbs"], job["seq"] + 1), generator=g)
        torch.save(tokens, entry["tokens"])
    return {}


def ours_worker(job: dict) -> dict:
    """Our recipe's training step on a single-rank world."""
    import torch

    from model.config import ParallelConfig, model_config_from_dict
    from model.convert import check_hf_tensors, fill_from_hf
    from model.hf_io import HFWeights
    from model.parallel import destroy_distributed, init_distributed, te_available
    from recipes.engine import OptimConfig, build_engine, lm_batch
    from recipes.train import recompute_overrides, resolve_precision

    _cpu_threads(job)
    cfg = model_config_from_dict(job["model"])
    par = ParallelConfig()
    init_distributed(par, seed=job["seed"], model=cfg)
    dtype_name, fp8, note = resolve_precision(job["precision"], torch.cuda.is_available(), te_available())
    meter = MemoryMeter()
    meter.baseline()
    hf = HFWeights(job["hf_dir"])
    check_hf_tensors(hf, cfg)
    optim = OptimConfig(lr=OPTIM["lr"], min_lr=OPTIM["lr"], weight_decay=OPTIM["weight_decay"],
                        adam_beta1=OPTIM["adam_beta1"], adam_beta2=OPTIM["adam_beta2"],
                        adam_eps=OPTIM["adam_eps"], clip_grad=OPTIM["clip_grad"], decay_style="constant")
    engine = build_engine(cfg, par, optim, dtype=_dtype(dtype_name), max_steps=job["warmup"] + job["steps"],
                          init=lambda chunks: fill_from_hf(chunks, hf, cfg),
                          **fp8, **recompute_overrides(job["recompute"]))
    del hf  # closes the safetensors files, whose mapped pages would count as RSS
    microbatches = [lm_batch(t) for t in torch.load(job["tokens"])]
    result = _timed_steps(lambda: engine.train_step(microbatches)["loss"], job["warmup"], job["steps"], meter)
    destroy_distributed()
    return {**result, "dtype": dtype_name, "fp8_recipe": fp8.get("fp8_recipe"),
            "spec": "te" if te_available() else "local", "note": note}


def hf_worker(job: dict) -> dict:
    """The same step written the plain HF way: forward, fp32 cross-entropy, backward, clip, AdamW."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    _cpu_threads(job)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    meter = MemoryMeter()
    meter.baseline()
    model = AutoModelForCausalLM.from_pretrained(job["hf_dir"], dtype=_dtype(job["hf_dtype"]),
                                                 attn_implementation="sdpa").to(device)
    model.train()
    if job["recompute"] == "full":
        model.gradient_checkpointing_enable()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": OPTIM["weight_decay"]},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=OPTIM["lr"], betas=(OPTIM["adam_beta1"], OPTIM["adam_beta2"]),
                                  eps=OPTIM["adam_eps"], fused=device == "cuda")
    microbatches = torch.load(job["tokens"])
    total_tokens = sum(t[:, 1:].numel() for t in microbatches)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for tokens in microbatches:
            tokens = tokens.to(device)
            logits = model(input_ids=tokens[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
            (loss / total_tokens).backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, OPTIM["clip_grad"])
        optimizer.step()
        return (loss_sum / total_tokens).item()

    result = _timed_steps(step, job["warmup"], job["steps"], meter)
    return {**result, "dtype": job["hf_dtype"], "fp8_recipe": None, "spec": "sdpa",
            "experts": getattr(model.config, "_experts_implementation", None), "note": None}


WORKERS = {"weights": weights_worker, "ours": ours_worker, "hf": hf_worker}


def _run_worker(kind: str, job: dict, work: Path) -> dict:
    job_file, out_file = work / f"{kind}-{job.get('name', 'all')}.job.json", work / f"{kind}-{job.get('name', 'all')}.out.json"
    job_file.write_text(json.dumps(job))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "bench.train", "--worker", kind, "--job", str(job_file),
                           "--out", str(out_file)], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} worker for {job.get('name', 'all')} exited {proc.returncode}:\n"
                           + (proc.stdout + proc.stderr)[-4000:])
    return json.loads(out_file.read_text())


# --------------------------------------------------------------------------- driver


def environment() -> dict:
    """Device and software versions, for the record."""
    import platform
    from importlib.metadata import version

    import torch

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores"
    versions = {}
    for package in ("torch", "transformers", "megatron-core", "transformer-engine"):
        try:
            versions[package] = version(package)
        except Exception:
            pass
    return {"device": device, **versions}


def peak_tflops(override: float | None, arithmetic: str) -> float | None:
    """The GPU's dense peak for bf16/fp8/fp32 arithmetic; None on CPU or an unknown GPU."""
    import torch

    if override:
        return override
    if not torch.cuda.is_available():
        return None
    kind = gpu_kind(torch.cuda.get_device_name())
    return PEAK_TFLOPS[kind][arithmetic] if kind else None


def check_config(b: BenchConfig) -> tuple[list, tuple]:
    """(model configs, resolved precision) or ConfigError, before any worker starts."""
    import torch

    from model.parallel import te_available
    from recipes.train import PRECISIONS, resolve_precision

    problems = [f"--{k} must be >= 1, got {getattr(b, k)}" for k in ("seq", "mbs", "microbatches", "steps", "threads")
                if getattr(b, k) < 1]
    if b.warmup < 0:
        problems.append(f"--warmup must be >= 0, got {b.warmup}")
    if b.recompute not in RECOMPUTE:
        problems.append(f"--recompute must be one of {', '.join(RECOMPUTE)}")
    if b.precision not in PRECISIONS:
        problems.append(f"--precision must be one of {', '.join(PRECISIONS)}")
    if problems:
        raise ConfigError("; ".join(problems))
    overrides = {k: v for k, v in (("num_layers", b.layers), ("vocab_size", b.vocab)) if v}
    configs = [load_model_config(name, **overrides) for name in b.models]
    for cfg in configs:
        if b.seq > cfg.max_position_embeddings:
            raise ConfigError(f"--seq {b.seq} exceeds {cfg.name}'s max_position_embeddings {cfg.max_position_embeddings}")
    return configs, resolve_precision(b.precision, torch.cuda.is_available(), te_available())


def run_benchmark(b: BenchConfig, work: Path | None = None) -> dict:
    """Both sides for every model; {"environment", "config", "rows", "notes"}."""
    configs, (dtype_name, fp8, note) = check_config(b)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        entries = [{"name": cfg.name, "model": model_config_to_dict(cfg), "dtype": dtype_name,
                    "hf_dir": str(work / f"{cfg.name}-hf"), "tokens": str(work / f"{cfg.name}-tokens.pt")}
                   for cfg in configs]
        common = {"seed": b.seed, "seq": b.seq, "mbs": b.mbs, "microbatches": b.microbatches,
                  "warmup": b.warmup, "steps": b.steps, "recompute": b.recompute, "threads": b.threads}
        _run_worker("weights", {**common, "models": entries}, work)
        rows = []
        for cfg, entry in zip(configs, entries):
            job = {**common, **entry, "precision": b.precision, "hf_dtype": dtype_name}
            results = {kind: _run_worker(kind, job, work) for kind in ("ours", "hf")}
            for kind, r in results.items():
                rows.append(_row(cfg, kind, r, b, flops_per_token(cfg, b.seq)))
            ours, hf = rows[-2], rows[-1]
            ours["ratio"] = ours["tokens_per_s"] / hf["tokens_per_s"]
            for row, arithmetic in ((ours, "fp8" if fp8 else dtype_name), (hf, dtype_name)):
                peak = peak_tflops(b.peak_tflops, compute_precision(arithmetic))
                row["mfu"] = row["tflops"] / peak if peak else None
    return {"environment": environment(), "config": asdict(b), "rows": rows,
            "notes": [note] if note else []}


def _row(cfg, kind: str, r: dict, b: BenchConfig, flops: int) -> dict:
    median = statistics.median(r["step_times"])
    tokens = b.mbs * b.microbatches * b.seq
    precision = r["dtype"] + (f"+fp8_{r['fp8_recipe']}" if r.get("fp8_recipe") else "")
    return {"model": cfg.name, "impl": "ours" if kind == "ours" else "HF", "precision": precision,
            "spec": r["spec"], "experts": r.get("experts"), "seq": b.seq, "mbs": b.mbs,
            "microbatches": b.microbatches, "tokens_per_step": tokens, "median_s": median,
            "step_times": r["step_times"], "tokens_per_s": tokens / median,
            "flops_per_token": flops, "tflops": flops * tokens / median / 1e12, "mfu": None,
            "peak_bytes": r["peak_bytes"], "losses": r["losses"], "ratio": None}


def format_table(rows: list[dict]) -> str:
    head = ("model", "impl", "precision", "seq", "mbs x mb", "step ms", "tokens/s", "TFLOP/s", "MFU",
            "peak MiB", "loss@1", "ours/HF")
    table = [head]
    for r in rows:
        table.append((r["model"], r["impl"], r["precision"], str(r["seq"]), f"{r['mbs']}x{r['microbatches']}",
                      f"{r['median_s'] * 1e3:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['tflops']:.3g}",
                      "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%", f"{r['peak_bytes'] / 2**20:.0f}",
                      f"{r['losses'][0]:.5f}", "" if r["ratio"] is None else f"{r['ratio']:.2f}x"))
    return aligned(table, left=3)


def report(result: dict) -> str:
    env = result["environment"]
    c = result["config"]
    lines = [", ".join(f"{k} {v}" for k, v in env.items()),
             f"warm-up {c['warmup']} + timed {c['steps']} steps per side, median shown; recompute {c['recompute']}"
             + ("" if "cores" not in env["device"] else f"; {c['threads']} thread(s) per side"),
             format_table(result["rows"])]
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="hydra_conf/model name (repeatable); default tiny, tiny_moe")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16, fp8_delayed, fp8_tensorwise, "
                   "fp8_blockwise, mxfp8 (auto: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--mbs", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--recompute", default="none", help="none, selective or full (HF: gradient "
                   "checkpointing for full)")
    p.add_argument("--layers", type=int, default=None, help="keep only this many layers (a slice with the "
                   "real per-layer shapes)")
    p.add_argument("--vocab", type=int, default=None, help="override the vocabulary size")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: known GPUs)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per side (default 1; no effect on GPU)")
    p.add_argument("--json", default=None, help="also write all results (per-step times too) here")
    p.add_argument("--workdir", default=None, help="keep weights and worker outputs here")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.worker:
        result = WORKERS[args.worker](json.loads(Path(args.job).read_text()))
        Path(args.out).write_text(json.dumps(result))
        return 0
    b = BenchConfig(models=args.model or list(DEFAULT_MODELS), precision=args.precision, seq=args.seq,
                    mbs=args.mbs, microbatches=args.microbatches, warmup=args.warmup, steps=args.steps,
                    recompute=args.recompute, layers=args.layers, vocab=args.vocab,
                    peak_tflops=args.peak_tflops, seed=args.seed, threads=args.threads)
    try:
        result = run_benchmark(b, Path(args.workdir) if args.workdir else None)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
