"""The one training loop. Every stage (pretraining, SFT, RL, distillation) runs it.

A stage is a `Recipe`: it validates its own config before anything starts, and builds a
`Task` once the model exists: where each step's batches come from, the loss, and any
metrics of its own. Everything else lives here, once:

- config checks (layout, batch sizes, precision, data) before any process or GPU is used;
- multi-process launch (re-runs itself under torchrun when the layout needs more ranks);
- engine: megatron-core model, DDP, optimizer and LR schedule (recipes.engine), or the
  same model under DeepSpeed ZeRO (`trainer.backend=deepspeed`, recipes.deepspeed_engine);
- resume from the stage's `latest` checkpoint, or weights from `stage.init_from`;
- NaN/Inf guard, logging, periodic atomic checkpoints, and stopping cleanly on SIGTERM/USR1;
- a `final.json` marker when the stage is done, which the next stage starts from.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from omegaconf import DictConfig, OmegaConf

from model.config import (ConfigError, ModelConfig, ParallelConfig, from_dict, model_config_from_dict,
                          padded_vocab_size)
from model.parallel import layout_problems, minimum_world_size, te_available
from recipes.hf_export import export_problems, export_stage, wants_export

# Exit code after a clean stop on SIGTERM/SIGUSR1 with the checkpoint written: "try again"
# (EX_TEMPFAIL), so a batch script can tell preemption from failure and requeue.
EXIT_PREEMPTED = 75
EXIT_CONFIG = 2

PRECISIONS = ("auto", "fp32", "bf16", "fp8_delayed", "fp8_tensorwise", "fp8_blockwise", "mxfp8")
# TE's FP8 formats: delayed and tensorwise scaling use E4M3 forward / E5M2 backward
# ("hybrid"); the block-scaled recipes are E4M3 throughout.
_FP8_FORMAT = {"delayed": "hybrid", "tensorwise": "hybrid", "blockwise": "e4m3", "mxfp8": "e4m3"}


@dataclass
class TrainerConfig:
    """The `trainer:` section (its type and defaults; recipes.schema puts it in the root config)."""

    # Training engine: "megatron" (TP/PP/CP/EP, the default) or "deepspeed" (ZeRO-1/2/3
    # data parallelism with optional CPU offload; settings in the `deepspeed:` section).
    backend: str = "megatron"
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 8
    max_steps: int = 100
    log_interval: int = 10
    save_interval: int = 50
    keep_last: int = 2
    # The distributed optimizer's checkpoint format: "dp_reshardable" (no gather at a save;
    # resumes at the same layout, DP may change), "fully_reshardable" (gathers every optimizer
    # state at each save; resumes at any layout) or "auto": the first on GPU, the second on
    # CPU (model.builder.TRAINING_DEFAULTS; costs in recipes/checkpointing.py).
    optimizer_checkpoint: str = "auto"
    # "auto": continue this stage from its latest checkpoint when there is one; "never".
    resume: str = "auto"
    # Activation recompute: "none", "selective" (attention core) or "full" (every layer).
    recompute: str = "none"
    # Non-finite loss: "skip" the update and count it, aborting after max_nan_steps in
    # total; "abort" at the first one. The last good checkpoint is kept either way.
    nan_policy: str = "skip"
    max_nan_steps: int = 10
    # Processes to start when launched as a single process; None: what the layout needs.
    nprocs: int | None = None
    # Fault injection for testing the NaN guard: steps whose loss is made NaN.
    inject_nan_at_steps: list[int] = field(default_factory=list)
    # The final checkpoint also as an HF directory, <stage dir>/hf/ (recipes.hf_export):
    # "auto" for post-training stages (Recipe.post_training), "true" every stage, "false" none.
    export_hf: str = "auto"


@dataclass
class Task:
    """What a stage plugs into the loop."""

    # consumed samples -> this data-parallel rank's micro-batches for the next step
    batches: Callable[[int], list[dict]]
    loss_fn: Callable | None = None
    # per-step metrics from this rank's micro-batches: {name: tensor to sum over DP ranks}
    batch_counts: Callable[[list[dict]], dict] | None = None
    # counters -> metrics to log (e.g. data-mix fractions)
    summarize: Callable[[dict], dict] | None = None
    tokens_per_step: int = 0
    # the step's metrics -> more metrics to log (RL: rollout statistics, entropy control)
    after_step: Callable[[dict], dict] | None = None
    # loss_fn report entries ([sum, count]) to average and log besides "lm loss"
    report_keys: tuple = ()
    # Project onto the vocabulary only where loss_mask is set (SFT, RL, distillation: the
    # response tokens); loss_fn then gets logits [n, vocab / tp] for those positions, or
    # per-token losses that are 0 elsewhere (recipes.engine.forward_per_token).
    loss_positions_only: bool = False
    # the stage's own state (RL: prompt cursor, entropy coefficient): saved in every
    # checkpoint and restored on resume, so it must stay picklable
    state: dict = field(default_factory=dict)
    # checkpoints the stage reads besides its starting weights ({"teacher": path}),
    # recorded in final.json so that a pipeline can check what each stage consumed
    sources: dict = field(default_factory=dict)


class Recipe(Protocol):
    name: str        # the value of stage.recipe this recipe runs
    module: str      # `python -m` module, for re-launching under torchrun
    # SFT, RL, distillation: the stage ends in a model to use, exported to <stage dir>/hf/
    # unless trainer.export_hf says otherwise (pretraining: a checkpoint on the way)
    post_training: bool

    def validate(self, cfg: DictConfig, settings: "Settings") -> None: ...

    def task(self, cfg: DictConfig, settings: "Settings", engine) -> Task: ...


def recipe_for(name: str) -> Recipe:
    """The Recipe of `stage.recipe: <name>`: `RECIPE` of the module recipes.<name>."""
    import importlib

    try:
        module = importlib.import_module(f"recipes.{name}")
    except ModuleNotFoundError:
        raise ConfigError(f"stage.recipe={name!r}: there is no recipes/{name}.py") from None
    recipe = getattr(module, "RECIPE", None)
    if recipe is None:
        raise ConfigError(f"stage.recipe={name!r}: recipes/{name}.py defines no RECIPE")
    return recipe


@dataclass
class Settings:
    model: ModelConfig
    parallel: ParallelConfig
    trainer: TrainerConfig
    optim: object              # recipes.schema.OptimConfig
    precision: str
    stage_dir: Path
    run_dir: Path
    deepspeed: object = None   # recipes.schema.DeepSpeedSettings


def _typed(cls, node, where: str):
    return from_dict(cls, OmegaConf.to_container(node, resolve=True) if node is not None else {}, where)


def settings_from(cfg: DictConfig) -> Settings:
    """Typed, checked settings from the composed config (no torch.distributed needed)."""
    from recipes.schema import DeepSpeedSettings, OptimConfig

    parallel = _typed(ParallelConfig, cfg.parallel, "parallel")
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if model.get("vocab_size") is None:   # the tokenizer's, padded (model.config.padded_vocab_size)
        from data_pipeline.tokenizer import load_tokenizer

        try:
            model["vocab_size"] = padded_vocab_size(len(load_tokenizer(cfg.tokenizer)), parallel.tp)
        except ConfigError as e:
            raise ConfigError(f"model {model.get('name')} takes its vocab_size from the tokenizer: {e}") from None
    model = model_config_from_dict(model)
    trainer = _typed(TrainerConfig, cfg.trainer, "trainer")
    optim = _typed(OptimConfig, cfg.optim, "optim").check()
    deepspeed = _typed(DeepSpeedSettings, cfg.get("deepspeed"), "deepspeed")
    run_dir = Path(str(cfg.run.root)) / str(cfg.run.name)
    return Settings(model, parallel, trainer, optim, str(cfg.precision), run_dir / str(cfg.stage.name), run_dir,
                    deepspeed)


def chat_tokenizer(cfg: DictConfig, s: Settings):
    """The stage's tokenizer (`tokenizer=`), checked: a Qwen3 chat tokenizer whose ids fit
    the model's vocabulary (ConfigError otherwise)."""
    from data_pipeline.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer)
    if len(tokenizer) > s.model.vocab_size:
        raise ConfigError(f"tokenizer {cfg.tokenizer} has {len(tokenizer)} tokens, more than "
                          f"model.vocab_size={s.model.vocab_size}")
    if "<|im_start|>" not in tokenizer.get_vocab():
        raise ConfigError(f"tokenizer {cfg.tokenizer} has no <|im_start|>: not a Qwen3 chat tokenizer")
    return tokenizer


