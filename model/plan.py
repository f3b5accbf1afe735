"""Memory and layout planner: which TP/PP/VPP/EP/CP/DP layouts fit, and how fast they might be.

    python -m model.plan model=qwen3_235b_a22b gpus=256 gpu_mem=80GiB seq=4096 \
        [precision=bf16|fp8|fp32] [mbs=1] [gbs=1024] [gpu=h100|h200] [mfu=0.4] \
        [reserve=4GiB] [spec=te|local] [max_tp=8] [layers=N] [top=25] [show=fit|all|invalid] \
        [overlap=on|off] [dp_bw=40GB] [optim_ckpt=dp_reshardable|fully_reshardable]

Every combination of TP, PP, VPP, CP, EP, expert TP, pipeline-split accounting, the
distributed optimizer and activation recompute (none/selective/full) is checked with
`model.parallel.layout_problems` (the same check every launch runs) plus the batch split;
valid layouts get a per-GPU memory estimate and an estimated step time. Nothing is built
and no torch is imported: it is arithmetic on `ModelConfig`. `layers=N` plans a slice of
the model with N layers (as `bench.train --layers`).

Memory per GPU, for the first and the last pipeline rank (the table shows the larger):

  parameters   this rank's shard: embedding (first rank), output layer (last rank, or a
               tied copy when pp > 1), its layers' attention/MLP/norm weights with TP
               splitting heads and FFN, EP splitting experts and expert TP their FFN;
               model dtype (2 bytes for bf16/fp8, 4 for fp32). FP8 adds 2 bytes per GEMM
               weight for Transformer Engine's cached FP8 copy and its transpose.
  gradients    4 bytes per parameter: megatron-core DDP keeps fp32 main grads
               (grad_reduce_in_fp32=True in recipes.engine).
  optimizer    Adam m and v (fp32) plus, for 16-bit parameters, the fp32 master copy:
               12 bytes per parameter (8 for fp32 parameters); with the distributed
               optimizer sharded over DP x CP (dense weights) or expert DP (experts).
  activations  what autograd keeps for backward, per layer and token, listed term by term
               in ACTIVATION_TERMS (Korthikanti et al. 2022, "Reducing Activation
               Recomputation in Large Transformer Models", rederived for Qwen3's RMSNorm,
               QK-norm, GQA, SwiGLU, top-k MoE and no dropout), times the micro-batches in
               flight on that pipeline rank (1F1B: min(m, pp - rank); interleaved:
               Megatron's warm-up count), plus the token ids on the first rank and the
               logits' fp32 softmax and target ids on the last.
               Sequence parallelism divides the hidden-size terms by TP, CP the tokens by
               CP. Full recompute keeps only each layer's input, plus one layer's working
               set while it is recomputed; selective recompute drops the attention core.
               The backward pass's fp32 logit gradient counts as a transient on the last
               rank.
  checkpoint   what saving the distributed optimizer's state adds (optimizer_save_bytes):
               nothing in dp_reshardable (the GPU recipe's format); in fully_reshardable
               one bucket's fp32 all-gather on the GPU and the whole shard's fp32 master
               weights and Adam moments (12 bytes per parameter) in host memory, per GPU.
               A save runs between steps, after the activations are freed, so the peak
               is the larger of the two.

`spec=te` (default) describes the GPU path (Transformer Engine: fused norms, flash
attention, grouped-GEMM experts) and is not yet checked against a GPU measurement;
`spec=local` describes megatron-core's local spec (the CPU path), whose terms were read
off the tensors it saves and are checked against a real training step on CPU
(`python -m bench.memory`, tests/test_plan.py). A layout fits when the estimate plus
`reserve` (CUDA context, NCCL buffers, allocator fragmentation) is at most `gpu_mem`.

Step time: the model FLOPs of one global batch (`flops_per_token`, the same accounting as
the training benchmark) plus recompute FLOPs, at `mfu` of the GPU's dense peak, stretched
by the pipeline bubble (pp - 1) / (vpp * microbatches), plus the data-parallel
communication that is not hidden (`dp_exposed_seconds`): the gradient reduction and the
parameter all-gather of the first pipeline rank (the one that finishes last), at `dp_bw`.
With overlap (the GPU recipe's default) the reduction runs during the last micro-batch's
backward and the all-gather during the first one's forward, so only what outlasts those is
added; without it, all of it. Tensor, pipeline, context and expert parallel communication
is not modelled, so compare layouts by it, do not read it as a prediction; rows that fit
come first, then by step time, then fewest GPUs per model replica, then memory.
"""

from __future__ import annotations

import itertools
import math
import re
import sys
from dataclasses import dataclass
from types import SimpleNamespace

from model.config import ConfigError, ModelConfig, ParallelConfig, load_model_config
from model.parallel import layout_problems, pipeline_split_units

GIB = 2**30

# Dense (non-sparse) tensor-core peaks in TFLOP/s: half the "with sparsity" datasheet
# figures. "fp32" is TF32.
PEAK_TFLOPS = {
    "h100": {"bf16": 989.5, "fp8": 1979.0, "fp32": 494.7},        # H100 SXM5
    "h100_nvl": {"bf16": 835.5, "fp8": 1670.5, "fp32": 417.5},
    "h100_pcie": {"bf16": 756.5, "fp8": 1513.0, "fp32": 378.0},
    "h200": {"bf16": 989.5, "fp8": 1979.0, "fp32": 494.7},        # H200 SXM
    "h200_nvl": {"bf16": 835.5, "fp8": 1670.5, "fp32": 417.5},
}
GPU_MEMORY = {"h100": 80 * GIB, "h100_nvl": 94 * GIB, "h100_pcie": 80 * GIB, "h200": 141 * GIB,
              "h200_nvl": 141 * GIB}
