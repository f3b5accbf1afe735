"""The DeepSpeed training engine: the same megatron-core Qwen3 model under ZeRO-1/2/3.

`trainer.backend=deepspeed` swaps recipes.engine's Megatron engine for this one. The
model is the one model.builder makes (TP=PP=CP=EP=1), wrapped by `deepspeed.initialize`;
the DeepSpeed config comes from the `deepspeed:` section (ZeRO stage, offload, buckets)
and the shared `optim:`/`trainer:` keys, and a raw DeepSpeed JSON may be laid over it.
The training loop (recipes.train) sees the same small interface as the Megatron engine:

    train_step(micro-batches) -> metrics   forward/backward/step, loss, lr, grad-norm
    save_state(dir, train_state)           DeepSpeed checkpoint + RNG + our metadata
    load_state(dir) -> train_state
    loss_fn, chunks, model_cfg

The LR schedule is megatron-core's OptimizerParamScheduler, as in the Megatron engine,
so both engines follow the same learning rates step for step. Nothing here imports
deepspeed at module import time: validation runs before launch without it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from model.config import ConfigError, ModelConfig, ParallelConfig
from model.ds_convert import DS_METADATA, read_deepspeed_metadata
from recipes.engine import MoEMetrics, _global_means, expert_load_ratio, forward_per_token
# The `deepspeed:` section lives with the config schema, which must not import
# megatron-core (as this module does).
from recipes.schema import DeepSpeedSettings

ZERO_STAGES = (1, 2, 3)


def deepspeed_problems(ds: DeepSpeedSettings, parallel: ParallelConfig, precision: str, recipe: str) -> list[str]:
    """Every reason this config cannot run on DeepSpeed (pure Python, before launch)."""
    problems = []
    sizes = (("tp", parallel.tp), ("pp", parallel.pp), ("cp", parallel.cp), ("ep", parallel.ep),
             ("etp", parallel.etp or 1))   # unset etp follows tp, reported above
    for name, value in sizes:
        if value != 1:
            problems.append(f"parallel.{name}={value} is not supported with trainer.backend=deepspeed "
                            "(ZeRO is data parallelism only; use trainer.backend=megatron)")
    if parallel.vpp is not None:
        problems.append(f"parallel.vpp={parallel.vpp} is not supported with trainer.backend=deepspeed")
    if recipe in ("rl", "distill"):   # both sample from the engine's megatron-core chunks
        problems.append(f"stage.recipe={recipe} is not supported with backend=deepspeed; "
                        "use trainer.backend=megatron")
    if ds.zero_stage not in ZERO_STAGES:
        problems.append(f"deepspeed.zero_stage={ds.zero_stage} must be 1, 2 or 3 "
                        "(plain data parallelism is trainer.backend=megatron)")
    for key in ("offload_optimizer", "offload_param"):
        if getattr(ds, key) not in ("none", "cpu"):
            problems.append(f"deepspeed.{key}={getattr(ds, key)!r} must be 'none' or 'cpu'")
    if ds.offload_param != "none" and ds.zero_stage != 3:
        problems.append(f"deepspeed.offload_param={ds.offload_param} needs deepspeed.zero_stage=3 "
                        f"(got {ds.zero_stage})")
    if precision.startswith("fp8") or precision == "mxfp8":
        problems.append(f"precision={precision} is not supported with trainer.backend=deepspeed (bf16 or fp32)")
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if getattr(ds, key) < 1:
            problems.append(f"deepspeed.{key}={getattr(ds, key)} must be >= 1")
    if ds.config is not None:
        try:
            raw = read_raw_config(ds.config)
        except ConfigError as e:
            problems.append(str(e))
        else:
            stage = zero_stage(ds)
            if stage not in ZERO_STAGES:
                problems.append(f"{ds.config}: zero_optimization.stage={stage} must be 1, 2 or 3")
            for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                        "optimizer", "scheduler", "fp16"):
                if key in raw:
                    problems.append(f"{ds.config}: '{key}' comes from the trainer/optim/precision config; "
                                    "remove it from the DeepSpeed JSON")
    return problems


def read_raw_config(path: str) -> dict:
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config={path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config={path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"deepspeed.config={path} must hold a JSON object")
    return raw


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(ds: DeepSpeedSettings, optim, micro_batch_size: int, grad_accum: int, world_size: int,
                     dtype: torch.dtype, cuda: bool) -> dict:
    """The DeepSpeed JSON for this run."""
    zero = {"stage": ds.zero_stage, "reduce_bucket_size": ds.reduce_bucket_size,
            "allgather_bucket_size": ds.allgather_bucket_size, "overlap_comm": ds.overlap_comm}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": cuda}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": cuda}
    adam = {"lr": optim.lr, "betas": [optim.adam_beta1, optim.adam_beta2], "eps": optim.adam_eps,
            "weight_decay": optim.weight_decay}
    if not cuda:
        # DeepSpeed's CPU Adam and FusedAdam are C++ ops it JIT-compiles on first use
        # (about 80 s); torch's AdamW is the same update and needs no compiler.
        adam["torch_adam"] = True
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": optim.clip_grad,
        "optimizer": {"type": "AdamW", "params": adam},
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(config, read_raw_config(ds.config)) if ds.config else config


# ----------------------------------------------------------------------------- CPU path


def prepare_cpu_runtime(scratch: Path | None = None) -> None:
    """Make DeepSpeed start fast and offline on a machine without CUDA.

    Active only when CUDA is absent; on GPUs DeepSpeed runs untouched. Call before
    `deepspeed.initialize`. Kept here rather than in the megatron-core CPU layer under
    model/, which every entry point uses, while deepspeed is imported only by this backend.
    """
    if torch.cuda.is_available():
        return
    if scratch is not None:
        # Any JIT build DeepSpeed still attempts lands in the run directory, not in ~/.cache.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(scratch) / "torch_extensions"))
    import deepspeed.comm.torch  # noqa: F401

    # Its CPU backend compiles a shared-memory all-reduce op with g++/ninja (about 50 s) on
    # first use; without it, gloo does the collectives. `deepspeed.comm.torch` resolves to
    # torch through attribute access, hence sys.modules.
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


# ----------------------------------------------------------------------------- engine


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Megatron-core's default grouping: no weight decay on biases and 1-D (norm) weights.

    `wd_mult`/`lr_mult` are read by megatron-core's OptimizerParamScheduler.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() == 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "wd_mult": 1.0, "lr_mult": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "wd_mult": 0.0, "lr_mult": 1.0}]
    return [g for g in groups if g["params"]]


@dataclass
class DeepSpeedEngine(MoEMetrics):
    model_cfg: ModelConfig
    parallel: ParallelConfig
    ds: object                           # deepspeed.DeepSpeedEngine around the GPTModel
    scheduler: object                    # megatron-core OptimizerParamScheduler
    zero_stage: int
    loss_fn: Callable = None
    report_keys: tuple = ("lm loss",)         # as Engine.report_keys
    loss_positions_only: bool = False         # as Engine.loss_positions_only
    steps: int = 0
    _load_ratio: torch.Tensor | None = None   # MoE: set after each step's backward passes

    def __post_init__(self):
        from recipes.engine import masked_lm_loss

        self.loss_fn = self.loss_fn or masked_lm_loss

    @property
    def chunks(self) -> list:
        # What the loop and tools expect of an engine: the model, for its device.
        return [self.ds.module]

    def train_step(self, microbatches: list[dict]) -> dict:
        """One optimizer step over this rank's micro-batches; the same metrics as the
        Megatron engine (recipes.engine.Engine.train_step), identical on every rank.

        Each micro-batch's loss is its token mean; DeepSpeed divides by the accumulation
        steps and averages over data-parallel ranks, which is megatron-core's reduction.
        """
        if len(microbatches) != self.ds.gradient_accumulation_steps():
            raise ValueError(f"{len(microbatches)} micro-batches per step, but DeepSpeed was configured for "
                             f"{self.ds.gradient_accumulation_steps()}")
        self.ds.train()
        if self.model_cfg.is_moe:
            from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

            # The balancing loss's gradient is injected at its own scale, which megatron-core's
            # schedule sets per step; DeepSpeed's 1/accumulation scaling does not reach it.
            MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1) / len(microbatches))
        reports = []
        for micro in microbatches:
            batch, per_token = forward_per_token(self.ds, micro, self.loss_positions_only)
            loss_sum, num_tokens, report = self.loss_fn(batch, per_token)
            self.ds.backward(loss_sum / num_tokens.clamp(min=1))
            reports.append(report)
            self.ds.step()   # applies the update only at the accumulation boundary
        means = _global_means(reports, next(self.ds.module.parameters()).device, self.report_keys)
        metrics = {"loss": means.pop("lm loss"), **means, "lr": self.ds.get_lr()[0]}
        if self.model_cfg.is_moe:
            from megatron.core.distributed.finalize_model_grads import reset_model_temporary_tensors

            # megatron-core's finalize step (which DeepSpeed does not run) reads and then
            # clears the routers' global-batch token counts; the metrics clear the tracker.
            self._load_ratio = expert_load_ratio(self.chunks)
            reset_model_temporary_tensors(self.ds.module.config, self.chunks)
            metrics.update(self._moe_metrics(len(microbatches)))
        applied = self.ds.was_step_applied()
        if applied:
            self.scheduler.step(increment=1)
            self.steps += 1
        grad_norm = self.ds.get_global_grad_norm() if applied else None
        return {**metrics, "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                "update_successful": applied, "skipped": not applied}

    # ------------------------------------------------------------------ checkpoints

    def save_state(self, path: Path, train_state: dict) -> None:
        """Collective: DeepSpeed's checkpoint of model, optimizer and ZeRO partitions into
        `path` (which the caller renames into place), this rank's RNG, and our metadata."""
        import torch.distributed as dist

        from model.config import model_config_to_dict
        from recipes.checkpointing import _layout_signature, _rng_state

        path = Path(path)
        self.ds.save_checkpoint(str(path.parent), tag=path.name, save_latest=False,
                                client_state={"scheduler": self.scheduler.state_dict()})
        torch.save(_rng_state(), path / f"rng_rank{dist.get_rank():05d}.pt")
        dist.barrier()
        if dist.get_rank() == 0:
            meta = {"model": model_config_to_dict(self.model_cfg), "zero_stage": self.zero_stage,
                    "train_state": train_state, "layout": _layout_signature(), "step": train_state["step"]}
            (path / DS_METADATA).write_text(json.dumps(meta, indent=2) + "\n")
        dist.barrier()

    def load_state(self, path: Path) -> dict:
        """Collective: restore everything `save_state` wrote; returns the training state."""
        import torch.distributed as dist

        from recipes.checkpointing import _layout_signature, _set_rng_state

        path = Path(path)
        if problem := resume_problem(path, self.zero_stage, dist.get_world_size()):
            raise ConfigError(problem)
        meta = read_deepspeed_metadata(path)
        _, client = self.ds.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
        self.scheduler.load_state_dict(client["scheduler"])
        if meta["layout"] == _layout_signature():
            _set_rng_state(torch.load(path / f"rng_rank{dist.get_rank():05d}.pt", weights_only=False))
        self.steps = meta["train_state"]["step"]
        return dict(meta["train_state"])