def check_settings(s: Settings, world_size: int, recipe: str = "") -> None:
    """Every generic reason this run cannot start, as one ConfigError line."""
    from recipes.schema import BACKENDS

    t = s.trainer
    align = fp8_align(s.precision)
    problems = layout_problems(s.model, s.parallel, world_size, t.seq_length, fp8=align > 1, fp8_align=align)
    if t.backend not in BACKENDS:
        problems.append(f"trainer.backend={t.backend!r} must be one of {', '.join(BACKENDS)}")
    elif t.backend == "deepspeed":   # imports megatron-core: only for the stages that use it
        from recipes.deepspeed_engine import deepspeed_problems

        problems += deepspeed_problems(s.deepspeed, s.parallel, s.precision, recipe)
    for name in ("seq_length", "micro_batch_size", "global_batch_size", "max_steps", "save_interval",
                 "log_interval", "keep_last"):
        if getattr(t, name) < 1:
            problems.append(f"trainer.{name}={getattr(t, name)} must be >= 1")
    if not problems:
        dp = world_size // (s.parallel.tp * s.parallel.pp * s.parallel.cp)
        if t.global_batch_size % (t.micro_batch_size * dp):
            problems.append(f"trainer.global_batch_size={t.global_batch_size} is not divisible by "
                            f"micro_batch_size*dp={t.micro_batch_size}*{dp}")
    if t.resume not in ("auto", "never"):
        problems.append(f"trainer.resume={t.resume!r} must be 'auto' or 'never'")
    if t.recompute not in ("none", "selective", "full"):
        problems.append(f"trainer.recompute={t.recompute!r} must be none, selective or full")
    if t.nan_policy not in ("skip", "abort"):
        problems.append(f"trainer.nan_policy={t.nan_policy!r} must be 'skip' or 'abort'")
    if t.optimizer_checkpoint not in ("auto", "dp_reshardable", "fully_reshardable"):
        problems.append(f"trainer.optimizer_checkpoint={t.optimizer_checkpoint!r} must be auto, "
                        "dp_reshardable or fully_reshardable")
    problems += export_problems(t)
    try:
        s.optim.schedule(t.max_steps)
    except ConfigError as e:
        problems.append(str(e))
    if s.precision not in PRECISIONS:
        problems.append(f"precision={s.precision!r} is not one of {', '.join(PRECISIONS)}")
    else:
        import torch

        try:
            resolve_precision(s.precision, torch.cuda.is_available(), te_available())
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("; ".join(problems))