# Bus bandwidth per GPU of a data-parallel ring collective, bytes/s, assumed: inside one
# 8-GPU NVLink node (H100/H200 SXM, 450 GB/s per direction) and across nodes (one 400 Gb/s
# InfiniBand NIC per GPU, 50 GB/s), each at 80% of the line rate. A job on more than one
# node has data-parallel groups that cross nodes, and the network then bounds their rings.
GPUS_PER_NODE = 8
DP_BANDWIDTH = {"node": 0.8 * 450e9, "network": 0.8 * 50e9}
# megatron-core DDP's bucket size under gradient-reduce overlap: max(4e7, 1e6 * DP)
# parameters, on the first pipeline rank only (the others reduce their buffers whole).
def ddp_bucket(dp: int) -> int:
    return max(40_000_000, 1_000_000 * dp)


def gpu_kind(device_name: str) -> str | None:
    """PEAK_TFLOPS key for a torch.cuda.get_device_name() string, None when unknown."""
    name = device_name.upper()
    for family in ("H200", "H100"):
        if family in name:
            if "NVL" in name:
                return f"{family.lower()}_nvl"
            if "PCIE" in name:
                return f"{family.lower()}_pcie"
            return family.lower()
    return None


def compute_precision(precision: str) -> str:
    """bf16, fp8 or fp32: the arithmetic a `precision=` choice runs its GEMMs in."""
    if precision.startswith("fp8") or precision == "mxfp8":
        return "fp8"
    if precision in ("bf16", "fp32"):
        return precision
    raise ConfigError(f"precision={precision!r} must be bf16, fp32, fp8 or one of fp8_delayed, "
                      "fp8_tensorwise, fp8_blockwise, mxfp8")


# ------------------------------------------------------------------------------- FLOPs


def layer_matmul_params(m: ModelConfig) -> int:
    """Weights one token multiplies with in one decoder layer (MoE: router + top-k experts)."""
    q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    attention = m.hidden_size * (q + 2 * kv) + q * m.hidden_size
    if m.is_moe:
        mlp = m.num_experts * m.hidden_size + m.moe_router_topk * 3 * m.hidden_size * m.moe_ffn_hidden_size
    else:
        mlp = 3 * m.hidden_size * m.ffn_hidden_size
    return attention + mlp


def matmul_params(m: ModelConfig) -> int:
    """N_active of the FLOP count: every layer's active GEMM weights plus the logit layer
    (the embedding lookup and the norms do no matmul)."""
    return m.num_layers * layer_matmul_params(m) + m.vocab_size * m.hidden_size


def attention_flops_per_token(m: ModelConfig, seq: int) -> int:
    """QK^T and attention x V, forward + backward: 12 * L * s * (heads * head_dim), the
    full s x s score matrix (no causal halving), as in PaLM (Chowdhery et al. 2022, app. B)."""
    return 12 * m.num_layers * seq * m.num_attention_heads * m.kv_channels


def flops_per_token(m: ModelConfig, seq: int) -> int:
    """Model FLOPs per trained token: 6 * N_active + 12 * L * s * heads * head_dim."""
    return 6 * matmul_params(m) + attention_flops_per_token(m, seq)


def recompute_flops_per_token(m: ModelConfig, seq: int, recompute: str) -> int:
    """Extra forward FLOPs per token that activation recompute spends."""
    if recompute == "full":
        return 2 * m.num_layers * layer_matmul_params(m) + attention_flops_per_token(m, seq) // 3
    if recompute == "selective":
        return attention_flops_per_token(m, seq) // 3
    return 0


# -------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class RankParams:
    """Parameters held by one GPU, split by how the optimizer shards them."""

    dense: int       # sharded over DP x CP by the distributed optimizer
    expert: int      # sharded over expert DP
    gemm: int        # of these, TE GEMM weights (FP8 keeps a cast copy of each)
    layers: int

    @property
    def total(self) -> int:
        return self.dense + self.expert


def stage_layers(m: ModelConfig, par: ParallelConfig, first: bool, last: bool) -> int:
    """Decoder layers on the first/last pipeline rank (all virtual stages together)."""
    if par.pp == 1:
        return m.num_layers
    per_rank = pipeline_split_units(m, par) // par.pp
    return (per_rank - int(first and par.account_for_embedding_in_pipeline_split)
            - int(last and par.account_for_loss_in_pipeline_split))


