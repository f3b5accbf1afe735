"""The megatron-core TransformerConfig the builder derives for Qwen3 (no processes needed),
the GPU path's performance settings, and which layer spec a machine gets."""

import sys

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


# ---- the GPU (Transformer Engine) path's performance settings, asked of the real mapping
# (a Transformer Engine TransformerConfig cannot be built on CPU: its __post_init__ checks
# the fused kernels, so the kwargs it would get are recorded instead)

@pytest.fixture
def config_kwargs(monkeypatch):
    import model.builder

    monkeypatch.setattr(model.builder, "TransformerConfig", lambda **kwargs: kwargs)
    return lambda name, use_te: model.builder.transformer_config(load_model_config(name), ParallelConfig(),
                                                                 dtype=torch.bfloat16, use_te=use_te)


FUSIONS = ("bias_activation_fusion", "apply_rope_fusion", "cross_entropy_loss_fusion", "bias_dropout_fusion")


def test_te_path_fuses_and_the_local_path_does_not(config_kwargs):
    te, local = config_kwargs("tiny_moe", True), config_kwargs("tiny_moe", False)
    assert {k: te[k] for k in FUSIONS} == dict.fromkeys(FUSIONS, True)
    assert te["moe_permute_fusion"] and te["moe_grouped_gemm"]
    assert te.get("cross_entropy_fusion_impl", "native") == "native"   # megatron-core's, needing no TE kernel
    assert not any(local.get(k, False) for k in FUSIONS + ("moe_permute_fusion", "gradient_accumulation_fusion"))
    # gradient-accumulation fusion needs DDP's main_grad: only build_engine asks for it
    assert not config_kwargs("tiny", True).get("gradient_accumulation_fusion", False)


def test_gradient_accumulation_fusion_follows_what_imports(monkeypatch):
    import types

    from model.builder import training_overrides

    kernel = "fused_weight_gradient_mlp_cuda"   # apex's
    monkeypatch.setitem(sys.modules, kernel, types.ModuleType(kernel))
    assert training_overrides(True) == {"gradient_accumulation_fusion": True}
    assert training_overrides(False) == {"gradient_accumulation_fusion": False}
    monkeypatch.setitem(sys.modules, kernel, None)   # the import fails, as without apex
    assert training_overrides(True) == {"gradient_accumulation_fusion": False}


def test_ddp_overlaps_communication_on_the_te_path_only():
    from recipes.engine import ddp_config

    te = ddp_config(ParallelConfig(tp=2, sp=True), use_distributed_optimizer=True, use_te=True)
    assert te.overlap_grad_reduce and te.overlap_param_gather and not te.align_param_gather
    assert te.use_distributed_optimizer and te.grad_reduce_in_fp32 and te.bucket_size is None   # megatron-core's
    # the interleaved schedule dispatches every stage's gathers together
    assert ddp_config(ParallelConfig(pp=2, vpp=2), True, use_te=True).align_param_gather
    plain = ddp_config(ParallelConfig(), use_distributed_optimizer=False, use_te=True)
    assert plain.overlap_grad_reduce and not plain.overlap_param_gather   # gathers belong to the distributed optimizer
    cpu = ddp_config(ParallelConfig(pp=2, vpp=2), True, use_te=False)
    assert not (cpu.overlap_grad_reduce or cpu.overlap_param_gather or cpu.align_param_gather)


def test_optimizer_checkpoint_default_per_path_and_the_planner_agrees():
    from model.builder import TRAINING_DEFAULTS
    from model.plan import Setting

    assert TRAINING_DEFAULTS[True].optimizer_checkpoint == "dp_reshardable"
    assert TRAINING_DEFAULTS[False].optimizer_checkpoint == "fully_reshardable"
    planned = Setting(model=load_model_config("tiny"), gpus=1, gpu_mem=1, seq=8)   # model.plan imports no torch
    assert (planned.overlap, planned.optim_ckpt) == (TRAINING_DEFAULTS[True].overlap_grad_reduce,
                                                     TRAINING_DEFAULTS[True].optimizer_checkpoint)


# ---- which spec: TE on every CUDA machine, unless the local one is asked for

def test_cuda_without_transformer_engine_is_an_error(monkeypatch):
    from model.config import ConfigError
    from model.parallel import te_available

    monkeypatch.delenv("QWEN3_LOCAL_SPEC", raising=False)
    assert te_available() is False or torch.cuda.is_available()   # no CUDA: the local spec, no import tried
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)   # as a broken install: the import fails
    with pytest.raises(ConfigError) as e:
        te_available()
    message = str(e.value)
    assert "\n" not in message and "Transformer Engine does not import (ModuleNotFoundError: " in message
    assert "QWEN3_LOCAL_SPEC=1" in message
    monkeypatch.setenv("QWEN3_LOCAL_SPEC", "1")   # asked for: the local spec on a CUDA machine
    assert te_available() is False