def fp8_align(precision: str) -> int:
    """The token multiple FP8 GEMMs need under `precision=` (1 without FP8). Sequence
    widths are checked against it on any machine, so that a config that passes here also
    runs on the GPUs it is meant for."""
    recipe = precision.removeprefix("fp8_")
    if recipe not in _FP8_FORMAT:
        return 1
    from megatron.core.enums import Fp8Recipe   # only FP8 runs pay for the import here
    from megatron.core.fp8_utils import get_fp8_align_size

    return get_fp8_align_size(Fp8Recipe(recipe))


def resolve_precision(precision: str, cuda: bool, te: bool) -> tuple[str, dict, str | None]:
    """(dtype name, TransformerConfig overrides, note for the user) for `precision=`."""
    import torch

    if precision == "auto":
        return ("bf16" if cuda else "fp32"), {}, None
    if precision in ("fp32", "bf16"):
        return precision, {}, None
    recipe = precision.removeprefix("fp8_")
    if not cuda:
        return "fp32", {}, (f"precision={precision} needs Transformer Engine on a CUDA GPU; this machine has "
                            "no CUDA, so FP8 is off and the run uses fp32")
    if not te:
        raise ConfigError(f"precision={precision} needs Transformer Engine, which is not importable here "
                          "(use NVIDIA's PyTorch container, or precision=bf16)")
    if recipe == "mxfp8" and torch.cuda.get_device_capability()[0] < 10:
        raise ConfigError("precision=mxfp8 needs a Blackwell GPU (compute capability 10+); "
                          "use fp8_blockwise or fp8_delayed on Hopper")
    if recipe == "blockwise" and (why := _fp8_blockwise_unsupported()):
        raise ConfigError(f"precision=fp8_blockwise cannot run here: {why}; use fp8_tensorwise or fp8_delayed")
    overrides = {"fp8": _FP8_FORMAT[recipe], "fp8_recipe": recipe}
    if recipe == "delayed":
        overrides.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    return "bf16", overrides, None


