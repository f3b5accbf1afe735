"""Parallel layout: validation before launch, and process-group initialisation.

`validate_layout` is pure Python (no torch.distributed, no megatron import) so that a
launcher can reject a bad layout before any process starts or any GPU is touched.
`init_distributed` is the single place that sets up torch.distributed and
megatron-core's parallel state for every entry point (training, conversion, tests).
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import socket
from dataclasses import dataclass

from model.config import ConfigError, ModelConfig, ParallelConfig


class LayoutError(ConfigError):
    """An impossible parallel layout; the message is one line naming the numbers."""


@dataclass(frozen=True)
class Layout:
    """A validated layout with the derived data-parallel sizes."""

    parallel: ParallelConfig
    world_size: int
    dp: int
    expert_dp: int


# QWEN3_LOCAL_SPEC=1 builds megatron-core's local spec on a CUDA machine, on purpose (the
# GPU tests' local <-> TE checkpoint checks; a GPU without a working TE install).
LOCAL_SPEC_ENV = "QWEN3_LOCAL_SPEC"


def te_available() -> bool:
    """Whether models are built with the Transformer Engine spec: on a CUDA machine always,
    unless QWEN3_LOCAL_SPEC=1 asks for the local spec; never on CPU, where TE fails to
    import (and PyPI's empty `transformer-engine` package would break megatron-core).

    A CUDA machine whose TE does not import is a ConfigError naming the import error: the
    local spec it used to fall back to silently is several times slower and has no FP8."""
    import torch

    if os.environ.get(LOCAL_SPEC_ENV) == "1" or not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401  (what megatron-core's TE spec imports)
    except Exception as e:   # ImportError, or OSError/RuntimeError from its CUDA libraries
        raise ConfigError(f"CUDA is present but Transformer Engine does not import ({type(e).__name__}: "
                          f"{' '.join(str(e).split())}); use NVIDIA's PyTorch container, or set "
                          f"{LOCAL_SPEC_ENV}=1 to use megatron-core's local spec (slower, no FP8)") from None
    return True


def pipeline_split_units(model: ModelConfig, par: ParallelConfig) -> int:
    """Layers the pipeline divides: decoder layers, plus embedding/loss when counted."""
    return (model.num_layers + int(par.account_for_embedding_in_pipeline_split)
            + int(par.account_for_loss_in_pipeline_split))


def sequence_multiple(tp: int, cp: int, sp: bool, fp8_align: int = 1) -> int:
    """What every sequence width (a row, or a packed document on the THD path) must be a
    multiple of at this layout.

    Context parallelism cuts a row into 2*cp chunks (megatron-core's load-balanced causal
    split: rank r holds chunks r and 2*cp-1-r); sequence parallelism then splits each
    rank's cp share over tp; under FP8 each rank's token count must be a multiple of
    `fp8_align` (megatron-core's get_fp8_align_size: 16, 32 for MXFP8).
    """
    shard = cp * (tp if sp else 1)   # ranks one row is split over
    per_rank = math.lcm(2 if cp > 1 else 1, tp if sp else 1) // (tp if sp else 1)
    return shard * math.lcm(per_rank, fp8_align)


def padded_width(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple`."""
    return -(-length // multiple) * multiple


def fp8_width_problems(model: ModelConfig, par: ParallelConfig) -> list[str]:
    """Why FP8 GEMMs cannot run this model at this layout: Transformer Engine's FP8 GEMMs
    need each weight dimension of every rank's linear layers to be a multiple of 16. Their
    rows are padded to what FP8 needs (sequence widths, `sequence_multiple`; decode rows,
    model.inference.decode_rows); the weights cannot be."""
    tp = par.tp
    q, groups = model.num_attention_heads * model.kv_channels, model.num_query_groups * model.kv_channels
    widths = {"hidden_size": model.hidden_size, "num_attention_heads*kv_channels/tp": q / tp,
              "(num_attention_heads+2*num_query_groups)*kv_channels/tp": (q + 2 * groups) / tp}
    if model.is_moe:
        widths["moe_ffn_hidden_size/etp"] = model.moe_ffn_hidden_size / par.expert_tp
    else:
        widths["ffn_hidden_size/tp"] = model.ffn_hidden_size / tp
    bad = [f"{name}={width:g}" for name, width in widths.items() if width % 16]
    return [f"FP8 GEMMs need every rank's weight widths to be multiples of 16: {', '.join(bad)}"] if bad else []


def layout_problems(model: ModelConfig, par: ParallelConfig, world_size: int | None = None,
                    seq_length: int | None = None, fp8: bool = False, fp8_align: int = 16) -> list[str]:
    """Every reason this layout cannot run this model (empty list when it can); `fp8`: the
    run's precision is FP8, whose GEMMs need token counts that are multiples of `fp8_align`
    (megatron-core's get_fp8_align_size: 16, 32 for MXFP8; `sequence_multiple`)."""
    problems: list[str] = []
    sizes = {"tp": par.tp, "pp": par.pp, "cp": par.cp, "ep": par.ep, "etp": par.expert_tp}
    if par.vpp is not None:
        sizes["vpp"] = par.vpp
    bad = [f"{k}={v}" for k, v in sizes.items() if not isinstance(v, int) or v < 1]
    if bad:
        return [f"parallel sizes must be integers >= 1, got {', '.join(bad)}"]

    tp, pp, cp, ep, etp = par.tp, par.pp, par.cp, par.ep, par.expert_tp
    if model.num_attention_heads % tp:
        problems.append(f"num_attention_heads={model.num_attention_heads} is not divisible by tp={tp}")
    if model.num_query_groups % tp:
        problems.append(f"num_query_groups (kv heads)={model.num_query_groups} is not divisible by tp={tp}")
    if model.vocab_size % tp:
        problems.append(f"vocab_size={model.vocab_size} is not divisible by tp={tp}")
    if not model.is_moe and model.ffn_hidden_size % tp:
        problems.append(f"ffn_hidden_size={model.ffn_hidden_size} is not divisible by tp={tp}")

    units = pipeline_split_units(model, par)
    stages = pp * (par.vpp or 1)
    if par.vpp is not None and pp == 1:
        problems.append(f"vpp={par.vpp} needs pp > 1")
    elif units % stages:
        counted = "layers" if units == model.num_layers else "layers + embedding/loss"
        problems.append(f"{counted}={units} is not divisible by pp*vpp={pp}*{par.vpp or 1}={stages}")
    if (par.account_for_embedding_in_pipeline_split or par.account_for_loss_in_pipeline_split) and pp == 1:
        problems.append("account_for_*_in_pipeline_split needs pp > 1")

    if model.is_moe:
        if model.num_experts % ep:
            problems.append(f"num_experts={model.num_experts} is not divisible by ep={ep}")
        if model.moe_ffn_hidden_size % etp:
            problems.append(f"moe_ffn_hidden_size={model.moe_ffn_hidden_size} is not divisible by etp={etp}")
        if tp > 1 and not par.sp:
            problems.append(f"MoE with tp={tp} needs sequence parallelism (set parallel.sp=true)")
    elif ep > 1:
        problems.append(f"ep={ep} needs an MoE model; {model.name} is dense")
    if fp8:
        problems += fp8_width_problems(model, par)

    if world_size is not None:
        if world_size < 1:
            problems.append(f"world size {world_size} must be positive")
        elif world_size % (tp * pp * cp):
            problems.append(
                f"world size {world_size} is not divisible by tp*pp*cp={tp}*{pp}*{cp}={tp * pp * cp}")
        # Skip the expert check when the first one already implies it (e.g. ep=1, etp=tp).
        implied = (tp * pp * cp) % (etp * ep * pp) == 0
        if world_size >= 1 and world_size % (etp * ep * pp) and not implied:
            problems.append(
                f"world size {world_size} is not divisible by etp*ep*pp={etp}*{ep}*{pp}={etp * ep * pp} "
                f"(ep*etp must divide dp*cp*tp={world_size // pp})")

    if seq_length is not None:
        if seq_length < 1:
            problems.append(f"seq_length={seq_length} must be positive")
        else:
            multiple = sequence_multiple(tp, cp, par.sp and tp > 1, fp8_align if fp8 else 1)
            if seq_length % multiple:
                why = " and ".join(n for n, on in (("cp", cp > 1), ("sp", par.sp and tp > 1), ("fp8", fp8)) if on)
                problems.append(f"seq_length={seq_length} is not divisible by {multiple} (required by {why})")
            if seq_length > model.max_position_embeddings:
                problems.append(
                    f"seq_length={seq_length} exceeds max_position_embeddings={model.max_position_embeddings}")
    return problems


def validate_layout(model: ModelConfig, par: ParallelConfig, world_size: int | None = None,
                    seq_length: int | None = None) -> Layout | None:
    """Raise LayoutError (one line, all problems) if the layout cannot run the model."""
    problems = layout_problems(model, par, world_size, seq_length)
    if problems:
        raise LayoutError(f"invalid parallel layout for {model.name}: " + "; ".join(problems))
    return None if world_size is None else _layout(par, world_size)


def _layout(par: ParallelConfig, world_size: int) -> Layout:
    return Layout(par, world_size, world_size // (par.tp * par.pp * par.cp),
                  world_size // (par.expert_tp * par.ep * par.pp))


def minimum_world_size(par: ParallelConfig) -> int:
    """Smallest world size that fits the layout (dp chosen so that ep*etp fits)."""
    model_parallel = par.tp * par.pp * par.cp
    expert = par.expert_tp * par.ep * par.pp
    return math.lcm(model_parallel, expert)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Whether init_distributed started torch.distributed (and destroy_distributed ends it). A
# process group that was there before, such as the in-process pipeline runner's, outlives
# the stages that use it.
_OWN_PROCESS_GROUP = False


def start_process_group(timeout_minutes: int = 30) -> None:
    """torch.distributed's default group for this process: from torchrun/SLURM-style env
    vars (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) when present, otherwise a
    single-process world. NCCL on GPU, gloo on CPU."""
    import datetime

    import torch
    import torch.distributed as dist

    if "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                          RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes))


@contextlib.contextmanager
def process_group():
    """torch.distributed for the duration of a block: started when absent (and ended
    afterwards), used as it is when there."""
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        start_process_group()
    try:
        yield
    finally:
        if started and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


# Loggers of the libraries whose warnings every rank would repeat.
QUIET_LOGGERS = ("megatron", "transformer_engine", "apex")


def quiet_other_ranks(rank: int | None = None) -> bool:
    """On every process but global rank 0, ignore Python warnings (from this process and,
    through PYTHONWARNINGS, the Python processes it starts) and raise megatron-core's,
    Transformer Engine's and apex's loggers to ERROR: a job prints each third-party
    warning once, not once per rank. `rank` defaults to RANK (torchrun, slurm/task.sh),
    else SLURM_PROCID; a process with neither is rank 0. Errors still show on every rank.
    Returns whether this process was quietened. Call it before those libraries are imported:
    most of their warnings come at import."""
    if rank is None:
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if rank == 0:
        return False
    import logging
    import warnings

    warnings.simplefilter("ignore")
    os.environ["PYTHONWARNINGS"] = "ignore"
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    return True


def init_distributed(par: ParallelConfig, seed: int = 1234, model: ModelConfig | None = None,
                     timeout_minutes: int = 30) -> Layout:
    """Start torch.distributed and megatron-core's parallel state for this process.

    Uses torchrun/SLURM-style env vars (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    LOCAL_RANK) when present, otherwise a single-process world. NCCL on GPU, gloo plus
    the CPU compatibility layer (model.cpu_compat) when CUDA is absent. A process group
    that already exists is used as it is.
    """
    import torch
    import torch.distributed as dist

    quiet_other_ranks()   # entry points other than training (conversion, generation, evals)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if model is not None:
        validate_layout(model, par, world_size)
    layout = _layout(par, world_size)

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        from model import cpu_compat

        cpu_compat.activate()

    # The layout before this one (reset_model_parallel) destroyed its process groups, but a
    # gloo group's threads end only when its last holder is freed: that layout's models and
    # optimizers, which hold theirs in reference cycles that outlive their callers' frames.
    gc.collect()
    global _OWN_PROCESS_GROUP
    if not dist.is_initialized():
        start_process_group(timeout_minutes)
        _OWN_PROCESS_GROUP = True

    from megatron.core import parallel_state, tensor_parallel

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=par.tp,
            pipeline_model_parallel_size=par.pp,
            virtual_pipeline_model_parallel_size=par.vpp,
            context_parallel_size=par.cp,
            expert_model_parallel_size=par.ep,
            expert_tensor_parallel_size=par.expert_tp,
            distributed_timeout_minutes=timeout_minutes,
        )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return layout


def reset_model_parallel() -> None:
    """Drop megatron-core's parallel state and its process groups but keep the default
    one, so that the same processes can initialise another layout (tests, tools that
    compare layouts, and the in-process pipeline's stages, evals and generations)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    # destroy_model_parallel only forgets its groups: torch.distributed keeps them alive,
    # each gloo group with threads of its own. Late in a miniature pipeline (every stage,
    # eval and generation a new layout) a rank had 1,137 threads, whose polling took as
    # much CPU as its training thread. megatron-core keeps no public list of the groups
    # this rank is in; its own update_pg_timeout reads this one (None: the default group).
    groups = [g for g in getattr(parallel_state, "_global_process_group_list", None) or [] if g is not None]
    parallel_state.destroy_model_parallel()
    for group in groups:
        try:
            dist.destroy_process_group(group)
        except ValueError:   # one destroy_model_parallel destroyed itself (its gloo DP groups)
            pass
    # The rotary embeddings memoise forward() on (module, length, ..., cp_group), up to 32
    # entries: each finished layout's context-parallel group would live on in the cache.
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding

    for rotary in (RotaryEmbedding, YarnRotaryEmbedding):
        rotary.forward.cache_clear()


def destroy_distributed() -> None:
    """Orderly shutdown: no rank tears down its gloo/NCCL groups while others still talk.
    The default process group goes too when init_distributed started it."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    global _OWN_PROCESS_GROUP
    if dist.is_initialized():
        dist.barrier()
    if parallel_state.model_parallel_is_initialized():
        reset_model_parallel()
    if dist.is_initialized() and _OWN_PROCESS_GROUP:
        dist.destroy_process_group()
        _OWN_PROCESS_GROUP = False
