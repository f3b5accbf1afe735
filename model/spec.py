"""Qwen3 layer specs: dense and MoE, each with a Transformer Engine and a local variant.

The TE variant is megatron-core's TE layer spec with QK-norm (fused RMSNorm+QKV, TE
attention, grouped-GEMM experts). It is the GPU path and the only one that runs FP8.

The local variant uses megatron-core's own parallel linears and attention, and runs
anywhere, including CPU. Three things differ from megatron-core's `get_gpt_layer_local_spec`:
  * the norm is `RMSNorm` below, which supports sequence parallelism (megatron-core's
    torch-norm wrapper refuses it, and MoE with TP > 1 needs SP);
  * the MoE layer maps only `input_layernorm` onto the TE checkpoint name. megatron-core's
    local spec also renames `pre_mlp_layernorm` to `mlp.linear_fc1.layer_norm_*`, which is
    right for dense layers but wrong for MoE layers, where the TE spec keeps a separate
    `pre_mlp_layernorm`;
  * with context parallelism the core attention is `model.cp_attention`'s, since
    megatron-core's local attention refuses CP.
The first two keep checkpoint keys identical to the TE spec, so a checkpoint written on CPU loads
on GPU and back.
"""

from __future__ import annotations

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from model.cp_attention import ContextParallelAttention


class RMSNorm(torch.nn.Module):
    """Qwen3's RMSNorm: normalise in float32, cast back, then scale (as HF computes it)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        # With CPU initialisation leave the device to the ambient default (CPU, or meta when
        # counting parameters), as megatron-core's own CPU-initialised layers do.
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        # Under SP each TP rank normalises a slice of the sequence, so the weight gradient
        # must be summed over TP; megatron-core's finalize_model_grads reads this flag.
        self.weight.sequence_parallel = config.sequence_parallel
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


# Where the local spec has a standalone RMSNorm above, the TE spec has megatron-core's
# TENorm (QK-norm and the MoE layer's pre-MLP norm in its layer spec; the final norm in
# block_spec). From TE 1.13 that norm keeps an `_extra_state` (FP8 recipe metadata, an
# empty tensor without FP8), which RMSNorm has no use for and a local checkpoint lacks.
# model.checkpoint lets exactly these be absent on load, so checkpoints move both ways.
# (The norms TE fuses into a linear, input_layernorm and the dense pre-MLP norm, share
# that linear's `_extra_state`, which megatron-core's local linears already save.)
TE_NORM_EXTRA_STATES = tuple(f"{norm}._extra_state"
                             for norm in ("q_layernorm", "k_layernorm", "pre_mlp_layernorm", "final_layernorm"))

_TE_KEY_FOR_INPUT_NORM = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_"}
_TE_KEY_FOR_PRE_MLP_NORM = {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}

def local_layer_spec(moe: bool, context_parallel: bool = False) -> ModuleSpec:
    """Qwen3 decoder layer from megatron-core's local modules (runs on CPU); with context
    parallelism, model.cp_attention's core attention (megatron-core's refuses it)."""
    if moe:
        mlp = ModuleSpec(
            module=MoELayer,
            submodules=MoESubmodules(
                experts=ModuleSpec(
                    module=SequentialMLP,
                    submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                             linear_fc2=RowParallelLinear),
                ),
                shared_experts=None,
            ),
        )
        keys_map = dict(_TE_KEY_FOR_INPUT_NORM)
    else:
        mlp = ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        )
        keys_map = {**_TE_KEY_FOR_INPUT_NORM, **_TE_KEY_FOR_PRE_MLP_NORM}
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=ContextParallelAttention if context_parallel else DotProductAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=RMSNorm,
                    k_layernorm=RMSNorm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )

def te_layer_spec(num_experts: int | None) -> ModuleSpec:
    """Qwen3 decoder layer from Transformer Engine modules (GPU, FP8-capable)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(
        num_experts=num_experts or None,
        moe_grouped_gemm=bool(num_experts),
        qk_layernorm=True,
    )

def block_spec(config: TransformerConfig, use_te: bool, vp_stage: int | None = None
               ) -> TransformerBlockSubmodules:
    """Decoder block for this pipeline (and virtual pipeline) stage."""
    layer = te_layer_spec(config.num_moe_experts) if use_te else local_layer_spec(
        bool(config.num_moe_experts), context_parallel=config.context_parallel_size > 1)
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = RMSNorm
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=final_norm)
