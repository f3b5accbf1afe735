"""The megatron-core TransformerConfig the builder derives for Qwen3 (no processes needed)."""

import pytest
import torch
import torch.nn.functional as F

from model.builder import transformer_config
from model.config import ParallelConfig, load_model_config


def test_dense_qwen3_architecture():
    c = transformer_config(load_model_config("qwen3_8b"), ParallelConfig(tp=4, sp=True), use_te=False)
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size) == (36, 4096, 12288)
    assert (c.num_attention_heads, c.num_query_groups, c.kv_channels) == (32, 8, 128)
    assert c.normalization == "RMSNorm" and c.layernorm_epsilon == 1e-6 and c.qk_layernorm
    assert c.gated_linear_unit and c.activation_func is F.silu
    assert not c.add_bias_linear and not c.add_qkv_bias
    assert c.hidden_dropout == 0.0 and c.attention_dropout == 0.0
    assert c.sequence_parallel and c.tensor_model_parallel_size == 4
    assert not c.num_moe_experts


@pytest.mark.parametrize("norm_topk,pre_softmax", [(True, False), (False, True)])
def test_router_matches_hf_norm_topk_prob(norm_topk, pre_softmax):
    # norm_topk_prob=True: softmax over the chosen k logits == renormalised top-k probabilities.
    cfg = load_model_config("qwen3_30b_a3b", moe_norm_topk_prob=norm_topk)
    c = transformer_config(cfg, ParallelConfig(), use_te=False)
    assert (c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size) == (128, 8, 768)
    assert c.moe_router_score_function == "softmax" and c.moe_router_pre_softmax is pre_softmax
    assert c.moe_shared_expert_intermediate_size is None


@pytest.mark.parametrize("kind,coeff", [("global_aux_loss", 1e-3), ("aux_loss", 1e-3), ("none", 0.0)])
def test_load_balancing_loss_is_selectable(kind, coeff):
    c = transformer_config(load_model_config("tiny_moe", moe_aux_loss_type=kind), ParallelConfig(), use_te=False)
    assert c.moe_router_load_balancing_type == kind
    assert c.moe_aux_loss_coeff == coeff


def test_default_moe_loss_is_global_batch():
    c = transformer_config(load_model_config("qwen3_235b_a22b"), ParallelConfig(), use_te=False)
    assert c.moe_router_load_balancing_type == "global_aux_loss" and c.moe_aux_loss_coeff == 1e-3


def test_dtype_flags():
    c = transformer_config(load_model_config("tiny"), ParallelConfig(), dtype=torch.bfloat16, use_te=False)
    assert c.bf16 and c.params_dtype == torch.bfloat16 and not c.fp16
