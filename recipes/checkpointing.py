"""Training checkpoints: model, optimizer, LR schedule, RNG and data position.

Layout of a stage's run directory::

    <stage dir>/checkpoints/iter_0000010/   megatron-core dist checkpoint + qwen3_model.json
    <stage dir>/latest                     name of the newest complete checkpoint
    <stage dir>/final.json                 written once the stage has finished

A checkpoint directory is complete or absent: it is written as `iter_N.tmp` and renamed
(model.checkpoint.save_sharded). `latest` is replaced atomically only after that rename,
and old checkpoints are pruned only after `latest` moved on, so a crash at any instant
leaves a loadable `latest`. Each carries a manifest of its files' sizes and checksums;
a resume takes the newest checkpoint that still matches it (`resume_point`) and renames a
damaged newer one to `iter_N.damaged`. The model weights inside are global tensors, so a checkpoint
loads at any TP/PP/EP layout. The distributed optimizer's state is saved in one of two of
megatron-core's formats (`trainer.optimizer_checkpoint`; `auto` takes the path's default,
model.builder.TRAINING_DEFAULTS):

  dp_reshardable     (GPU default) each rank writes the fp32 master weights and Adam moments
                     it holds, as they lie in its data-parallel buckets: no communication and
                     no extra memory at a save. It loads only into the same buckets: the same
                     TP, PP, VPP, CP, EP and expert TP (checked before launch), and the same
                     bucket sizes (checked in the job), which any DP size gives while
                     megatron-core's bucket size does not change with it: one bucket without
                     gradient-reduce overlap, 4e7 parameters with it up to DP=40, 1e6 x DP
                     beyond. Both refusals are one line.
  fully_reshardable  (CPU default) every save all-gathers the whole model shard's optimizer
                     state over DP into each rank's host memory (12 bytes per parameter, via
                     one bucket-sized fp32 buffer at a time on the GPU) and stores it per
                     parameter, so it loads at any layout.

Weights-only starts (`init_from`, exports) read the model part and work from either.

With `trainer.backend=deepspeed` the engine writes DeepSpeed's own checkpoint through the
same `iter_N.tmp` → `iter_N` rename (recipes.deepspeed_engine, model.ds_convert);
`latest`, keep-last-K and `final.json` work the same for both formats.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from model.checkpoint import (apply_model_state, is_checkpoint, load_model, load_sharded, model_sharded_state_dict,
                              save_sharded, verify_manifest, write_atomic, write_manifest)
from model.config import ConfigError
from model.ds_convert import is_deepspeed_checkpoint, load_deepspeed_weights

CHECKPOINTS = "checkpoints"
LATEST = "latest"
FINAL = "final.json"
_ITER = re.compile(r"^iter_(\d{7,})$")
# The distributed optimizer's checkpoint formats are dp_reshardable and fully_reshardable
# (module docstring; trainer.optimizer_checkpoint). megatron-core 0.16.1's own default,
# fully_sharded_model_space, fails to save ("ShardedTensor.flattened_range is not
# supported"); checkpoints from before the choice existed are fully_reshardable.


def is_training_checkpoint(path: Path) -> bool:
    """A complete checkpoint of either engine."""
    return is_checkpoint(path) or is_deepspeed_checkpoint(path)


def checkpoint_name(step: int) -> str:
    return f"iter_{step:07d}"


def complete_checkpoints(stage_dir: Path) -> list[Path]:
    """Complete checkpoints of a stage, oldest first (`.tmp` leftovers are ignored)."""
    root = Path(stage_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _ITER.match(p.name)) and is_training_checkpoint(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The checkpoint `latest` names; the newest complete one if the pointer is unusable."""
    stage_dir = Path(stage_dir)
    pointer = stage_dir / LATEST
    if pointer.is_file():
        candidate = stage_dir / CHECKPOINTS / pointer.read_text().strip()
        if is_training_checkpoint(candidate):
            return candidate
    found = complete_checkpoints(stage_dir)
    return found[-1] if found else None


