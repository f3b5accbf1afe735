"""CPU runtime for megatron-core 0.16.1 (gloo, no CUDA).

megatron-core is written for GPUs: it asks for the current CUDA device, seeds CUDA
generators, builds tensors with ``device="cuda"``, creates CUDA streams and checks
``param.type() == "torch.cuda.FloatTensor"``. This module makes those calls resolve
to the CPU so that the real megatron-core code paths (TP, PP, EP, DDP, the
optimizer, dist-checkpointing) run under ``torch.distributed`` with gloo.

It is isolated on purpose:
  * ``activate()`` does nothing when ``torch.cuda.is_available()`` is true, so the
    GPU path never goes through it;
  * nothing else in the project imports from it except ``model.parallel`` (which
    activates it) and the builder (which asks it for the CPU-only config flags);
  * every patch carries a one-line reason.

The patches are process-global and cannot be undone; on a CPU-only process that is
what we want, since every megatron-core call must see the same world.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False
_MODE: TorchFunctionMode | None = None

# TransformerConfig fields that must take these values on CPU (the builder applies them
# while this layer is active; fusions are already off with the local spec).
CPU_TRANSFORMER_CONFIG = dict(
    # Parameters would otherwise be allocated on torch.cuda.current_device().
    use_cpu_initialization=True,
    # gloo matches same-shaped tensors between a pair of ranks in posting order, so the
    # batched p2p path can swap activations and gradients in the interleaved (VPP)
    # schedule; megatron-core's unbatched path orders sends/receives by rank parity.
    batch_p2p_comm=False,
)


def is_active() -> bool:
    return _ACTIVE


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # a CUDA ordinal, e.g. LOCAL_RANK passed as a device
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device requests to CPU for every torch call.

    Megatron-core hard-codes ``device="cuda"``/``.cuda()`` in the schedules, the
    optimizer, clip_grads, the MoE aux-loss tracker, language_module (PP + tied
    embeddings) and ``get_default_causal_mask``; one mode covers them all.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            # .cuda() on CPU: the tensor already lives where compute happens.
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # The optimizer and clip_grads assert on 'torch.cuda.*Tensor' type names.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if kwargs.get("pin_memory"):
            # Pinned memory needs a CUDA context.
            kwargs = dict(kwargs, pin_memory=False)
        if func in (torch.Tensor.to,) and args and len(args) > 1 and _is_cuda_device(args[1]):
            # tensor.to("cuda") / tensor.to(torch.cuda.current_device())
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for torch.cuda.Stream/Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, *args):
        return 0.0


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # RoPE, the TP layers, p2p, DDP buffers and the router allocate on this device. "cpu"
    # (not an index) keeps that valid inside autograd backward functions, where the
    # function mode below is not in effect.
    cuda.current_device = lambda: "cpu"
    # Called by initialisation code that pins a rank to its GPU.
    cuda.set_device = lambda *a, **k: None
    # Called around p2p communication and timers; CPU ops are synchronous.
    cuda.synchronize = lambda *a, **k: None
    # The alltoall MoE dispatcher overlaps D2H copies on a side stream.
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    # The RNG tracker seeds and swaps CUDA generator state; the CPU generator plays that role.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    # torch.manual_seed itself calls this; the CPU generator is already seeded by then.
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # Memory reporting in logs/timers.
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.empty_cache = lambda *a, **k: None


def _patch_megatron() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as mutils
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # The tracker reads/writes the CUDA generator through these two private helpers.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    # Only defined when TE imports; every router call references it (NameError otherwise).
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # On CPU it returns the tensor unchanged even when numpy split sizes are asked for.
    original = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

    # Activation recompute re-runs attention inside autograd's backward, where the function
    # mode below is not in effect, and this helper asks for a device="cuda" mask.
    @functools.lru_cache(maxsize=32)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    mutils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask


def activate() -> bool:
    """Make megatron-core run on CPU. Returns True when the CPU layer is in effect."""
    global _ACTIVE, _MODE
    if torch.cuda.is_available():
        return False
    if _ACTIVE:
        return True
    _patch_torch_cuda()
    _patch_megatron()
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _ACTIVE = True
    return True
