"""Parallel-layout validation (model.parallel): pure Python, no torch.distributed."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.config import HYDRA_CONF, ConfigError, ParallelConfig, load_model_config, load_parallel_config
from model.parallel import (Layout, LayoutError, layout_problems, minimum_world_size, sequence_multiple,
                            validate_layout)

PUBLISHED = ["qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b", "qwen3_14b", "qwen3_32b",
             "qwen3_30b_a3b", "qwen3_235b_a22b"]


def model(name, **overrides):
    return load_model_config(name, **overrides)


def only_problem(mdl, par, world_size=None, seq_length=None, **kwargs) -> str:
    problems = layout_problems(mdl, par, world_size, seq_length, **kwargs)
    assert len(problems) == 1, problems
    return problems[0]


def raises_layout(mdl, par, world_size=None, seq_length=None) -> str:
    with pytest.raises(LayoutError) as exc:
        validate_layout(mdl, par, world_size, seq_length)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"invalid parallel layout for {mdl.name}: ")
    return msg


# ------------------------------------------------------------------ tensor parallelism


def test_attention_heads_not_divisible_by_tp():
    # 40 heads / tp=16; with GQA the kv-head check (8 groups) necessarily fails too.
    problems = layout_problems(model("qwen3_14b"), ParallelConfig(tp=16, sp=True))
    assert problems == [
        "num_attention_heads=40 is not divisible by tp=16",
        "num_query_groups (kv heads)=8 is not divisible by tp=16",
    ]
    msg = raises_layout(model("qwen3_14b"), ParallelConfig(tp=16, sp=True))
    assert "num_attention_heads=40 is not divisible by tp=16" in msg


def test_kv_heads_not_divisible_by_tp():
    # 32 query heads split over 8, but only 4 KV heads.
    msg = only_problem(model("qwen3_30b_a3b"), ParallelConfig(tp=8, sp=True, etp=1))
    assert msg == "num_query_groups (kv heads)=4 is not divisible by tp=8"


def test_vocab_not_divisible_by_tp():
    msg = only_problem(model("tiny", vocab_size=255), ParallelConfig(tp=2))
    assert msg == "vocab_size=255 is not divisible by tp=2"
    assert layout_problems(model("tiny", vocab_size=256), ParallelConfig(tp=2)) == []


def test_dense_ffn_not_divisible_by_tp():
    msg = only_problem(model("tiny", ffn_hidden_size=385), ParallelConfig(tp=2))
    assert msg == "ffn_hidden_size=385 is not divisible by tp=2"


def test_moe_model_ignores_unused_dense_ffn_width():
    # intermediate_size of an all-MoE model is never built, so it need not divide tp.
    assert layout_problems(model("tiny_moe", ffn_hidden_size=385), ParallelConfig(tp=2, sp=True)) == []


# ----------------------------------------------------------------- pipeline parallelism


def test_layers_not_divisible_by_pp():
    msg = only_problem(model("qwen3_8b"), ParallelConfig(pp=8))
    assert msg == "layers=36 is not divisible by pp*vpp=8*1=8"
    assert layout_problems(model("qwen3_8b"), ParallelConfig(pp=4)) == []


def test_layers_not_divisible_by_pp_times_vpp():
    msg = only_problem(model("tiny"), ParallelConfig(pp=2, vpp=4))
    assert msg == "layers=4 is not divisible by pp*vpp=2*4=8"
    assert layout_problems(model("tiny"), ParallelConfig(pp=2, vpp=2)) == []


def test_vpp_needs_pp():
    msg = only_problem(model("tiny"), ParallelConfig(pp=1, vpp=2))
    assert msg == "vpp=2 needs pp > 1"


def test_account_for_embedding_and_loss_in_pipeline_split():
    m = model("qwen3_235b_a22b")
    base = dict(tp=4, pp=16, cp=2, ep=8, etp=1, sp=True)
    # 94 layers over 16 stages: not without the flags.
    msg = raises_layout(m, ParallelConfig(**base), 128, 4096)
    assert "layers=94 is not divisible by pp*vpp=16*1=16" in msg
    # One flag alone: 95 units.
    msg = only_problem(m, ParallelConfig(**base, account_for_embedding_in_pipeline_split=True))
    assert msg == "layers + embedding/loss=95 is not divisible by pp*vpp=16*1=16"
    msg = only_problem(m, ParallelConfig(**base, account_for_loss_in_pipeline_split=True))
    assert msg == "layers + embedding/loss=95 is not divisible by pp*vpp=16*1=16"
    # Both: 96 = 16 x 6.
    par = ParallelConfig(**base, account_for_embedding_in_pipeline_split=True,
                         account_for_loss_in_pipeline_split=True)
    layout = validate_layout(m, par, 128, 4096)
    assert (layout.dp, layout.expert_dp) == (1, 1)


def test_account_for_split_needs_pp():
    par = ParallelConfig(pp=1, account_for_embedding_in_pipeline_split=True)
    assert only_problem(model("tiny"), par) == "account_for_*_in_pipeline_split needs pp > 1"


# ------------------------------------------------------------------------------- MoE


def test_experts_not_divisible_by_ep():
    msg = only_problem(model("tiny_moe"), ParallelConfig(ep=3))
    assert msg == "num_experts=8 is not divisible by ep=3"


def test_moe_ffn_not_divisible_by_etp():
    msg = only_problem(model("tiny_moe"), ParallelConfig(ep=2, etp=3))
    assert msg == "moe_ffn_hidden_size=64 is not divisible by etp=3"


def test_etp_defaults_to_tp():
    # etp=None means expert TP = tp = 4: 770 is not a multiple of 4.
    msg = only_problem(model("qwen3_30b_a3b", moe_ffn_hidden_size=770), ParallelConfig(tp=4, sp=True))
    assert msg == "moe_ffn_hidden_size=770 is not divisible by etp=4"
    # With expert TP pinned to 1 the same width is fine.
    assert layout_problems(model("qwen3_30b_a3b", moe_ffn_hidden_size=770),
                           ParallelConfig(tp=4, sp=True, etp=1)) == []


def test_moe_with_tp_needs_sequence_parallel():
    msg = only_problem(model("tiny_moe"), ParallelConfig(tp=2, sp=False))
    assert msg == "MoE with tp=2 needs sequence parallelism (set parallel.sp=true)"
    assert layout_problems(model("tiny_moe"), ParallelConfig(tp=2, sp=True)) == []
    # A dense model may use TP without SP.
    assert layout_problems(model("tiny"), ParallelConfig(tp=2, sp=False)) == []


def test_ep_on_dense_model():
    msg = only_problem(model("tiny"), ParallelConfig(ep=2))
    assert msg == "ep=2 needs an MoE model; tiny is dense"


# ------------------------------------------------------------------------ world size


def test_world_size_not_divisible_by_model_parallel():
    msg = only_problem(model("qwen3_32b"), ParallelConfig(tp=8, pp=2, sp=True), world_size=24)
    assert msg == "world size 24 is not divisible by tp*pp*cp=8*2*1=16"
    msg = only_problem(model("tiny"), ParallelConfig(tp=2, cp=2), world_size=6)
    assert msg == "world size 6 is not divisible by tp*pp*cp=2*1*2=4"


def test_world_size_not_divisible_by_expert_layout():
    # tp*pp*cp = 8 divides 16, but etp(=tp=4)*ep*pp = 32 does not.
    par = ParallelConfig(tp=4, pp=2, ep=4, sp=True)
    msg = only_problem(model("qwen3_30b_a3b"), par, world_size=16)
    assert msg == ("world size 16 is not divisible by etp*ep*pp=4*4*2=32 "
                   "(ep*etp must divide dp*cp*tp=8)")
    layout = validate_layout(model("qwen3_30b_a3b"), par, 32)
    assert (layout.dp, layout.expert_dp) == (4, 1)


def test_world_size_must_be_positive():
    msg = only_problem(model("tiny"), ParallelConfig(), world_size=0)
    assert msg == "world size 0 must be positive"
    with pytest.raises(LayoutError, match="world size -4 must be positive"):
        validate_layout(model("tiny"), ParallelConfig(), world_size=-4)


# ------------------------------------------------------------------------ seq length


def test_seq_length_for_context_parallel_is_multiple_of_2cp():
    par = ParallelConfig(cp=2)
    # 4098 is a multiple of cp=2 but not of 2*cp=4 (causal load-balanced CP chunks).
    msg = only_problem(model("tiny"), par, seq_length=4098)
    assert msg == "seq_length=4098 is not divisible by 4 (required by cp)"
    assert layout_problems(model("tiny"), par, seq_length=4100) == []


def test_seq_length_for_sequence_parallel_is_multiple_of_tp():
    par = ParallelConfig(tp=4, sp=True)
    msg = only_problem(model("qwen3_8b"), par, seq_length=4098)
    assert msg == "seq_length=4098 is not divisible by 4 (required by sp)"
    assert layout_problems(model("qwen3_8b"), par, seq_length=4100) == []
    # Without SP the sequence is not split over tp.
    assert layout_problems(model("qwen3_8b"), ParallelConfig(tp=4), seq_length=4098) == []


def test_seq_length_for_cp_and_sp_together():
    # cp=2, tp=4: lcm(2*cp, cp*tp) = 8.
    par = ParallelConfig(tp=4, cp=2, sp=True)
    msg = only_problem(model("qwen3_8b"), par, seq_length=4100)
    assert msg == "seq_length=4100 is not divisible by 8 (required by cp and sp)"
    assert layout_problems(model("qwen3_8b"), par, seq_length=4104) == []


def test_fp8_needs_weight_widths_of_16_per_rank():
    """Rows are padded for FP8 (sequence widths, decode rows), weights cannot be: a width
    that is not a multiple of 16 on some rank is refused before launch; every shipped
    layout passes."""
    for name in PUBLISHED + ["tiny", "tiny_moe", "mini", "mini_moe"]:
        par = load_parallel_config(name if name in PUBLISHED else "default")
        assert layout_problems(model(name, vocab_size=4096), par, fp8=True) == [], name
    assert layout_problems(model("tiny", ffn_hidden_size=392), ParallelConfig(tp=2), fp8=True) == [
        "FP8 GEMMs need every rank's weight widths to be multiples of 16: ffn_hidden_size/tp=196"]
    assert layout_problems(model("tiny", ffn_hidden_size=392), ParallelConfig(tp=2)) == []
    assert layout_problems(model("tiny_moe", kv_channels=36), ParallelConfig(tp=2, etp=8, sp=True), fp8=True) == [
        "FP8 GEMMs need every rank's weight widths to be multiples of 16: num_attention_heads*kv_channels/tp=72, "
        "moe_ffn_hidden_size/etp=8"]


def test_seq_length_beyond_max_position_embeddings():
    msg = only_problem(model("qwen3_8b"), ParallelConfig(), seq_length=40961)
    assert msg == "seq_length=40961 exceeds max_position_embeddings=40960"
    assert layout_problems(model("qwen3_8b"), ParallelConfig(), seq_length=40960) == []


def test_seq_length_must_be_positive():
    assert only_problem(model("tiny"), ParallelConfig(), seq_length=0) == "seq_length=0 must be positive"


# ------------------------------------------------------------------ non-positive sizes


@pytest.mark.parametrize("kwargs, shown", [
    (dict(tp=0, etp=1), "tp=0"),
    (dict(tp=0), "tp=0, etp=0"),  # etp=None follows tp
    (dict(pp=-1), "pp=-1"),
    (dict(cp=0), "cp=0"),
    (dict(ep=0), "ep=0"),
    (dict(etp=0), "etp=0"),
    (dict(pp=2, vpp=0), "vpp=0"),
])
def test_non_positive_parallel_sizes(kwargs, shown):
    msg = only_problem(model("tiny"), ParallelConfig(**kwargs), world_size=8, seq_length=4096)
    assert msg == f"parallel sizes must be integers >= 1, got {shown}"
    with pytest.raises(LayoutError, match=f"got {shown}$"):
        validate_layout(model("tiny"), ParallelConfig(**kwargs))


def test_non_positive_sizes_all_named():
    msg = only_problem(model("tiny"), ParallelConfig(tp=0, cp=-2, etp=2))
    assert msg == "parallel sizes must be integers >= 1, got tp=0, cp=-2"


# -------------------------------------------------------------------- error message


def test_error_is_one_line_with_every_problem():
    m = model("tiny_moe")
    par = ParallelConfig(tp=3, ep=3, pp=3, sp=False)
    expected = [
        "num_attention_heads=4 is not divisible by tp=3",
        "num_query_groups (kv heads)=2 is not divisible by tp=3",
        "vocab_size=151936 is not divisible by tp=3",
        "layers=4 is not divisible by pp*vpp=3*1=3",
        "num_experts=8 is not divisible by ep=3",
        "moe_ffn_hidden_size=64 is not divisible by etp=3",
        "MoE with tp=3 needs sequence parallelism (set parallel.sp=true)",
        "world size 10 is not divisible by tp*pp*cp=3*3*1=9",
        "world size 10 is not divisible by etp*ep*pp=3*3*3=27 (ep*etp must divide dp*cp*tp=3)",
        "seq_length=50000 exceeds max_position_embeddings=40960",
    ]
    assert layout_problems(m, par, world_size=10, seq_length=50000) == expected
    msg = raises_layout(m, par, 10, 50000)
    assert msg == "invalid parallel layout for tiny_moe: " + "; ".join(expected)
    assert isinstance(LayoutError("x"), ConfigError)


def test_valid_layout_without_world_size_returns_none():
    assert validate_layout(model("tiny"), ParallelConfig(tp=2, pp=2, vpp=2, sp=True)) is None


# ------------------------------------------------------------ shipped layouts, dp sizes


def test_parallel_yaml_files_match_model_names():
    names = sorted(p.stem for p in (HYDRA_CONF / "parallel").glob("qwen3_*.yaml"))
    assert names == sorted(PUBLISHED)


@pytest.mark.parametrize("name, world", [
    ("qwen3_0_6b", 1), ("qwen3_1_7b", 1), ("qwen3_4b", 2), ("qwen3_8b", 4), ("qwen3_14b", 8),
    ("qwen3_32b", 16), ("qwen3_30b_a3b", 8), ("qwen3_235b_a22b", 128),
])
def test_shipped_layout_valid_at_minimum_world_size(name, world):
    m = model(name)
    par = load_parallel_config(name)
    assert minimum_world_size(par) == world
    layout = validate_layout(m, par, world, 4096)
    assert isinstance(layout, Layout)
    assert layout.world_size == world
    assert layout.dp == world // (par.tp * par.pp * par.cp)
    assert layout.expert_dp == world // (par.expert_tp * par.ep * par.pp)
    assert layout.parallel == par
    # ... and minimal: no smaller world size runs it.
    for w in range(1, world):
        assert layout_problems(m, par, w, 4096), f"{name} should not fit on {w} ranks"


def test_default_layout_fits_tiny_models():
    par = load_parallel_config("default")
    assert par == ParallelConfig()
    for name in ("tiny", "tiny_moe"):
        layout = validate_layout(model(name), par, 2, 256)
        assert (layout.dp, layout.expert_dp) == (2, 2)


def test_derived_dp_30b_a3b():
    # tp4 pp2 ep4 etp1: dp = 16 / (4*2*1) = 2; expert_dp = 16 / (1*4*2) = 2.
    layout = validate_layout(model("qwen3_30b_a3b"), load_parallel_config("qwen3_30b_a3b"), 16, 4096)
    assert (layout.world_size, layout.dp, layout.expert_dp) == (16, 2, 2)
    # world 64: dp = 8, expert_dp = 8.
    layout = validate_layout(model("qwen3_30b_a3b"), load_parallel_config("qwen3_30b_a3b"), 64, 4096)
    assert (layout.dp, layout.expert_dp) == (8, 8)


def test_derived_dp_235b():
    # tp4 pp16 cp2 ep8 etp1 on 256 ranks: dp = 256/128 = 2; expert_dp = 256/(1*8*16) = 2.
    layout = validate_layout(model("qwen3_235b_a22b"), load_parallel_config("qwen3_235b_a22b"), 256, 4096)
    assert (layout.dp, layout.expert_dp) == (2, 2)


def test_derived_dp_differs_from_expert_dp():
    # tp2 ep4 etp1 on 8 ranks: dp = 8/2 = 4, expert_dp = 8/(1*4*1) = 2.
    par = ParallelConfig(tp=2, ep=4, etp=1, sp=True)
    layout = validate_layout(model("tiny_moe"), par, 8, 1024)
    assert (layout.dp, layout.expert_dp) == (4, 2)
    # tp2 cp2 ep8 etp1: minimum lcm(2*1*2, 1*8*1) = 8 ranks; dp = 8/4 = 2, expert_dp = 8/8 = 1.
    par = ParallelConfig(tp=2, cp=2, ep=8, etp=1, sp=True)
    assert minimum_world_size(par) == 8
    layout = validate_layout(model("tiny_moe"), par, 8, 1024)
    assert (layout.dp, layout.expert_dp) == (2, 1)


@pytest.mark.parametrize("kwargs, world", [
    (dict(), 1),
    (dict(tp=2, pp=2, cp=2), 8),
    (dict(tp=2, ep=4, etp=1), 4),          # lcm(2, 4)
    (dict(tp=4, ep=3, etp=1), 12),         # lcm(4, 3)
    (dict(tp=2, ep=4), 8),                 # etp defaults to tp: lcm(2, 8)
    (dict(tp=4, pp=2, ep=4, etp=1), 8),
])
def test_minimum_world_size(kwargs, world):
    assert minimum_world_size(ParallelConfig(**kwargs)) == world


def test_load_parallel_config_rejects_unknown_keys(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("tp: 2\ndp: 4\n")
    with pytest.raises(ConfigError, match=r"unknown keys \['dp'\]"):
        load_parallel_config(str(p))


def test_context_parallelism_runs_on_either_spec():
    # the local spec has its own context-parallel attention (model.cp_attention)
    assert layout_problems(model("tiny"), ParallelConfig(cp=2), world_size=2, seq_length=64) == []


@pytest.mark.parametrize("tp, cp, sp, fp8_align, multiple", [
    (1, 1, False, 1, 1), (4, 1, True, 1, 4), (1, 2, False, 1, 4), (2, 2, True, 1, 4), (4, 2, True, 1, 8),
    (1, 1, False, 16, 16), (2, 2, True, 16, 64), (8, 1, True, 32, 256), (4, 2, False, 16, 32)])
def test_sequence_multiple(tp, cp, sp, fp8_align, multiple):
    """2*cp chunks, each rank's cp share split over tp under SP, and FP8's token multiple on
    every rank's share: the multiple is the least width for which all three hold."""
    assert sequence_multiple(tp, cp, sp, fp8_align) == multiple
    share = multiple // (cp * (tp if sp else 1))   # tokens of one rank
    assert multiple % (2 * cp if cp > 1 else 1) == 0 and share % fp8_align == 0


def test_seq_length_for_fp8():
    par = ParallelConfig(tp=2, cp=2, sp=True)
    assert layout_problems(model("tiny"), par, seq_length=96) == []
    assert only_problem(model("tiny"), par, seq_length=96, fp8=True) == \
        "seq_length=96 is not divisible by 64 (required by cp and sp and fp8)"
    assert layout_problems(model("tiny"), par, seq_length=128, fp8=True) == []
    assert only_problem(model("tiny"), ParallelConfig(), seq_length=48, fp8=True, fp8_align=32) == \
        "seq_length=48 is not divisible by 32 (required by fp8)"
