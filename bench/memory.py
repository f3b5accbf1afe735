"""Measured memory of a real training step against `model.plan`'s estimate.

    python -m bench.memory [--cases single|two_ranks] [--vocab N] [--json FILE]

Each case builds the model through `recipes.engine.build_engine` (megatron-core DDP and
optimizer, as in training) on CPU, takes one `Engine.train_step` on one micro-batch per
rank, and measures, on rank 0:

  params       bytes of the storages behind the model's parameters (megatron-core DDP's
               parameter buffer when it has one, so its padding counts);
  grads        bytes of the storages behind every parameter's `main_grad` (DDP's fp32
               gradient buffer);
  optimizer    the optimizer's parameters that are not model parameters (fp32 master
               copies) and its state (Adam exp_avg, exp_avg_sq, step);
  activations  the tensors autograd saves for backward during the model's forward,
               caught by a `torch.autograd.graph.saved_tensors_hooks` pack hook around
               GPTModel.forward: unique storages, parameters excluded. With one
               micro-batch and no pipeline they are all alive at the end of the forward,
               which is when activation memory peaks.

The estimate is `model.plan.rank_memory` with `spec=local` (the CPU layer specs). The
planner's transient terms (the fp32 logit gradient, a recomputed layer) live only
inside backward and are not measured here. `--cases two_ranks` re-launches itself on two
processes: data parallelism with and without the distributed optimizer, TP=2 with
sequence parallelism, and EP=2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from model.config import ParallelConfig, load_model_config
from model.plan import aligned


@dataclass(frozen=True)
class Case:
    model: str
    precision: str           # fp32 or bf16
    seq: int
    mbs: int
    recompute: str = "none"
    distopt: bool = True
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def name(self) -> str:
        par = self.parallel
        layout = "".join(f"{k}{v}" for k, v in (("tp", par.tp), ("ep", par.ep)) if v > 1) or "-"
        return (f"{self.model} {self.precision} s{self.seq} b{self.mbs} {self.recompute} "
                f"{'distopt' if self.distopt else 'plain'} {layout}")


CASES = {
    "single": [
        Case("tiny", "fp32", 64, 2),
        Case("tiny", "fp32", 128, 1, "selective"),
        Case("tiny", "fp32", 96, 2, "full", distopt=False),
        Case("tiny", "bf16", 32, 2),
        Case("tiny_moe", "fp32", 64, 2),
        Case("tiny_moe", "fp32", 128, 1, "full"),
    ],
    "two_ranks": [
        Case("tiny", "fp32", 64, 2),
        Case("tiny", "fp32", 64, 2, distopt=False),
        Case("tiny", "fp32", 64, 2, parallel=ParallelConfig(tp=2, sp=True)),
        Case("tiny_moe", "fp32", 64, 2, parallel=ParallelConfig(ep=2, etp=1)),
    ],
}
NPROCS = {"single": 1, "two_ranks": 2}


def _storage(t) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _unique_bytes(tensors, exclude: set[int] = frozenset()) -> tuple[int, set[int]]:
    seen: dict[int, int] = {}
    for t in tensors:
        ptr, nbytes = _storage(t)
        if ptr not in exclude:
            seen[ptr] = nbytes
    return sum(seen.values()), set(seen)


def measured_state_bytes(engine) -> dict:
    """Bytes of parameters, main grads and optimizer state held by this rank."""
    import torch

    params = [p for c in engine.chunks for p in c.parameters()]
    param_bytes, param_ptrs = _unique_bytes(params)
    grad_bytes, grad_ptrs = _unique_bytes(p.main_grad for p in params if getattr(p, "main_grad", None) is not None)
    inner = [o.optimizer for o in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer])]
    tensors = [p for o in inner for g in o.param_groups for p in g["params"]]
    tensors += [v for o in inner for state in o.state.values() for v in state.values() if torch.is_tensor(v)]
    optim_bytes, _ = _unique_bytes(tensors, exclude=param_ptrs | grad_ptrs)
    return {"params": param_bytes, "grads": grad_bytes, "optimizer": optim_bytes}


def train_step_saved_bytes(engine, microbatches: list[dict]) -> tuple[int, dict]:
    """(bytes autograd saves in the model's forward, step metrics) for one train_step."""
    import torch

    params = {_storage(p)[0] for c in engine.chunks for p in c.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr, nbytes = _storage(t)
        if ptr not in params:
            saved[ptr] = nbytes
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    handles = []
    for c in engine.chunks:
        # Only the model's forward: recompute re-runs layers inside backward, and those
        # tensors are not held at the forward's peak.
        handles.append(c.module.register_forward_pre_hook(lambda *_: hooks.__enter__()))
        handles.append(c.module.register_forward_hook(lambda *_: hooks.__exit__(None, None, None)))
    try:
        metrics = engine.train_step(microbatches)
    finally:
        for h in handles:
            h.remove()
    return sum(saved.values()), metrics


def run_case(case: Case, vocab: int | None, seed: int = 1234) -> dict:
    """Collective: build, one step, measure; the estimate for the same setting."""
    import torch
    import torch.distributed as dist

    from model.parallel import init_distributed, reset_model_parallel
    from model.plan import rank_memory
    from recipes.engine import OptimConfig, build_engine, lm_batch
    from recipes.train import recompute_overrides

    cfg = load_model_config(case.model, **({"vocab_size": vocab} if vocab else {}))
    layout = init_distributed(case.parallel, seed=seed, model=cfg)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[case.precision]
    engine = build_engine(cfg, case.parallel, OptimConfig(use_distributed_optimizer=case.distopt,
                                                          decay_style="constant"),
                          dtype=dtype, **recompute_overrides(case.recompute))
    g = torch.Generator().manual_seed(seed + dist.get_rank() // (case.parallel.tp * case.parallel.cp))
    batch = [lm_batch(torch.randint(0, cfg.vocab_size, (case.mbs, case.seq + 1), generator=g))]
    activations, metrics = train_step_saved_bytes(engine, batch)
    measured = {**measured_state_bytes(engine), "activations": activations}
    est = rank_memory(cfg, case.parallel, layout.world_size, case.seq, case.mbs, 1, case.precision,
                      case.distopt, case.recompute, spec="local")
    estimated = {"params": est.params, "grads": est.grads, "optimizer": est.optimizer,
                 "activations": est.activations.saved}
    del engine
    reset_model_parallel()
    return {"case": case.name, "world": layout.world_size, "loss": metrics["loss"],
            "estimated": estimated, "measured": measured}


def error(estimated: int, measured: int) -> float:
    return (estimated - measured) / measured


def format_table(results: list[dict]) -> str:
    head = ("case", "world", "component", "estimated MiB", "measured MiB", "error")
    rows = [head]
    for r in results:
        for key in ("params", "grads", "optimizer", "activations"):
            e, m = r["estimated"][key], r["measured"][key]
            rows.append((r["case"], str(r["world"]), key, f"{e / 2**20:.3f}", f"{m / 2**20:.3f}",
                         f"{100 * error(e, m):+.2f}%"))
    return aligned(rows, left=3)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    p.add_argument("--cases", choices=sorted(CASES), default="single")
    p.add_argument("--vocab", type=int, default=None, help="override the models' vocabulary size")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    from model.launch import relaunch_if_needed

    relaunch_if_needed("bench.memory", argv, NPROCS[args.cases])
    import torch.distributed as dist

    from model.parallel import destroy_distributed

    results = [run_case(case, args.vocab) for case in CASES[args.cases]]
    if dist.get_rank() == 0:
        print(format_table(results))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