def resume_point(stage_dir: Path, report=None) -> Path | None:
    """The checkpoint a stage resumes from: the newest whose files match its manifest
    (`latest` first), or None when the stage has none.

    Before launch (`report` None) only sizes are compared and nothing is renamed: every
    rank of a job may be checking at once. In the job (`report` given; collective) the
    contents are checked too, damaged newer checkpoints are renamed to `iter_N.damaged`
    (never deleted), `latest` is pointed at the one used, and `report` gets one line. When
    checkpoints exist and none matches, ConfigError names them and nothing is renamed.
    """
    stage_dir = Path(stage_dir)
    latest = latest_checkpoint(stage_dir)
    order = ([latest] if latest else []) + [c for c in reversed(complete_checkpoints(stage_dir)) if c != latest]
    damaged = []
    for candidate in order:
        problem = verify_manifest(candidate, checksums=report is not None)
        if problem is None:
            break
        damaged.append(f"{candidate.name} ({problem})")
    else:
        if damaged:
            raise ConfigError(f"no checkpoint of {stage_dir} matches its manifest: {'; '.join(damaged)}; "
                              "nothing was renamed: restore one, or move them aside to start the stage again")
        return None
    if damaged and report is not None:
        if dist.get_rank() == 0:
            for bad in order[:len(damaged)]:
                os.replace(bad, _aside(bad))
            write_atomic(stage_dir / LATEST, candidate.name + "\n")
        dist.barrier()
        report(f"damaged checkpoint {'; '.join(damaged)} renamed to *.damaged; resuming from {candidate.name}")
    return candidate


def _aside(path: Path) -> Path:
    """A free `<name>.damaged[.N]` beside `path`."""
    target, n = path.with_name(path.name + ".damaged"), 1
    while target.exists():
        target, n = path.with_name(f"{path.name}.damaged.{n}"), n + 1
    return target


def schedule_change(ckpt_dir: Path, optim, max_steps: int) -> str | None:
    """What in the LR schedule `optim` and `max_steps` ask for differs from the one the
    Megatron checkpoint was trained with (None when nothing does, or the checkpoint holds
    no schedule). megatron-core keeps the checkpoint's on resume, silently."""
    if not is_checkpoint(ckpt_dir):
        return None
    saved = dist_checkpointing.load_common_state_dict(str(ckpt_dir)).get("train_state", {}).get("scheduler")
    if not saved:
        return None
    from recipes.engine import schedule_settings

    wanted = schedule_settings(optim, max_steps)
    keys = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style")
    changed = [f"{k} {saved.get(k)} -> {wanted[k]}" for k in keys if saved.get(k) != wanted[k]]
    return ", ".join(changed) or None


def final_checkpoint(stage_dir: Path) -> Path:
    """The checkpoint a finished stage ended with (what the next stage starts from)."""
    marker = Path(stage_dir) / FINAL
    if not marker.is_file():
        latest = latest_checkpoint(stage_dir)
        where = f"its latest checkpoint is {latest.name}" if latest else "it has no checkpoint"
        raise ConfigError(f"stage in {stage_dir} has not finished ({FINAL} missing; {where}); "
                          "finish it first or point init_from at a checkpoint directory")
    return Path(stage_dir) / json.loads(marker.read_text())["checkpoint"]


def resolve_init_from(init_from: str, run_dir: Path) -> Path:
    """A checkpoint directory from `stage.init_from`.

    Accepts the name of an earlier stage of the same run (`pretrain_s1`), a stage
    directory, or a checkpoint directory (for example one written by model.convert).
    """
    candidates = [Path(run_dir) / init_from, Path(init_from)]
    for path in candidates:
        if is_training_checkpoint(path):
            return path
        if (path / FINAL).is_file() or (path / CHECKPOINTS).is_dir():
            return final_checkpoint(path)
    raise ConfigError(f"stage.init_from={init_from!r} is neither a stage of run {run_dir} nor a "
                      "checkpoint directory (no metadata.json)")


