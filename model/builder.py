"""The one place that turns a ModelConfig into megatron-core GPTModel(s).

Call `model.parallel.init_distributed` first: megatron-core reads the parallel state
when it builds layers. `build_model` returns one module per virtual pipeline stage
(a single-element list without VPP), which is what megatron-core's schedules, DDP
and optimizer take.

It also holds what the GPU (Transformer Engine) path changes for speed and the CPU path
does not: the fusions, gradient-accumulation fusion, DDP's communication overlap and the
optimizer checkpoint format (`TRAINING_DEFAULTS`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from model import cpu_compat
from model.config import ModelConfig, ParallelConfig
from model.parallel import te_available
from model.spec import block_spec

_AUX_LOSS_TYPES = {"global_aux_loss", "aux_loss", "seq_aux_loss"}

# The fused kernels ship with TE/apex, so the local spec turns every fusion off.
_LOCAL_SPEC_FUSIONS = dict(
    bias_activation_fusion=False,
    masked_softmax_fusion=False,
    bias_dropout_fusion=False,
    apply_rope_fusion=False,
    gradient_accumulation_fusion=False,
    persist_layer_norm=False,
    moe_permute_fusion=False,
    moe_router_fusion=False,
)

# What the GPU (Transformer Engine) path does for speed, in one place: the fusions of every
# model built on it (training, evaluation, generation; transformer_config), what a model
# trained by megatron-core's DDP adds (training_overrides), and how DDP, the distributed
# optimizer and its checkpoints run (TRAINING_DEFAULTS). The CPU (local spec) path keeps
# megatron-core's plain defaults: they are what its tests measure.
_TE_FUSIONS = dict(
    bias_activation_fusion=True,   # SwiGLU's gate, activation and product in one kernel
    apply_rope_fusion=True,        # TE's fused rotary embedding
    moe_permute_fusion=True,       # TE's fused token permutation to and from the experts
    # megatron-core's vocab-parallel cross entropy jit-fused (its "native" implementation, not
    # TE's kernel): the same fp32 math over the [tokens, vocab / tp] logits in three fused
    # kernels instead of one element-wise pass after another over that slice, which at
    # Qwen3's 151,936-row vocabulary is a small model's largest tensor
    cross_entropy_loss_fusion=True,
    # the residual adds through megatron-core's jit-fused bias-dropout-add; Qwen3 has neither
    # bias nor dropout, so this compiles the add alone: a small effect (Megatron-LM's
    # training scripts turn it on by default; megatron-core's config leaves it off)
    bias_dropout_fusion=True,
)


@dataclass(frozen=True)
class TrainingDefaults:
    """How megatron-core's DDP, the distributed optimizer and the optimizer checkpoints run on
    one path (recipes.engine.ddp_config, recipes.checkpointing; model.plan prices them)."""

    overlap_grad_reduce: bool
    overlap_param_gather: bool      # with the distributed optimizer only
    optimizer_checkpoint: str       # megatron-core's distrib_optim_sharding_type


TRAINING_DEFAULTS = {
    # GPU: gradients are reduce-scattered (all-reduced without the distributed optimizer)
    # bucket by bucket while the last micro-batch's backward still runs, and the updated
    # parameters all-gathered bucket by bucket just ahead of the next forward that needs
    # them, on NCCL's own stream, so data-parallel communication hides behind compute.
    # Checkpoints save the optimizer state as each rank holds it: no gather at any save
    # (fully_reshardable all-gathers fp32 master weights and both Adam moments of the whole
    # model shard, 12 bytes per parameter, into every rank's host memory at every save: about
    # 24 GB per GPU for Qwen3-8B at TP=4), at the cost that a resume keeps TP/PP/VPP/CP/EP/ETP
    # and the data-parallel buckets (recipes.checkpointing; trainer.optimizer_checkpoint).
    True: TrainingDefaults(overlap_grad_reduce=True, overlap_param_gather=True, optimizer_checkpoint="dp_reshardable"),
    # CPU: megatron-core's defaults, which the CPU tests compare bit for bit (overlap runs
    # collectives on CUDA streams, which model.cpu_compat makes no-ops): synchronous
    # reductions, and optimizer checkpoints that load at any layout, whose gather costs
    # nothing at the CPU's model sizes (the TP=2 -> TP=1 resume is tested on it).
    False: TrainingDefaults(overlap_grad_reduce=False, overlap_param_gather=False,
                            optimizer_checkpoint="fully_reshardable"),
}


def wgrad_fusion_available() -> bool:
    """Whether weight gradients can be accumulated straight into DDP's fp32 `main_grad`
    (gradient_accumulation_fusion): TE's linears do it themselves, but megatron-core's own
    ColumnParallelLinear, the output layer in the TE spec too, needs apex's
    `fused_weight_gradient_mlp_cuda` kernel and refuses the setting without it."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def training_overrides(use_te: bool) -> dict:
    """TransformerConfig settings for a model that megatron-core's DDP trains
    (recipes.engine.build_engine) on this path: gradient-accumulation fusion writes into
    DDP's `main_grad` buffers, which neither inference nor the DeepSpeed engine has."""
    return {"gradient_accumulation_fusion": use_te and wgrad_fusion_available()}