def _fp8_blockwise_unsupported() -> str | None:
    """Why FP8 block scaling cannot run on this GPU (None when it can): megatron-core builds
    TE's Float8BlockScaling from TE 2.3, and TE's own check says whether the device and CUDA
    have its GEMMs (Hopper with CUDA >= 12.9, at the time of writing)."""
    import importlib
    import importlib.util

    from megatron.core.utils import is_te_min_version

    if not is_te_min_version("2.3.0.dev0"):
        return "megatron-core uses Transformer Engine's Float8BlockScaling from TE 2.3"
    for module in ("transformer_engine.pytorch.fp8", "transformer_engine.pytorch.quantization"):  # TE moved it
        if importlib.util.find_spec(module) is None:
            continue
        check = getattr(importlib.import_module(module), "check_fp8_block_scaling_support", None)
        if check is not None:
            supported, reason = check()
            return None if supported else reason
    return None


def recompute_overrides(mode: str) -> dict:
    if mode == "selective":
        return {"recompute_granularity": "selective"}
    if mode == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    return {}


def starting_point(cfg: DictConfig, s: Settings, report=None) -> tuple[Path | None, Path | None]:
    """(checkpoint to resume this stage from, checkpoint to take initial weights from).

    A stage with a checkpoint of its own continues from it (a restart after a crash or a
    requeue): the newest one that matches its manifest (checkpointing.resume_point; with
    `report`, in the job, a collective full check that sets damaged ones aside). Otherwise
    it starts from the top-level `init_from` when given, else the stage's own
    `stage.init_from`, else from random weights.
    """
    from recipes import checkpointing as ckpt

    resume_from = ckpt.resume_point(s.stage_dir, report) if s.trainer.resume == "auto" else None
    source = cfg.get("init_from") or cfg.stage.get("init_from")
    if resume_from is None and source:
        return None, ckpt.resolve_init_from(str(source), s.run_dir)
    return resume_from, None