def rank_params(m: ModelConfig, par: ParallelConfig, first: bool = True, last: bool = True) -> RankParams:
    """Parameter counts of the pipeline rank that is first and/or last, at TP/EP/ETP rank 0."""
    h, tp = m.hidden_size, par.tp
    q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    attention_gemm = (h * (q + 2 * kv) + q * h) // tp
    norms = 2 * h + 2 * m.kv_channels  # input, pre-MLP, q and k norms (replicated over TP)
    if m.is_moe:
        router = m.num_experts * h
        experts = m.num_experts // par.ep * 3 * h * m.moe_ffn_hidden_size // par.expert_tp
        layer_dense, layer_expert, layer_gemm = attention_gemm + norms + router, experts, attention_gemm + experts
    else:
        mlp = 3 * h * m.ffn_hidden_size // tp
        layer_dense, layer_expert, layer_gemm = attention_gemm + norms + mlp, 0, attention_gemm + mlp
    layers = stage_layers(m, par, first, last)
    vocab = m.vocab_size * h // tp
    dense = layers * layer_dense
    if first:
        dense += vocab
    if last:
        dense += h  # final norm
        # A tied output layer reads the embedding when both live on one rank; with pp > 1
        # the last rank keeps its own copy, kept equal by an all-reduce.
        if not m.tie_word_embeddings or not first:
            dense += vocab
    return RankParams(dense, layers * layer_expert, layers * layer_gemm, layers)


def param_counts(m: ModelConfig) -> dict:
    """Whole-model {total, active}, the counts `python -m model.params` reads off the built model."""
    whole = rank_params(m, ParallelConfig())
    inactive = 0
    if m.is_moe:
        inactive = m.num_layers * (m.num_experts - m.moe_router_topk) * 3 * m.hidden_size * m.moe_ffn_hidden_size
    return {"total": whole.total, "active": whole.total - inactive}


# ------------------------------------------------------------------------- activations

def _element_bytes(kind: str, precision: str) -> int:
    """Bytes per element: "act" is the model dtype, "gemm" a GEMM input (kept in FP8 under
    FP8 training), "fp8copy" a tensor that exists only under FP8."""
    act = 4 if precision == "fp32" else 2
    return {"act": act, "gemm": 1 if precision == "fp8" else act, "fp8copy": int(precision == "fp8"),
            "f32": 4, "i64": 8, "bool": 1}[kind]


@dataclass(frozen=True)
class Term:
    """One kind of tensor autograd keeps for backward, and its size."""

    what: str
    elements: object          # callable(D) -> elements per token (per micro-batch, see `per`)
    kind: str = "act"         # see _element_bytes
    split: str = "tp"         # hidden: / tp only under SP; tp: / tp; experts: routed tokens; vocab
    core: bool = False        # attention core: what selective recompute drops
    per: str = "token"        # "token", or "microbatch": one per micro-batch (s x s mask, RoPE tables)


def _t(what, elements, kind="act", split="tp", core=False, per="token"):
    return Term(what, elements, kind, split, core, per)


# What each layer keeps for backward. D: h, q (= heads*head_dim), kv (= kv_heads*head_dim),
# nq, nkv, d, f, E, k, s (tokens per CP rank), tp, etp, V.
_TE_NORM = [_t("norm input", lambda D: D.h, split="hidden"),
            _t("norm 1/rms", lambda D: 1, "f32", "hidden"),
            _t("norm output (GEMM input)", lambda D: D.h, "gemm", "hidden")]
_TE_ATTENTION = _TE_NORM + [
    _t("QKV output (k before QK-norm, v)", lambda D: D.q + 2 * D.kv),
    _t("q regrouped out of the QKV layout (QK-norm input)", lambda D: D.q if D.nkv > D.tp else 0),
    _t("QK-norm 1/rms", lambda D: D.nq + D.nkv, "f32"),
    _t("q, k after QK-norm + RoPE (flash inputs)", lambda D: D.q + D.kv),
    _t("flash output (proj GEMM input)", lambda D: D.q),
    _t("proj GEMM input, FP8 copy", lambda D: D.q, "fp8copy"),
    _t("flash softmax statistics", lambda D: D.nq, "f32", core=True),
]
_TE_DENSE_MLP = _TE_NORM + [
    _t("fc1 output (SwiGLU input)", lambda D: 2 * D.f),
    _t("SwiGLU output (fc2 GEMM input)", lambda D: D.f, "gemm"),
]
_TE_MOE = [
    _t("norm input", lambda D: D.h, split="hidden"),
    _t("norm 1/rms", lambda D: 1, "f32", "hidden"),
    _t("norm output (router and dispatch input)", lambda D: D.h, split="hidden"),
    _t("router input in fp32", lambda D: D.h, "f32", "hidden"),
    _t("router logits and probabilities", lambda D: 2 * D.E, "f32", "hidden"),
    _t("routed tokens (fc1 GEMM input)", lambda D: D.k * D.etp * D.h, "gemm", "experts"),
    _t("fc1 output", lambda D: D.k * D.etp * 2 * D.f, split="experts"),
    _t("SwiGLU output (fc2 GEMM input)", lambda D: D.k * D.etp * D.f, "gemm", "experts"),
    _t("expert output (un-permute weights it by the probabilities)", lambda D: D.k * D.etp * D.h,
       split="experts"),
    _t("routed probabilities", lambda D: D.k * D.etp, "f32", "experts"),
]

# megatron-core's local spec (CPU): torch.nn.RMSNorm keeps x, x/rms and the output;
# attention is unfused (k and v repeated to every query head, the s x s probabilities).
_LOCAL_NORM = [_t("norm input, x/rms, output", lambda D: 3 * D.h, split="hidden"),
               _t("norm 1/rms", lambda D: 1, split="hidden")]