def transformer_config(model: ModelConfig, par: ParallelConfig, dtype: torch.dtype = torch.float32,
                       use_te: bool | None = None, **overrides) -> TransformerConfig:
    """megatron-core TransformerConfig for Qwen3 at this layout and dtype."""
    use_te = te_available() if use_te is None else use_te
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        # Qwen3: RMSNorm + QK-norm, SwiGLU, no biases, no dropout.
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        # Layout.
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        virtual_pipeline_model_parallel_size=par.vpp,
        context_parallel_size=par.cp,
        expert_model_parallel_size=par.ep,
        expert_tensor_parallel_size=par.expert_tp,
        sequence_parallel=par.sp and par.tp > 1,
        account_for_embedding_in_pipeline_split=par.account_for_embedding_in_pipeline_split,
        account_for_loss_in_pipeline_split=par.account_for_loss_in_pipeline_split,
        # Precision.
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
    )
    if model.is_moe:
        aux = model.moe_aux_loss_type
        kwargs.update(
            num_moe_experts=model.num_experts,
            moe_ffn_hidden_size=model.moe_ffn_hidden_size,
            moe_router_topk=model.moe_router_topk,
            # HF norm_topk_prob=True is softmax over the top-k logits (top-k, then softmax);
            # norm_topk_prob=False is softmax over all experts, then top-k.
            moe_router_pre_softmax=not model.moe_norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_load_balancing_type=aux if aux in _AUX_LOSS_TYPES else "none",
            moe_aux_loss_coeff=model.moe_aux_loss_coeff if aux in _AUX_LOSS_TYPES else 0.0,
            moe_router_dtype="fp32",
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=use_te,
        )
    kwargs.update(_TE_FUSIONS if use_te else _LOCAL_SPEC_FUSIONS)
    if cpu_compat.is_active():
        kwargs.update(cpu_compat.CPU_TRANSFORMER_CONFIG)
    kwargs.update(overrides)
    if not model.is_moe:
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith("moe_")}
    return TransformerConfig(**kwargs)


def build_model(model: ModelConfig, par: ParallelConfig, dtype: torch.dtype = torch.float32,
                use_te: bool | None = None, meta: bool = False, **config_overrides
                ) -> list[GPTModel]:
    """GPTModel chunk(s) for this rank. `meta=True` allocates nothing (parameter counting)."""
    use_te = te_available() if use_te is None else use_te
    if meta:
        # megatron-core passes an explicit CUDA device unless it initialises on CPU, and an
        # explicit device escapes the meta context; TE modules always pass one.
        use_te = False
        config_overrides.setdefault("perform_initialization", False)
        config_overrides.setdefault("use_cpu_initialization", True)
    config = transformer_config(model, par, dtype, use_te, **config_overrides)
    vp_stages = range(par.vpp) if par.vpp else [None]
    chunks = []
    with torch.device("meta") if meta else contextlib.nullcontext():
        for vp_stage in vp_stages:
            pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
            post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
            chunks.append(GPTModel(
                config=config,
                transformer_layer_spec=block_spec(config, use_te, vp_stage),
                vocab_size=model.vocab_size,
                max_sequence_length=model.max_position_embeddings,
                pre_process=pre,
                post_process=post,
                share_embeddings_and_output_weights=model.tie_word_embeddings,
                position_embedding_type="rope",
                rotary_percent=1.0,
                rotary_base=model.rope_theta,
                vp_stage=vp_stage,
            ))
    return chunks