def fingerprint(ckpt_dir: Path, edge: int = 1 << 20) -> str:
    """A short identity of a checkpoint's contents: SHA-256 over every file's path and
    size, small files whole and large ones by their first and last MiB. Cheap at any
    model size (reading a multi-TB checkpoint whole is not), yet any rewrite of the
    weights changes it, so a pipeline can show which checkpoint each stage consumed."""
    h = hashlib.sha256()
    root = Path(ckpt_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        size = path.stat().st_size
        h.update(f"{path.relative_to(root)}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= 2 * edge:
                h.update(f.read())
            else:
                h.update(f.read(edge))
                f.seek(-edge, os.SEEK_END)
                h.update(f.read(edge))
    return h.hexdigest()[:16]


def load_weights(chunks, ckpt_dir: Path) -> None:
    """Initial weights from a checkpoint of either engine into bare model chunks."""
    if is_deepspeed_checkpoint(ckpt_dir):
        load_deepspeed_weights(chunks, ckpt_dir)
    else:
        load_model(chunks, ckpt_dir)


# ----------------------------------------------------------------------------- RNG


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(state) -> ShardedObject:
    # One object per global rank: RNG streams differ by TP/PP rank, and a resume at the
    # same world size puts every rank back where it was.
    return ShardedObject("rng_state", state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _layout_signature() -> dict:
    return {"world_size": dist.get_world_size(),
            "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "ep": parallel_state.get_expert_model_parallel_world_size()}


# ----------------------------------------------------------------------------- save / load


def _bare(chunks) -> list:
    """The GPTModels inside megatron-core's DDP wrappers (whose state-dict keys carry a
    `module.` prefix that the weights-only loaders do not expect)."""
    return [getattr(c, "module", c) for c in chunks]


def optimizer_format(requested: str = "auto") -> str:
    """The distributed-optimizer checkpoint format `trainer.optimizer_checkpoint` names
    (`auto`: this path's default, model.builder.TRAINING_DEFAULTS)."""
    from model.builder import TRAINING_DEFAULTS
    from model.parallel import te_available

    return TRAINING_DEFAULTS[te_available()].optimizer_checkpoint if requested == "auto" else requested


def _optimizer_layout(engine, fmt: str) -> dict:
    """What a checkpoint's optimizer state needs of the run that loads it: the format, the
    layout, and (dp_reshardable) the distributed optimizers' bucket sizes."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    ps = parallel_state
    buckets = [[n for sizes in buffers.values() for n in sizes]
               for opt in _optimizers(engine.optimizer)
               if isinstance(opt, DistributedOptimizer) for buffers in opt.per_bucket_numel_unpadded]
    layout = {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
              "vpp": ps.get_virtual_pipeline_model_parallel_world_size(), "cp": ps.get_context_parallel_world_size(),
              "ep": ps.get_expert_model_parallel_world_size(), "etp": ps.get_expert_tensor_parallel_world_size()}
    return {"format": fmt, "buckets": buckets, "layout": layout}


def _saved_optimizer_layout(train_state: dict) -> dict:
    """A checkpoint's `_optimizer_layout` record, from its training state (checkpoints written
    before there was one are fully_reshardable)."""
    return train_state.get("optimizer") or {"format": "fully_reshardable", "buckets": [], "layout": {}}


def optimizer_layout_problem(ckpt_dir: Path, par) -> str | None:
    """Why a Megatron checkpoint's optimizer state cannot resume at layout `par` (checked
    before launch; the buckets, which need the model built, are compared in load_checkpoint)."""
    if not is_checkpoint(ckpt_dir):
        return None
    saved = _saved_optimizer_layout(dist_checkpointing.load_common_state_dict(str(ckpt_dir)).get("train_state", {}))
    if saved["format"] != "dp_reshardable" or not saved["buckets"]:
        return None
    now = {"tp": par.tp, "pp": par.pp, "vpp": par.vpp, "cp": par.cp, "ep": par.ep, "etp": par.expert_tp}
    if saved["layout"] == now:
        return None
    return _dp_reshardable_refusal(ckpt_dir, f"saved at {_fmt(saved['layout'])}, this run has {_fmt(now)}")


def _fmt(layout: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in layout.items())


def _dp_reshardable_refusal(ckpt_dir: Path, why: str) -> str:
    return (f"{ckpt_dir} holds the distributed optimizer's state in megatron-core's dp_reshardable format, "
            f"which loads only into the same data-parallel buckets ({why}): resume at the layout it was "
            "saved at, or start a new stage from its weights with init_from=; "
            "trainer.optimizer_checkpoint=fully_reshardable saves checkpoints that load at any layout")


def _sharded_state(engine, is_loading: bool, fmt: str) -> dict:
    if not is_loading:
        engine.gather_params()   # under overlap_param_gather the other ranks' shards are a step old
    sharded = model_sharded_state_dict(_bare(engine.chunks))
    sharded["optimizer"] = engine.optimizer.sharded_state_dict(sharded, is_loading=is_loading,
                                                               metadata={"distrib_optim_sharding_type": fmt})
    return sharded


def save_checkpoint(engine, stage_dir: Path, train_state: dict, keep_last: int,
                    optimizer_checkpoint: str = "auto") -> Path:
    """Collective: save everything needed to continue this stage exactly; the distributed
    optimizer's state in the format `optimizer_checkpoint` names (module docstring)."""
    stage_dir = Path(stage_dir)
    name = checkpoint_name(train_state["step"])
    if hasattr(engine, "save_state"):   # an engine with its own format (DeepSpeed)
        path = _save_engine_state(engine, stage_dir / CHECKPOINTS / name, train_state)
    else:
        fmt = optimizer_format(optimizer_checkpoint)
        sharded = _sharded_state(engine, is_loading=False, fmt=fmt)
        sharded["rng_state"] = _rng_sharded(_rng_state())
        sharded["train_state"] = {**train_state, "scheduler": engine.scheduler.state_dict(),
                                  "layout": _layout_signature(), "optimizer": _optimizer_layout(engine, fmt)}
        path = save_sharded(sharded, stage_dir / CHECKPOINTS / name, engine.model_cfg,
                            extra={"step": train_state["step"]})
    if dist.get_rank() == 0:
        write_atomic(stage_dir / LATEST, name + "\n")
        for old in complete_checkpoints(stage_dir)[:-max(keep_last, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def _save_engine_state(engine, final: Path, train_state: dict) -> Path:
    """Collective: `engine.save_state` into `<final>.tmp`, renamed to `final` once every
    rank has written its part."""
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    engine.save_state(tmp, train_state)
    dist.barrier()
    write_manifest(tmp)
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def backend_mismatch(ckpt_dir: Path, backend: str) -> str | None:
    """Why a checkpoint cannot be resumed by `backend` (None when it can)."""
    if is_deepspeed_checkpoint(ckpt_dir) == (backend == "deepspeed"):
        return None
    written = "DeepSpeed" if is_deepspeed_checkpoint(ckpt_dir) else "Megatron"
    return (f"{ckpt_dir} is a {written} checkpoint and cannot be resumed with trainer.backend={backend}; "
            "resume with the engine that wrote it, or start a new stage from it with init_from=")


def load_checkpoint(engine, ckpt_dir: Path) -> dict:
    """Collective: restore model, optimizer, schedule and (same layout only) RNG; return
    the saved training state (step, consumed samples, counters)."""
    problem = backend_mismatch(ckpt_dir, "deepspeed" if hasattr(engine, "load_state") else "megatron")
    if problem:
        raise ConfigError(problem)
    if hasattr(engine, "load_state"):
        return engine.load_state(ckpt_dir)
    common = dist_checkpointing.load_common_state_dict(str(ckpt_dir))
    if "train_state" not in common:
        raise ConfigError(f"{ckpt_dir} holds weights only (no optimizer state); "
                          "use it as stage.init_from, not as a resume point")
    train_state = common["train_state"]
    same_layout = train_state.get("layout") == _layout_signature()
    saved = _saved_optimizer_layout(train_state)
    if saved["format"] == "dp_reshardable" and saved["buckets"] != (
            now := _optimizer_layout(engine, saved["format"])["buckets"]):
        raise ConfigError(_dp_reshardable_refusal(ckpt_dir, f"buckets of {saved['buckets']} parameters saved, "
                                                            f"{now} in this run"))
    init_torch_adam_state(engine.optimizer)
    sharded = _sharded_state(engine, is_loading=True, fmt=saved["format"])
    if same_layout:
        sharded["rng_state"] = _rng_sharded(None)
    loaded = load_sharded(sharded, ckpt_dir)   # a CPU (local spec) checkpoint resumes on GPU too
    apply_model_state(_bare(engine.chunks), loaded)
    load_optimizer(engine.optimizer, loaded["optimizer"])
    engine.scheduler.load_state_dict(train_state["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return {k: v for k, v in train_state.items() if k not in ("scheduler", "layout", "optimizer")}


def _optimizers(optimizer) -> list:
    """The megatron-core optimizers a ChainedOptimizer holds (dense and expert parameters),
    or the one given."""
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    return list(optimizer.chained_optimizers) if isinstance(optimizer, ChainedOptimizer) else [optimizer]


def _torch_adams(optimizer):
    """The torch Adam(W) optimizers inside megatron-core's (chained) optimizer, if any.

    megatron-core falls back to them when neither apex nor TE is installed (the CPU path);
    with TE or apex it uses their fused Adam, which the two fixes below leave alone.
    """
    for opt in _optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            yield inner


def init_torch_adam_state(optimizer) -> None:
    """Create the Adam state torch would create lazily at the first step (step 0, zero
    moments), so that a fresh optimizer can describe its state for loading: megatron-core's
    distributed optimizer asserts that every parameter has a `step` when it has no apex/TE."""
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for p in group["params"]:
                if not adam.state.get(p):
                    adam.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                     "exp_avg_sq": torch.zeros_like(p)}


@torch.no_grad()   # fp32 weights: the dp_reshardable load copies into views of the parameters themselves
def load_optimizer(optimizer, loaded) -> None:
    """Load megatron-core optimizer state, working around its torch-Adam fallback.

    Without apex/TE (the CPU path) the distributed optimizer's load (a) in the fully
    reshardable format copies every state entry including torch's per-parameter `step`,
    which the checkpoint stores once per group, and fails with KeyError 'step'; and (b) in
    both formats hands one shared `step` tensor to every parameter, which torch then
    increments once per parameter, so a resumed run would silently diverge from its second
    step on (measured on dp_reshardable). Here the parameter state is loaded with `step`
    set aside, and each parameter gets its own copy back.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    optimizers = _optimizers(optimizer)
    states = [loaded] if len(optimizers) == 1 else [loaded[k] for k in sorted(loaded)]
    for opt, state in zip(optimizers, states):
        adam = getattr(opt, "optimizer", None)
        if not (isinstance(opt, DistributedOptimizer) and isinstance(adam, (torch.optim.Adam, torch.optim.AdamW))):
            opt.load_state_dict(state)
            continue
        state = dict(state)
        param_state = state.pop("param_state")
        fmt = state.pop("param_state_sharding_type")
        opt.load_state_dict(state)             # param groups, LR, and the step count
        steps = {p: st.pop("step") for p, st in adam.state.items()}
        if fmt == "dp_reshardable":
            opt.load_parameter_state_from_dp_reshardable(param_state)
        else:
            opt.load_parameter_state_from_fully_reshardable(param_state)
        for p, step in steps.items():
            adam.state[p]["step"] = step.detach().clone()