_LOCAL_ATTENTION = _LOCAL_NORM + [
    _t("QKV output (k-norm input and v)", lambda D: D.q + 2 * D.kv),
    # megatron-core regroups q out of the per-KV-group QKV layout with a reshape, which
    # copies unless a rank holds a single KV group.
    _t("q regrouped out of the QKV layout (QK-norm input)", lambda D: D.q if D.nkv > D.tp else 0),
    _t("q/rms", lambda D: D.q),
    _t("k/rms", lambda D: D.kv),
    _t("QK-norm 1/rms", lambda D: D.nq + D.nkv),
    _t("bmm inputs q, k, v (k, v repeated per head)", lambda D: 3 * D.q, core=True),
    _t("softmax output", lambda D: D.nq * D.s, core=True),
    _t("proj input", lambda D: D.q),
    _t("RoPE cos/sin for q and k", lambda D: 4 * D.s * D.d, split="none", per="microbatch"),
]
_LOCAL_SELECTIVE = [_t("checkpointed attention inputs q, k", lambda D: D.q + D.kv)]
_LOCAL_DENSE_MLP = _LOCAL_NORM + [
    _t("fc1 output", lambda D: 2 * D.f),
    _t("SwiGLU intermediates and fc2 input", lambda D: 3 * D.f),
]
_LOCAL_MOE = _LOCAL_NORM + [
    _t("top-k indices (three copies)", lambda D: 3 * D.k, "i64", "hidden"),
    _t("top-k probabilities", lambda D: D.k, "f32", "hidden"),
    _t("router logits and probabilities", lambda D: 2 * D.E, "f32", "hidden"),
    _t("routing map", lambda D: D.E, "bool", "hidden"),
    _t("permuted tokens", lambda D: D.k * D.etp * D.h, split="experts"),
    _t("permuted probabilities", lambda D: D.k * D.etp, "f32", "experts"),
    _t("expert fc1 output", lambda D: D.k * D.etp * 2 * D.f, split="experts"),
    _t("SwiGLU intermediates and fc2 input", lambda D: D.k * D.etp * 4 * D.f, split="experts"),
]

# Vocabulary-parallel cross-entropy: fp32 softmax over this rank's vocabulary slice, the
# target ids and which of them fall in the slice.
_CROSS_ENTROPY = [_t("cross-entropy softmax (fp32)", lambda D: D.V, "f32", "vocab"),
                  _t("target ids", lambda D: 1, "i64", "none"),
                  _t("targets in this vocabulary slice", lambda D: 1, "bool", "none")]
_INPUTS = [_t("token ids (embedding lookup)", lambda D: 1, "i64", "none")]

# Per spec: per-layer terms ("attention", "dense_mlp" / "moe", "selective" replacing the
# attention core), terms kept once per micro-batch and rank ("once": shared by all its
# layers), the first rank's inputs and the last rank's logits and loss.
ACTIVATION_TERMS = {
    "te": {"attention": _TE_ATTENTION, "dense_mlp": _TE_DENSE_MLP, "moe": _TE_MOE, "selective": [],
           "once": [], "inputs": _INPUTS,
           "logits": [_t("final norm input", lambda D: D.h, split="hidden"),
                      _t("final norm 1/rms", lambda D: 1, "f32", "hidden"),
                      _t("output GEMM input", lambda D: D.h, split="hidden")] + _CROSS_ENTROPY},
    "local": {"attention": _LOCAL_ATTENTION, "dense_mlp": _LOCAL_DENSE_MLP, "moe": _LOCAL_MOE,
              "selective": _LOCAL_SELECTIVE,
              "once": [_t("causal mask", lambda D: D.s * D.s, "bool", "none", core=True, per="microbatch")],
              "inputs": _INPUTS, "logits": _LOCAL_NORM + _CROSS_ENTROPY},
}
_FULL_RECOMPUTE = [_t("layer input (checkpoint)", lambda D: D.h, split="hidden")]
_FULL_RECOMPUTE_ONCE = [_t("RoPE table", lambda D: D.s * D.d, split="none", per="microbatch")]