def zero_stage(ds: DeepSpeedSettings) -> int:
    """The ZeRO stage a run uses (a raw JSON may set it)."""
    raw = read_raw_config(ds.config) if ds.config else {}
    return raw.get("zero_optimization", {}).get("stage", ds.zero_stage)


def resume_problem(path: Path, stage: int, world_size: int) -> str | None:
    """Why this run cannot resume the DeepSpeed checkpoint `path` (None when it can):
    DeepSpeed reloads ZeRO partitions only at the stage and rank count that wrote them."""
    meta = read_deepspeed_metadata(path)
    if meta["zero_stage"] != stage:
        return (f"{path} was written with ZeRO-{meta['zero_stage']}; resume it with "
                f"deepspeed.zero_stage={meta['zero_stage']}, or start a new stage from it with init_from=")
    if meta["layout"]["world_size"] != world_size:
        return (f"{path} was written by {meta['layout']['world_size']} DeepSpeed ranks, this run has "
                f"{world_size}; resume at the same size, or start a new stage from it with init_from=")
    return None


def build_deepspeed_engine(model_cfg: ModelConfig, par: ParallelConfig, optim, ds_settings: DeepSpeedSettings,
                           micro_batch_size: int, global_batch_size: int, dtype: torch.dtype = torch.float32,
                           init: Callable[[list], None] | None = None, max_steps: int | None = None,
                           scratch: Path | None = None, **config_overrides) -> DeepSpeedEngine:
    """The megatron-core model wrapped by deepspeed.initialize, with megatron-core's LR
    schedule. Call model.parallel.init_distributed first (TP=PP=1: DP is the world)."""
    import torch.distributed as dist

    from model.builder import build_model
    from recipes.engine import lr_scheduler

    optim = optim.check()
    prepare_cpu_runtime(scratch)
    import deepspeed

    world = dist.get_world_size()
    if global_batch_size % (micro_batch_size * world):
        raise ConfigError(f"global_batch_size={global_batch_size} is not divisible by "
                          f"micro_batch_size*dp={micro_batch_size}*{world}")
    (model,) = build_model(model_cfg, par, dtype=dtype, **config_overrides)
    if init is not None:
        init([model])
    config = deepspeed_config(ds_settings, optim, micro_batch_size, global_batch_size // (micro_batch_size * world),
                              world, dtype, torch.cuda.is_available())
    groups = _param_groups(model, optim.weight_decay)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=config,
                                                   dist_init_required=False)
    scheduler = lr_scheduler(optimizer, optim, max_steps or 1)
    return DeepSpeedEngine(model_cfg, par, engine, scheduler, config["zero_optimization"]["stage"])