def check_start(resume_from: Path | None, init_from: Path | None, s: Settings, world_size: int) -> None:
    """The checkpoints a run starts from must suit its engine and layout."""
    from model.ds_convert import is_deepspeed_checkpoint
    from recipes import checkpointing as ckpt
    from recipes.deepspeed_engine import resume_problem, zero_stage

    if resume_from is not None and (problem := ckpt.backend_mismatch(resume_from, s.trainer.backend)):
        raise ConfigError(problem)
    if resume_from is not None and not s.optim.override_schedule and (
            change := ckpt.schedule_change(resume_from, s.optim, s.trainer.max_steps)):
        raise ConfigError(f"resuming {resume_from} with another LR schedule ({change}); megatron-core would "
                          "keep the saved one: pass optim.override_schedule=true to rebuild it, or the old settings")
    if resume_from is not None and s.trainer.backend == "deepspeed" and (
            problem := resume_problem(resume_from, zero_stage(s.deepspeed), world_size)):
        raise ConfigError(problem)
    if resume_from is not None and (problem := ckpt.optimizer_layout_problem(resume_from, s.parallel)):
        raise ConfigError(problem)
    if init_from is not None and is_deepspeed_checkpoint(init_from) and (
            s.parallel.tp > 1 or s.parallel.pp > 1):
        raise ConfigError(f"init_from {init_from} is a DeepSpeed checkpoint, which loads at tp=pp=1 only; "
                          "convert it first: python -m model.convert ds-to-mcore --ckpt CKPT --out DIR")


def build_training_engine(s: Settings, dtype, init, **config_overrides):
    """The engine `trainer.backend` names, around the same megatron-core model."""
    t = s.trainer
    if t.backend == "deepspeed":
        from recipes.deepspeed_engine import build_deepspeed_engine

        return build_deepspeed_engine(s.model, s.parallel, s.optim, s.deepspeed, t.micro_batch_size,
                                      t.global_batch_size, dtype=dtype, init=init, max_steps=t.max_steps,
                                      scratch=s.run_dir, **config_overrides)
    from recipes.engine import build_engine

    return build_engine(s.model, s.parallel, s.optim, dtype=dtype, max_steps=t.max_steps, init=init,
                        **config_overrides)