def _dims(m: ModelConfig, par: ParallelConfig, seq: int) -> SimpleNamespace:
    # f is per expert-TP rank for MoE (expert terms carry the k * etp routed copies of a
    # token), the full dense FFN width otherwise (tp terms are divided by TP below).
    return SimpleNamespace(
        h=m.hidden_size, q=m.num_attention_heads * m.kv_channels, kv=m.num_query_groups * m.kv_channels,
        nq=m.num_attention_heads, nkv=m.num_query_groups, d=m.kv_channels,
        f=(m.moe_ffn_hidden_size // par.expert_tp) if m.is_moe else m.ffn_hidden_size,
        E=m.num_experts, k=m.moe_router_topk, s=seq // par.cp, tp=par.tp, etp=par.expert_tp, V=m.vocab_size)


def terms_bytes(terms: list[Term], m: ModelConfig, par: ParallelConfig, seq: int, mbs: int,
                precision: str) -> int:
    """Bytes one micro-batch of these terms keeps on one GPU.

    Tokens per GPU are mbs * seq / cp. Hidden-size tensors are split over TP only under
    sequence parallelism; head, FFN and vocabulary dimensions always are; routed expert
    tokens are this rank's (sequence-parallel) tokens times top-k, assuming balanced routing.
    """
    D = _dims(m, par, seq)
    sp = par.sp and par.tp > 1
    total = 0
    for t in terms:
        divisor = {"hidden": par.tp if sp else 1, "tp": par.tp, "experts": par.tp, "vocab": par.tp,
                   "none": 1}[t.split]
        count = (1 if t.per == "microbatch" else mbs * D.s) * t.elements(D)
        total += math.ceil(count / divisor) * _element_bytes(t.kind, precision)
    return total


def once_terms(spec: str, recompute: str) -> list[Term]:
    """Terms a rank keeps once per micro-batch, shared by its layers."""
    if recompute == "full":
        return _FULL_RECOMPUTE_ONCE
    once = ACTIVATION_TERMS[spec]["once"]
    return [t for t in once if not t.core] if recompute == "selective" else once


def layer_terms(m: ModelConfig, spec: str, recompute: str) -> list[Term]:
    """The saved-tensor terms of one decoder layer for this spec and recompute mode."""
    terms = ACTIVATION_TERMS[spec]
    if recompute == "full":
        return _FULL_RECOMPUTE
    attention = terms["attention"]
    if recompute == "selective":
        attention = [t for t in attention if not t.core] + terms["selective"]
    return attention + terms["moe" if m.is_moe else "dense_mlp"]


def microbatches_in_flight(par: ParallelConfig, microbatches: int, rank: int) -> float:
    """Micro-batches' worth of this pipeline rank's layers whose activations it holds at
    its peak: 1F1B warms up pp - rank micro-batches; the interleaved schedule
    2 (pp - rank - 1) + (vpp - 1) pp + 1 model chunks (megatron-core's warm-up counts)."""
    if par.pp == 1:
        return 1.0
    if par.vpp is None:
        return float(min(microbatches, par.pp - rank))
    chunks = min(microbatches * par.vpp, 2 * (par.pp - rank - 1) + (par.vpp - 1) * par.pp + 1)
    return chunks / par.vpp


@dataclass(frozen=True)
class Activations:
    saved: int       # kept for backward at the rank's peak (what a saved-tensor hook sees)
    transient: int   # working memory on top: a recomputed layer, the fp32 logit gradient

    @property
    def total(self) -> int:
        return self.saved + self.transient


def activation_bytes(m: ModelConfig, par: ParallelConfig, seq: int, mbs: int, microbatches: int,
                     precision: str, spec: str = "te", recompute: str = "none", first: bool = True,
                     last: bool = True) -> Activations:
    """Activation memory of the first and/or last pipeline rank."""
    layers = stage_layers(m, par, first, last)
    per_layer = terms_bytes(layer_terms(m, spec, recompute), m, par, seq, mbs, precision)
    per_microbatch = terms_bytes(once_terms(spec, recompute), m, par, seq, mbs, precision)
    if first:
        per_microbatch += terms_bytes(ACTIVATION_TERMS[spec]["inputs"], m, par, seq, mbs, precision)
    in_flight = microbatches_in_flight(par, microbatches, 0 if first else par.pp - 1)
    saved = round((layers * per_layer + per_microbatch) * in_flight)
    transient = 0
    if recompute == "full":
        # Backward re-runs one layer at a time, which then holds its full working set.
        transient = terms_bytes(layer_terms(m, spec, "none"), m, par, seq, mbs, precision)
    if last:
        saved += terms_bytes(ACTIVATION_TERMS[spec]["logits"], m, par, seq, mbs, precision)
        logit_grad = mbs * (seq // par.cp) * math.ceil(m.vocab_size / par.tp) * 4
        transient = max(transient, logit_grad)
    return Activations(saved, transient)


# ----------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class Memory:
    params: int
    grads: int
    optimizer: int
    activations: Activations
    save: int = 0          # GPU bytes an optimizer checkpoint save adds (between steps)
    save_host: int = 0     # host bytes per GPU it adds

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + max(self.activations.total, self.save)


def param_state_bytes(m: ModelConfig, par: ParallelConfig, world: int, precision: str, distopt: bool,
                      first: bool = True, last: bool = True) -> tuple[int, int, int]:
    """(parameter, gradient, optimizer-state) bytes on one GPU of the first/last pipeline rank."""
    p = rank_params(m, par, first, last)
    param = p.total * (4 if precision == "fp32" else 2) + (2 * p.gemm if precision == "fp8" else 0)
    grads = 4 * p.total
    per_param = 8 if precision == "fp32" else 12
    dense_shards = world // (par.tp * par.pp) if distopt else 1            # DP x CP
    expert_shards = world // (par.expert_tp * par.ep * par.pp) if distopt else 1
    optimizer = math.ceil(per_param * p.dense / dense_shards) + math.ceil(per_param * p.expert / expert_shards)
    return param, grads, optimizer


def _buffer_sizes(m: ModelConfig, par: ParallelConfig, world: int, first: bool, last: bool):
    """((dense parameters, their DP x CP group), (expert parameters, their expert-DP group))
    of a pipeline rank's gradient buffers."""
    p = rank_params(m, par, first, last)
    return (p.dense, world // (par.tp * par.pp)), (p.expert, world // (par.expert_tp * par.ep * par.pp))


def optimizer_save_bytes(m: ModelConfig, par: ParallelConfig, world: int, distopt: bool, optim_ckpt: str,
                         overlap: bool = True, first: bool = True, last: bool = True) -> tuple[int, int]:
    """(GPU, host) bytes one GPU adds while saving the distributed optimizer's state in
    megatron-core's format `optim_ckpt` (recipes/checkpointing.py).

    fully_reshardable all-gathers, on every rank, the fp32 master weights and both Adam
    moments of the rank's whole model shard into host memory (12 bytes per parameter), one
    state and one bucket at a time through the GPU (the bucket's fp32 gather buffer plus
    this rank's 1/n of it to send; buckets under overlap on the first pipeline rank, whole
    buffers otherwise, an upper bound with VPP). dp_reshardable, and the non-distributed
    optimizer, write what each rank holds: nothing is added."""
    if not distopt or optim_ckpt != "fully_reshardable":
        return 0, 0
    dp = world // (par.tp * par.pp * par.cp)
    gpu = 0
    for params, n in _buffer_sizes(m, par, world, first, last):
        bucket = min(params, ddp_bucket(dp)) if overlap and first else params
        gpu = max(gpu, math.ceil(4 * bucket * (1 + 1 / n)))
    return gpu, 12 * rank_params(m, par, first, last).total


def dp_comm_seconds(m: ModelConfig, par: ParallelConfig, world: int, precision: str, distopt: bool,
                    bandwidth: float, first: bool = True, last: bool = True) -> tuple[float, float]:
    """(gradient reduction, parameter all-gather) seconds per step of one GPU's data-parallel
    collectives, at `bandwidth` bytes/s: a ring moves (n - 1) / n of the buffer per GPU.
    Gradients are fp32 (grad_reduce_in_fp32); with the distributed optimizer they are
    reduce-scattered and the updated parameters (model dtype; bf16 under FP8) all-gathered,
    without it all-reduced (twice the traffic of a reduce-scatter)."""
    ring = sum(params * (n - 1) / n for params, n in _buffer_sizes(m, par, world, first, last))
    if not distopt:
        return 2 * 4 * ring / bandwidth, 0.0
    return 4 * ring / bandwidth, (4 if precision == "fp32" else 2) * ring / bandwidth


def dp_exposed_seconds(reduce: float, gather: float, compute: float, microbatches: int, overlap: bool) -> float:
    """The part of the data-parallel communication a step waits for. With overlap the
    reduction hides behind the last micro-batch's backward (2/3 of its compute: the schedules
    reduce only once its gradients are complete) and the all-gather behind the first one's
    forward (1/3); the rest, and without overlap all of it, adds to the step."""
    if not overlap:
        return reduce + gather
    per_microbatch = compute / microbatches
    return max(0.0, reduce - 2 * per_microbatch / 3) + max(0.0, gather - per_microbatch / 3)


def rank_memory(m: ModelConfig, par: ParallelConfig, world: int, seq: int, mbs: int, microbatches: int,
                precision: str, distopt: bool, recompute: str, spec: str = "te", first: bool = True,
                last: bool = True, optim_ckpt: str = "dp_reshardable", overlap: bool = True) -> Memory:
    params, grads, optimizer = param_state_bytes(m, par, world, precision, distopt, first, last)
    act = activation_bytes(m, par, seq, mbs, microbatches, precision, spec, recompute, first, last)
    save, save_host = optimizer_save_bytes(m, par, world, distopt, optim_ckpt, overlap, first, last)
    return Memory(params, grads, optimizer, act, save, save_host)


# -------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Setting:
    """What the planner is asked about."""

    model: ModelConfig
    gpus: int
    gpu_mem: int
    seq: int
    precision: str = "bf16"         # bf16, fp8 or fp32
    mbs: int = 1
    gbs: int = 1024
    gpu: str = "h100"
    mfu: float = 0.4
    reserve: int = 4 * GIB
    spec: str = "te"
    max_tp: int = 8
    peak_tflops: float | None = None
    # The GPU recipe's defaults (model.builder.TRAINING_DEFAULTS, which needs torch to import).
    overlap: bool = True
    optim_ckpt: str = "dp_reshardable"
    dp_bw: float | None = None      # bytes/s; None: DP_BANDWIDTH by whether the job fits one node

    @property
    def peak(self) -> float:
        return self.peak_tflops or PEAK_TFLOPS[self.gpu][self.precision]

    @property
    def bandwidth(self) -> float:
        return self.dp_bw or DP_BANDWIDTH["node" if self.gpus <= GPUS_PER_NODE else "network"]


@dataclass(frozen=True)
class Row:
    parallel: ParallelConfig
    dp: int
    distopt: bool
    recompute: str
    memory: Memory
    rank: str                # pipeline rank the memory is for: only, first or last
    step_s: float
    mfu: float
    fits: bool
    dp_comm_s: float = 0.0   # of step_s: data-parallel communication not hidden


def batch_problem(s: Setting, par: ParallelConfig) -> str | None:
    dp = s.gpus // (par.tp * par.pp * par.cp)
    if s.gbs % (s.mbs * dp):
        return f"gbs={s.gbs} is not divisible by mbs*dp={s.mbs}*{dp}"
    return None


def estimate(s: Setting, par: ParallelConfig, distopt: bool, recompute: str) -> Row:
    """Memory of the fuller of the first and last pipeline ranks, and the step time."""
    m = s.model
    dp = s.gpus // (par.tp * par.pp * par.cp)
    microbatches = s.gbs // (s.mbs * dp)
    ranks = [("only", True, True)] if par.pp == 1 else [("first", True, False), ("last", False, True)]
    candidates = [(name, rank_memory(m, par, s.gpus, s.seq, s.mbs, microbatches, s.precision, distopt, recompute,
                                     s.spec, first=first, last=last, optim_ckpt=s.optim_ckpt, overlap=s.overlap))
                  for name, first, last in ranks]
    rank, memory = max(candidates, key=lambda c: c[1].total)
    tokens = s.gbs * s.seq
    model_flops = tokens * flops_per_token(m, s.seq)
    work = model_flops + tokens * recompute_flops_per_token(m, s.seq, recompute)
    bubble = (par.pp - 1) / ((par.vpp or 1) * microbatches)
    peak = s.gpus * s.peak * 1e12
    compute = work / (peak * s.mfu)
    # The first pipeline rank ends the step; the others' reductions overlap its last backwards.
    reduce, gather = dp_comm_seconds(m, par, s.gpus, s.precision, distopt, s.bandwidth, first=True, last=par.pp == 1)
    comm = dp_exposed_seconds(reduce, gather, compute, microbatches, s.overlap)
    step = compute * (1 + bubble) + comm
    return Row(par, dp, distopt, recompute, memory, rank, step, model_flops / (step * peak),
               memory.total + s.reserve <= s.gpu_mem, comm)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(m: ModelConfig, gpus: int, max_tp: int = 8, max_cp: int = 16, max_vpp: int = 8):
    """Every layout on `gpus` GPUs worth asking layout_problems about (SP on whenever tp > 1)."""
    for tp in [t for t in _divisors(gpus) if t <= max_tp]:
        for pp in _divisors(gpus // tp):
            for cp in [c for c in _divisors(gpus // (tp * pp)) if c <= max_cp]:
                vpps = [None] + (list(range(2, max_vpp + 1)) if pp > 1 else [])
                accounts = list(itertools.product((False, True), repeat=2)) if pp > 1 else [(False, False)]
                if m.is_moe:
                    experts = [(ep, etp) for ep in _divisors(m.num_experts) if ep <= gpus
                               for etp in sorted({1, tp})]
                else:
                    experts = [(1, None)]
                for vpp, (emb, loss), (ep, etp) in itertools.product(vpps, accounts, experts):
                    yield ParallelConfig(tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, etp=etp, sp=tp > 1,
                                         account_for_embedding_in_pipeline_split=emb,
                                         account_for_loss_in_pipeline_split=loss)


def plan(s: Setting) -> tuple[list[Row], list[tuple[ParallelConfig, list[str]]]]:
    """(estimates of every valid layout x optimizer x recompute, sorted; rejected layouts)."""
    rows, rejected = [], []
    for par in candidate_layouts(s.model, s.gpus, s.max_tp):
        problems = layout_problems(s.model, par, s.gpus, s.seq)
        if not problems and (why := batch_problem(s, par)):
            problems = [why]
        if problems:
            rejected.append((par, problems))
            continue
        for distopt, recompute in itertools.product((True, False), ("none", "selective", "full")):
            rows.append(estimate(s, par, distopt, recompute))
    # Communication is not modelled, so equal step times go to the layout with the fewest
    # GPUs per model replica (the least communication), then to the lower memory.
    rows.sort(key=lambda r: (not r.fits, round(r.step_s, 6), r.parallel.tp * r.parallel.pp * r.parallel.cp,
                             r.parallel.ep * r.parallel.expert_tp, r.memory.total))
    return rows, rejected


# ------------------------------------------------------------------------------- CLI

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'80GiB' -> bytes (GB is 1e9, GiB 2**30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B|B)\s*", text.upper())
    if not match:
        raise ConfigError(f"cannot read size {text!r}; write it like 80GiB or 141GB")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _layout_cells(par: ParallelConfig) -> list[str]:
    acct = ("E" if par.account_for_embedding_in_pipeline_split else "") + \
           ("L" if par.account_for_loss_in_pipeline_split else "")
    return [str(par.tp), str(par.pp), str(par.vpp or "-"), str(par.cp), str(par.ep),
            str(par.expert_tp), acct or "-"]


def aligned(table: list[tuple | list], left: int = 0) -> str:
    """Rows of strings as aligned text columns: the first `left` columns flush left, the
    rest flush right (numbers). Also the benchmarks' tables."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in table)


def format_rows(rows: list[Row]) -> str:
    head = ["tp", "pp", "vpp", "cp", "ep", "etp", "acct", "dp", "distopt", "recompute", "params",
            "grads", "optim", "activ", "save", "total GiB", "rank", "step s", "dp comm s", "MFU", "fits"]
    table = [head]
    for r in rows:
        mem = r.memory
        save = f"{mem.save / GIB:.1f}+{mem.save_host / GIB:.1f}h" if mem.save_host else "-"
        table.append(_layout_cells(r.parallel) + [
            str(r.dp), "yes" if r.distopt else "no", r.recompute,
            *(f"{x / GIB:.1f}" for x in (mem.params, mem.grads, mem.optimizer, mem.activations.total)), save,
            f"{mem.total / GIB:.1f}", r.rank, f"{r.step_s:.2f}", f"{r.dp_comm_s:.2f}", f"{r.mfu:.2f}",
            "yes" if r.fits else "NO"])
    return aligned(table)


_KEYS = {"model", "gpus", "gpu_mem", "seq", "precision", "mbs", "gbs", "gpu", "mfu", "reserve", "spec",
         "max_tp", "top", "show", "peak_tflops", "layers", "overlap", "dp_bw", "optim_ckpt"}


def parse_args(argv: list[str]) -> tuple[Setting, int, str]:
    """key=value arguments -> (Setting, rows to print, what to show). ConfigError on bad input."""
    args = {}
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq or key not in _KEYS:
            raise ConfigError(f"argument {a!r} is not key=value with key in {', '.join(sorted(_KEYS))}")
        args[key] = value
    missing = [k for k in ("model", "gpus", "seq") if k not in args]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (e.g. model=qwen3_8b gpus=64 seq=4096)")

    def integer(key, default=None):
        if key not in args:
            return default
        try:
            value = int(args[key])
        except ValueError:
            raise ConfigError(f"{key}={args[key]!r} is not an integer") from None
        if value < 1:
            raise ConfigError(f"{key}={value} must be >= 1")
        return value

    gpu = args.get("gpu", "h100")
    if gpu not in PEAK_TFLOPS:
        raise ConfigError(f"gpu={gpu!r} is not one of {', '.join(PEAK_TFLOPS)}")
    spec = args.get("spec", "te")
    if spec not in ACTIVATION_TERMS:
        raise ConfigError(f"spec={spec!r} must be te or local")
    show = args.get("show", "fit")
    if show not in ("fit", "all", "invalid"):
        raise ConfigError(f"show={show!r} must be fit, all or invalid")
    try:
        mfu = float(args.get("mfu", 0.4))
        peak = float(args["peak_tflops"]) if "peak_tflops" in args else None
    except ValueError as e:
        raise ConfigError(f"mfu and peak_tflops must be numbers ({e})") from None
    if not 0 < mfu <= 1:
        raise ConfigError(f"mfu={mfu} must be in (0, 1]")
    overlap = args.get("overlap", "on")
    if overlap not in ("on", "off"):
        raise ConfigError(f"overlap={overlap!r} must be on or off")
    optim_ckpt = args.get("optim_ckpt", "dp_reshardable")
    if optim_ckpt not in ("dp_reshardable", "fully_reshardable"):
        raise ConfigError(f"optim_ckpt={optim_ckpt!r} must be dp_reshardable or fully_reshardable")
    setting = Setting(
        model=load_model_config(args["model"], **({"num_layers": integer("layers")} if "layers" in args else {})),
        gpus=integer("gpus"),
        gpu_mem=parse_size(args["gpu_mem"]) if "gpu_mem" in args else GPU_MEMORY[gpu],
        seq=integer("seq"), precision=compute_precision(args.get("precision", "bf16")),
        mbs=integer("mbs", 1), gbs=integer("gbs", 1024), gpu=gpu, mfu=mfu,
        reserve=parse_size(args["reserve"]) if "reserve" in args else 4 * GIB, spec=spec,
        max_tp=integer("max_tp", 8), peak_tflops=peak, overlap=overlap == "on", optim_ckpt=optim_ckpt,
        dp_bw=parse_size(args["dp_bw"]) if "dp_bw" in args else None)
    return setting, integer("top", 25), show


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print("usage: " + " ".join(__doc__.split("\n\n")[1].split()))   # the docstring's usage lines
        return 0
    try:
        s, top, show = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, rejected = plan(s)
    m = s.model
    fitting = [r for r in rows if r.fits]
    print(f"{m.name} on {s.gpus} x {s.gpu} ({s.gpu_mem / GIB:.1f} GiB, {s.reserve / GIB:.1f} GiB reserved), "
          f"seq {s.seq}, mbs {s.mbs}, gbs {s.gbs}, {s.precision}, spec {s.spec}, assumed MFU {s.mfu:.2f} "
          f"of {s.peak:.0f} TFLOP/s, DP {s.bandwidth / 1e9:.0f} GB/s, overlap {'on' if s.overlap else 'off'}, "
          f"optimizer checkpoints {s.optim_ckpt}")
    print(f"model FLOPs/token {flops_per_token(m, s.seq):.3e} = 6 x {matmul_params(m) / 1e9:.3f}B active "
          f"matmul weights + attention 12*L*s*heads*head_dim")
    print(f"{len(rejected)} layouts rejected, {len(rows) // 6} valid; x distributed optimizer x recompute: "
          f"{len(rows)} rows, {len(fitting)} fit")
    if show == "invalid":
        for par, problems in rejected[:top]:
            print(" ".join(f"{k}={v}" for k, v in zip(("tp", "pp", "vpp", "cp", "ep", "etp", "acct"),
                                                     _layout_cells(par))) + ": " + "; ".join(problems))
        return 0
    shown = (fitting if show == "fit" else rows)[:top]
    if not shown:
        print("no layout fits; try more GPUs, a shorter seq, recompute, or precision=fp8")
        return 0
    print(format_rows(shown))
    if len(shown) < (len(fitting) if show == "fit" else len(rows)):
        print(f"(first {len(shown)}; top=N for more, show=all to include layouts that do not fit)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