class _StopFlag:
    """SIGTERM / SIGUSR1 (SLURM's warning before the time limit or preemption) ask the
    loop to finish the current step, checkpoint and exit with EXIT_PREEMPTED.

    SLURM signals every process of the job step, including the helpers megatron-core
    starts to write checkpoints (a spawned multiprocessing Manager with default handlers,
    which the signal would kill in the middle of the very save it asks for). So the signals
    are also blocked in this thread: children inherit the mask, and `requested` collects a
    signal that is left pending instead of handled."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signal = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)

    def _handle(self, signum, frame):
        self.signal = signum

    def requested(self) -> int | None:
        if self.signal is None and set(self.SIGNALS) & signal.sigpending():
            info = signal.sigtimedwait(self.SIGNALS, 0)
            self.signal = info.si_signo if info else None
        return self.signal

    def close(self) -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)


def validate(cfg: DictConfig, recipe: Recipe) -> tuple[Settings, int]:
    """Every check a stage makes before it launches anything: (settings, processes to
    launch). Raises ConfigError with one line naming every problem found."""
    if str(cfg.stage.recipe) != recipe.name:
        raise ConfigError(f"stage {cfg.stage.name} is a {cfg.stage.recipe} stage; "
                          f"run it with python -m recipes.{cfg.stage.recipe}")
    s = settings_from(cfg)
    nprocs = s.trainer.nprocs or minimum_world_size(s.parallel)
    world_size = int(os.environ.get("WORLD_SIZE", nprocs))
    check_settings(s, world_size, str(cfg.stage.recipe))
    check_start(*starting_point(cfg, s), s, world_size)
    recipe.validate(cfg, s)
    if wants_export(s.trainer.export_hf, recipe.post_training):
        chat_tokenizer(cfg, s)   # the HF export saves it: refused now rather than after training
    return s, nprocs


def run(cfg: DictConfig, recipe: Recipe) -> int:
    """Validate, launch, train. Returns the process exit code."""
    import warnings

    from model.parallel import quiet_other_ranks

    job_started = time.perf_counter()
    quiet_other_ranks()   # before validate imports megatron-core, for its import warnings too
    launched = "WORLD_SIZE" in os.environ
    # A process that may re-launch itself under torchrun holds back the warnings of
    # validation's imports (rank 0 would print them again) and shows them only if it trains.
    held, show = [], warnings.showwarning
    if not launched:
        warnings.showwarning = lambda *args: held.append(args)
    try:
        s, nprocs = validate(cfg, recipe)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        warnings.showwarning = show
    if not launched and nprocs > 1:
        from model.launch import relaunch_if_needed

        relaunch_if_needed(recipe.module, sys.argv[1:], nprocs)  # exits with the workers' code
    for args in held:
        show(*args)
    return _train(cfg, recipe, s, job_started)


def _train(cfg: DictConfig, recipe: Recipe, s: Settings, job_started: float | None = None) -> int:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from model.checkpoint import write_atomic
    from model.parallel import destroy_distributed, init_distributed
    from recipes import checkpointing as ckpt
    from recipes.engine import lr_scheduler
    from recipes.run_log import RunLog, finished_line

    job_started = time.perf_counter() if job_started is None else job_started
    stop = _StopFlag()
    init_distributed(s.parallel, seed=int(cfg.seed), model=s.model)
    rank0 = dist.get_rank() == 0
    dtype_name, fp8, note = resolve_precision(s.precision, torch.cuda.is_available(), te_available())
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    t = s.trainer

    notes = [note] if note else []
    resume_from, init_from = starting_point(cfg, s, report=notes.append)
    init = (lambda chunks: ckpt.load_weights(chunks, init_from)) if init_from else None
    engine = build_training_engine(s, dtype, init, **fp8, **recompute_overrides(t.recompute))
    state = {"step": 0, "consumed_samples": 0, "nan_steps": 0, "counts": {}}
    if resume_from is not None:
        change = s.optim.override_schedule and ckpt.schedule_change(resume_from, s.optim, t.max_steps)
        state.update(ckpt.load_checkpoint(engine, resume_from))
        if change:
            engine.scheduler = lr_scheduler(engine.optimizer, s.optim, t.max_steps)
            engine.scheduler.step(increment=state["step"])
            notes.append(f"LR schedule rebuilt at step {state['step']} (optim.override_schedule): {change}")
    else:
        state["sources"] = {"init_from": str(init_from.resolve()) if init_from is not None else None}

    if rank0:
        s.stage_dir.mkdir(parents=True, exist_ok=True)
        # as run: a null vocab_size (the tokenizer's) is written as the size it resolved to
        ran = OmegaConf.to_container(cfg, resolve=True)
        ran["model"]["vocab_size"] = s.model.vocab_size
        write_atomic(s.stage_dir / "config.yaml", OmegaConf.to_yaml(ran))
    dist.barrier()
    task = recipe.task(cfg, s, engine)
    if task.loss_fn is not None:
        engine.loss_fn = task.loss_fn
    engine.report_keys = ("lm loss", *task.report_keys)
    engine.loss_positions_only = task.loss_positions_only
    task.state.update(state.get("task", {}))
    state.setdefault("sources", {}).update({k: str(v) for k, v in task.sources.items()})
    state["task"] = task.state
    log = RunLog(s.stage_dir, str(cfg.run.name), str(cfg.stage.name), OmegaConf.to_container(cfg, resolve=True),
                 state["step"], t.max_steps, t.log_interval, OmegaConf.to_container(cfg.logging.wandb),
                 bool(cfg.logging.progress), enabled=rank0)
    for line in notes:
        log.message(line)
    if resume_from is not None:
        log.message(f"resumed {cfg.stage.name} from {resume_from} at step {state['step']}")
    elif init_from is not None:
        log.message(f"initialised {cfg.stage.name} from {init_from} (weights only)")

    nan_loss = _nan_injector(engine, t.inject_nan_at_steps)
    dp_group = parallel_state.get_data_parallel_group()
    start_step = state["step"]
    exit_code, export_from = 0, None
    try:
        while state["step"] < t.max_steps:
            step = state["step"] + 1
            started = time.perf_counter()
            micro = task.batches(state["consumed_samples"])
            with nan_loss(step):
                metrics = engine.train_step(micro)
            if task.batch_counts is not None:
                counts = task.batch_counts(micro)
                device = next(engine.chunks[0].parameters()).device
                totals = torch.cat([v.reshape(-1) for v in counts.values()]).to(device, torch.float64)
                dist.all_reduce(totals, group=dp_group)  # one collective for every counter
                for name, value in zip(counts, totals.tolist()):
                    state["counts"][name] = state["counts"].get(name, 0) + value
            if metrics["skipped"] or not metrics["update_successful"]:
                state["nan_steps"] += 1
                log.message(f"step {step}: non-finite loss {metrics['loss']}; update skipped "
                            f"({state['nan_steps']}/{t.max_nan_steps})")
                if t.nan_policy == "abort" or state["nan_steps"] >= t.max_nan_steps:
                    log.event("abort", step=step, nan_steps=state["nan_steps"])
                    log.message(f"aborting: {state['nan_steps']} non-finite steps; last good checkpoint: "
                                f"{ckpt.latest_checkpoint(s.stage_dir)}")
                    exit_code = 1
                    break
            state["step"] = step
            state["consumed_samples"] += t.global_batch_size
            elapsed = time.perf_counter() - started
            metrics.update(step_time_s=elapsed, tokens_per_s=task.tokens_per_step / elapsed,
                           nan_steps=state["nan_steps"], consumed_samples=state["consumed_samples"])
            if task.summarize is not None:
                metrics.update(task.summarize(state["counts"]))
            if task.after_step is not None:
                metrics.update(task.after_step(metrics))
            log.step(step, metrics)

            stopping = _agreed_stop(stop)
            if step % t.save_interval == 0 or step == t.max_steps or stopping:
                saving = time.perf_counter()
                saved = ckpt.save_checkpoint(engine, s.stage_dir, state, t.keep_last, t.optimizer_checkpoint)
                log.info(f"saved checkpoint {saved} in {time.perf_counter() - saving:.1f} s")
            if stopping:
                log.event("stopped", step=step, signal=int(stop.signal or 0))
                log.message(f"stopped by signal after step {step}; checkpoint saved")
                exit_code = EXIT_PREEMPTED
                break
        else:
            if rank0:
                last = ckpt.latest_checkpoint(s.stage_dir)
                write_atomic(s.stage_dir / ckpt.FINAL, json.dumps(
                    {"checkpoint": str(last.relative_to(s.stage_dir)), "step": state["step"], **state["sources"]},
                    indent=2) + "\n")
                # Tokens: the task's tokens_per_step (what tokens/s counts) times this job's
                # steps, like the wall time this job's; the state keeps no token count.
                tokens = task.tokens_per_step * (state["step"] - start_step)
                log.info(finished_line(str(cfg.stage.name), state["step"], start_step, last,
                                       time.perf_counter() - job_started, tokens))
                if wants_export(t.export_hf, recipe.post_training):
                    export_from = last
            log.event("finished", step=state["step"])
    finally:
        log.close()
        stop.close()
    destroy_distributed()
    if export_from is not None:
        # Rank 0 alone, once the other ranks are released: exporting a large model takes
        # longer than they could wait in a collective. The job's log is stdout, as log.info's.
        print(export_stage(s.stage_dir, export_from, cfg.tokenizer), flush=True)
    return exit_code


def _agreed_stop(stop: _StopFlag) -> bool:
    """Whether any rank was signalled; every rank must take the same branch."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if stop.requested() else 0.0],
                        device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _nan_injector(engine, steps: list):
    """Context manager factory making the loss of the listed steps NaN (fault injection)."""
    import contextlib

    wanted = {int(x) for x in steps}

    @contextlib.contextmanager
    def at(step: int):
        if step not in wanted:
            yield
            return
        original = engine.loss_fn

        def poisoned(batch, output):
            loss, count, report = original(batch, output)
            nan = loss * float("nan")
            return nan, count, {k: v * float("nan") for k, v in report.items()}

        engine.loss_fn = poisoned
        try:
            yield
        finally:
            engine.loss_fn = original

    return at
